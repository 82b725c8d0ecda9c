// Package dataset reads instruction records (Alpaca-style, or conversations
// in ShareGPT's or OpenAI's layout) and plain texts from Parquet, JSONL and
// text files as a stream of Arrow record batches, reads the Arrow IPC files that
// hold every stage's output (the engine writes them, pipeline.Output), and
// exports those as JSON lines or Parquet.
//
// Parquet is read with arrow-go's parquet/pqarrow rather than parquet-go: it
// decodes column chunks straight into Arrow arrays one row group at a time,
// shares its allocator and types with the Arrow IPC code used everywhere else,
// and its writer turns the same record batches back into Parquet for export, so
// one library covers reading, caching and exporting.
package dataset

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"iter"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/memory"

	"gemmaft/chat"
	"gemmaft/internal/lines"
)

// Column names of the record batches a Source produces.
const (
	ColInstruction = "instruction"
	ColInput       = "input"
	ColOutput      = "output"
	ColSystem      = "system"
)

// Format is a source file format.
type Format string

const (
	FormatAuto    Format = ""        // chosen by file extension
	FormatParquet Format = "parquet" // .parquet, .pq
	FormatJSONL   Format = "jsonl"   // .jsonl, .ndjson, .json; each optionally .gz
	FormatText    Format = "text"    // .txt, .text, .md, each optionally .gz: one text a file (LayoutText only)
)

// Defaults for SourceOptions.
const (
	DefaultBatchRows     = 1024
	DefaultShuffleMemory = 32 << 20
)

// SourceOptions configures Open.
type SourceOptions struct {
	// Paths are the files to read, in order. See ExpandGlobs for patterns.
	Paths []string
	// Format forces the format of every file; by default it follows each
	// file's extension.
	Format Format
	// Layout is what the rows hold: Alpaca records (the default),
	// conversations (LayoutShareGPT, LayoutOpenAI) or plain texts
	// (LayoutText).
	Layout Layout
	// Columns maps our column names (Layout.ColumnNames: instruction, input
	// and output; or a conversation's list and its role and content
	// fields; or text) to the file's names; a name not in the map is read
	// under its own name.
	Columns map[string]string
	// Roles maps a conversation's role names to system, user or assistant,
	// beside DefaultRoles.
	Roles map[string]string
	// SystemColumn names a file column whose text becomes the system column
	// (for conversations: a system message in front of a conversation that
	// has none, when the text is not empty).
	SystemColumn string
	// SystemText, when not empty, fills the system column on every row
	// (for conversations: is a system message in front of every
	// conversation that has none); beside SystemColumn, on the rows whose
	// column is empty, null or (JSON) missing.
	SystemText string
	// Limit stops after this many rows; 0 means all rows.
	Limit int64
	// Shuffle delivers the rows in a uniformly random order determined by
	// Seed. See Open for how memory stays bounded.
	Shuffle bool
	Seed    uint64
	// ShuffleMemory bounds the bytes of text held for one shuffle pass;
	// 0 means DefaultShuffleMemory.
	ShuffleMemory int64
	// SpillDir is where a shuffle of several passes keeps its rows between
	// the read of the input and the passes (about the text's size, in
	// files unlinked at once); "" means os.TempDir().
	SpillDir string
	// BatchRows is the number of rows per record batch; 0 means DefaultBatchRows.
	BatchRows int
	// Allocator allocates the Arrow buffers; nil means the Go allocator.
	Allocator memory.Allocator
	// FS, when set, is where Paths are looked up (slash-separated names, as
	// in fs.FS) instead of the operating system's files; Demo returns one.
	FS fs.FS
	// Nulls says what a null (or, in JSON lines, a null field) becomes:
	// NullsEmpty (the default) reads it as "", NullsDrop drops the row when
	// the null is in the instruction, output or system column (a null input
	// is Alpaca's "no input" and still reads as ""), NullsError fails on it.
	// Either way Source.Nulls counts them.
	Nulls NullPolicy
	// DropInvalid drops, and counts, each conversation the chat template
	// would refuse (roles out of turn, an unknown role, nothing to learn)
	// instead of failing on the first: real ShareGPT dumps hold a few.
	DropInvalid bool
	// Open, when set (and FS is not), opens each of Paths instead of
	// os.Open, every time the file is read; for Parquet the file must also
	// be an io.ReaderAt and an io.Seeker. The pipeline opens files through
	// it to check that what is read is what its cache key holds.
	Open func(path string) (fs.File, error)
}

// NullPolicy is what a Source does with null values; see SourceOptions.
type NullPolicy string

const (
	NullsEmpty NullPolicy = ""
	NullsDrop  NullPolicy = "drop"
	NullsError NullPolicy = "error"
)

// NullReport counts the null values a Source met among the rows it
// delivered (or dropped).
type NullReport struct {
	// Columns counts nulls by our column name (instruction, input, output,
	// system; a conversation's list and, per message, its content; text).
	Columns map[string]int64
	// First says where the first null of each column was: "a.jsonl line
	// 12" or "a.parquet row 7".
	First map[string]string
	// Dropped is the number of rows NullsDrop dropped.
	Dropped int64
}

// openFunc opens an input file; Parquet needs it to be an io.ReaderAt and
// io.Seeker too, as *os.File and the files of embed.FS are.
type openFunc func(name string) (fs.File, error)

func (o SourceOptions) opener() openFunc {
	if o.FS != nil {
		return o.FS.Open
	}
	if o.Open != nil {
		return o.Open
	}
	return func(name string) (fs.File, error) { return os.Open(name) }
}

// Source streams rows from a list of files as Arrow record batches with the
// columns instruction, input, output and, when configured, system (Alpaca
// records); messages (conversations, MessagesType); or text. Every value
// is non-null UTF-8 text; a null in the source becomes "".
type Source struct {
	opts   SourceOptions
	files  []sourceFile
	schema *arrow.Schema
	slots  []string    // our names of the text columns read into record.v
	conv   *convFields // a conversation's fields, for conversations

	total      int64 // rows in all files, when known
	totalKnown bool
	textBytes  int64 // approximate text size of all rows, for shuffle passes

	ctx     context.Context
	next    func() (record, error, bool)
	stop    func()
	done    bool
	nulls   NullReport
	invalid InvalidReport
}

// record is one row: its text columns (Source.slots) in order, and for
// conversations the messages as the file has them.
type record struct {
	v    [4]string
	msgs []rawMessage
	conv []chat.Message // msgs with roles mapped, once checked
	null uint8          // bit i < 4: text column i was null (and v[i] is ""); see nullList, nullContent
	file int32          // index of its file in Paths
	pos  int64          // its line (JSON lines, from 1), row (Parquet, from 0), or -1 (a whole text file)
	flaw error          // a flaw of its messages (a flawError), found as they were read
}

// Null bits of a record beyond its text columns.
const (
	nullList    = 4 // the conversation list was null
	nullContent = 5 // a message's content was null
)

// setMessages stores a record's conversation, noting a null list or a
// null message content.
func (r *record) setMessages(msgs []rawMessage, listNull bool) {
	if listNull {
		r.null |= 1 << nullList
	}
	for _, m := range msgs {
		if m.null {
			r.null |= 1 << nullContent
		}
	}
	r.msgs = msgs
}

// Nulls reports the null values met so far; complete once Next has
// returned io.EOF.
func (s *Source) Nulls() NullReport { return s.nulls }

// InvalidReport counts the conversations SourceOptions.DropInvalid dropped.
type InvalidReport struct {
	Dropped int64
	First   []string // why the first few were, with where they are
}

// Invalid reports the conversations the source dropped as invalid.
func (s *Source) Invalid() InvalidReport { return s.invalid }

// where names a record's place in its file, for messages.
func (s *Source) where(r record) string {
	name := s.opts.Paths[r.file]
	switch f := s.files[r.file].(type) {
	case *parquetFile:
		return fmt.Sprintf("%s row index %d", name, r.pos)
	case *textFile:
		return name
	case *jsonlFile:
		return name + " " + f.where(r.pos)
	}
	return fmt.Sprintf("%s line %d", name, r.pos)
}

// nullName is our name of the column of null bit i.
func (s *Source) nullName(i int) string {
	switch i {
	case nullList:
		return s.opts.Layout.ColumnNames()[0]
	case nullContent:
		return s.opts.Layout.ColumnNames()[2]
	}
	return s.slots[i]
}

// applyNulls counts a record's nulls and applies the policy: keep reports
// whether the row is delivered.
func (s *Source) applyNulls(r record) (keep bool, err error) {
	if i := slices.Index(s.slots, ColSystem); i >= 0 && s.opts.SystemText != "" {
		// A record without its own system text takes the default.
		r.null &^= 1 << i
	}
	if r.null == 0 {
		return true, nil
	}
	if s.nulls.Columns == nil {
		s.nulls.Columns, s.nulls.First = map[string]int64{}, map[string]string{}
	}
	serious := false
	for i := 0; i < 8; i++ {
		if r.null&(1<<i) == 0 {
			continue
		}
		col := s.nullName(i)
		s.nulls.Columns[col]++
		if _, ok := s.nulls.First[col]; !ok {
			s.nulls.First[col] = s.where(r)
		}
		serious = serious || col != ColInput
	}
	if !serious {
		return true, nil
	}
	switch s.opts.Nulls {
	case NullsDrop:
		s.nulls.Dropped++
		return false, nil
	case NullsError:
		for i := 0; i < 8; i++ {
			if r.null&(1<<i) == 0 {
				continue
			}
			col := s.nullName(i)
			switch {
			case i == nullContent: // a field of a message, not a column of the record
				return false, fmt.Errorf("dataset: %s: a message's %s is null (nulls: error)", s.where(r), s.fileColumn(col))
			case col != ColInput || s.opts.Layout != LayoutAlpaca:
				return false, fmt.Errorf("dataset: %s: column %s is null (nulls: error)", s.where(r), s.fileColumn(col))
			}
		}
	}
	return true, nil
}

// sourceFile is one opened and validated input file.
// UnreadSystem lists the files whose records have a system text (a
// "system" field or column) that the source does not read: without
// SystemColumn it is silently left out of every conversation. For JSON
// lines it knows the records read so far: all of them once Next has
// returned io.EOF.
func (s *Source) UnreadSystem() []string {
	var out []string
	for _, f := range s.files {
		if u, ok := f.(interface{ unreadSystem() bool }); ok && u.unreadSystem() {
			out = append(out, f.path())
		}
	}
	return out
}

// UnreadInput maps the files whose records have no input field but one
// that looks like it (a Dolly record's context, an input-turkish left
// unmapped) to that field: without a mapping it is silently left out.
func (s *Source) UnreadInput() map[string]string {
	out := map[string]string{}
	for _, f := range s.files {
		if u, ok := f.(interface{ unreadInput() string }); ok && u.unreadInput() != "" {
			out[f.path()] = u.unreadInput()
		}
	}
	return out
}

// Unweighted is the number of messages read so far marked weight 0 (or
// false), Axolotl's switch for a turn not to train, which this source does
// not read: they train as the others do.
func (s *Source) Unweighted() int64 {
	if s.conv == nil {
		return 0
	}
	return s.conv.unweighted.Load()
}

// ToolCalls is the number of messages read so far with OpenAI's tool_calls,
// which no text template renders: such a turn trains on its content alone.
func (s *Source) ToolCalls() int64 {
	if s.conv == nil {
		return 0
	}
	return s.conv.toolCalls.Load()
}

type sourceFile interface {
	path() string
	// numRows returns the number of rows, or -1 when unknown.
	numRows() int64
	// scan calls yield for every row whose index (base plus the row's
	// position in the file) want accepts, in file order, and returns the
	// number of rows in the file. It stops early when yield returns false.
	// file is the file's index in Paths, for the records' positions.
	scan(ctx context.Context, file int32, base int64, want func(int64) bool, yield func(record) bool) (rows int64, stopped bool, err error)
	close() error
}

// Open validates the options and every file before any row is read: files
// exist and are of a known format, Parquet footers are readable, and the
// mapped columns are present and hold strings (for JSONL, in the first record
// of each file). A dataset without rows is an error.
//
// Shuffle gives an exact, seeded, uniform permutation without holding the
// dataset in memory: every row is assigned one of P passes by a hash of the
// seed and its position, with P chosen so that one pass holds about
// ShuffleMemory bytes of text. One read of the files writes each row to a
// spill file in SpillDir; pass p reads its rows back, permutes them and
// emits them. Sorting rows by independent random keys (pass, then a random
// order within the pass) is a uniform permutation, so with Limit the first
// rows are a uniform random sample of the whole dataset; a Limit within the
// first pass reads the files once without a spill. A spill reads every
// record, so a malformed one fails the shuffle wherever it lies, as a read
// without a Limit does. For JSONL the rows are counted in Open to choose P.
func Open(opts SourceOptions) (*Source, error) {
	if len(opts.Paths) == 0 {
		return nil, errors.New("dataset: no input files")
	}
	if opts.Limit < 0 {
		return nil, fmt.Errorf("dataset: limit %d is negative", opts.Limit)
	}
	if opts.BatchRows < 0 || opts.ShuffleMemory < 0 {
		return nil, errors.New("dataset: batch rows and shuffle memory must not be negative")
	}
	if opts.BatchRows == 0 {
		opts.BatchRows = DefaultBatchRows
	}
	if opts.ShuffleMemory == 0 {
		opts.ShuffleMemory = DefaultShuffleMemory
	}
	if opts.Allocator == nil {
		opts.Allocator = memory.NewGoAllocator()
	}
	switch opts.Nulls {
	case NullsEmpty, NullsDrop, NullsError:
	default:
		return nil, fmt.Errorf("dataset: unknown null policy %q (want empty, drop or error)", opts.Nulls)
	}
	layout, err := ParseLayout(string(opts.Layout))
	if err != nil {
		return nil, err
	}
	opts.Layout = layout
	names := layout.ColumnNames()
	for ours := range opts.Columns {
		if !slices.Contains(names, ours) {
			return nil, fmt.Errorf("dataset: cannot map column %q: the %s layout's columns are %s (the system column has its own option)",
				ours, layoutName(layout), strings.Join(names, ", "))
		}
	}
	if len(opts.Roles) > 0 && !layout.Conversational() {
		return nil, errors.New("dataset: roles are mapped only for conversations (the sharegpt and openai layouts)")
	}
	if layout == LayoutText && (opts.SystemColumn != "" || opts.SystemText != "") {
		return nil, errors.New("dataset: plain texts have no system text")
	}

	s := &Source{opts: opts, totalKnown: true}
	var fields []arrow.Field
	var wanted []string // the file's text columns, read into record.v
	switch {
	case layout == LayoutAlpaca:
		fields = []arrow.Field{
			{Name: ColInstruction, Type: arrow.BinaryTypes.String},
			{Name: ColInput, Type: arrow.BinaryTypes.String},
			{Name: ColOutput, Type: arrow.BinaryTypes.String},
		}
		s.slots = []string{ColInstruction, ColInput, ColOutput}
		if opts.SystemColumn != "" || opts.SystemText != "" {
			fields = append(fields, arrow.Field{Name: ColSystem, Type: arrow.BinaryTypes.String})
			s.slots = append(s.slots, ColSystem)
		}
	case layout.Conversational():
		roles, err := roleMap(opts.Roles)
		if err != nil {
			return nil, err
		}
		s.conv = &convFields{list: s.fileColumn(names[0]), role: s.fileColumn(names[1]), content: s.fileColumn(names[2]), roles: roles}
		fields = []arrow.Field{{Name: ColMessages, Type: MessagesType}}
		if opts.SystemColumn != "" {
			s.slots = []string{ColSystem}
		}
	default:
		fields = []arrow.Field{{Name: ColText, Type: arrow.BinaryTypes.String}}
		s.slots = []string{ColText}
	}
	for _, ours := range s.slots {
		if ours == ColSystem && opts.SystemColumn == "" {
			continue // a system text, not a column
		}
		wanted = append(wanted, s.fileColumn(ours))
	}
	s.schema = arrow.NewSchema(fields, nil)
	var optional optionalFields // the JSON fields a record may leave out
	if layout == LayoutAlpaca {
		optional.input = s.fileColumn(ColInput)
	}
	optional.system = opts.SystemColumn
	named := map[string]string{} // the fields the spec names, by the parameter naming them
	for role, field := range opts.Columns {
		named[field] = "columns:" + role // the role, for the hint
		if layout == LayoutText {
			named[field] = "column:" // a text stage's one field
		}
	}
	if opts.SystemColumn != "" {
		named[opts.SystemColumn] = "system_column"
	}

	for _, path := range opts.Paths {
		format, err := FormatOf(path, opts.Format)
		if err != nil {
			s.closeFiles()
			return nil, err
		}
		if format == FormatText && layout != LayoutText {
			s.closeFiles()
			return nil, fmt.Errorf("dataset: %s: a plain text file is read by a text source (one text a file), not as %s records", path, layoutName(layout))
		}
		var f sourceFile
		switch format {
		case FormatParquet:
			// A Parquet file may lack the input column, not one the
			// spec's columns: names (a typo would read as no input).
			pqOptional := ""
			if optional.input == ColInput {
				pqOptional = optional.input
			}
			f, err = openParquet(opts.opener(), path, wanted, pqOptional, s.conv, opts.Allocator, named)
		case FormatText:
			f, err = openText(opts.opener(), path)
		default:
			f, err = openJSONL(opts.opener(), path, wanted, optional, s.conv, named)
		}
		if err != nil {
			s.closeFiles()
			return nil, err
		}
		s.files = append(s.files, f)
		if n := f.numRows(); n >= 0 {
			s.total += n
		} else {
			s.totalKnown = false
		}
		if b, ok := f.(interface{ textBytes() int64 }); ok {
			s.textBytes += b.textBytes()
		}
	}
	if opts.Shuffle && !s.totalKnown {
		if err := s.countRows(); err != nil {
			s.closeFiles()
			return nil, err
		}
	}
	if s.totalKnown && s.total == 0 {
		s.closeFiles()
		return nil, fmt.Errorf("dataset: %s: no rows", strings.Join(opts.Paths, ", "))
	}
	if s.conv != nil {
		s.conv.unweighted.Store(0) // the first records' checks above are no reading
		s.conv.toolCalls.Store(0)
	}
	s.next, s.stop = iter.Pull2(s.rows)
	return s, nil
}

// fileColumn returns the file's name for one of our columns.
func (s *Source) fileColumn(ours string) string {
	if ours == ColSystem && s.opts.SystemColumn != "" {
		return s.opts.SystemColumn
	}
	if name, ok := s.opts.Columns[ours]; ok && name != "" {
		return name
	}
	return ours
}

// layoutName is a layout's name in messages.
func layoutName(l Layout) string {
	if l == LayoutAlpaca {
		return "alpaca"
	}
	return string(l)
}

// FormatOf is the format a source reads path in: forced, or else the one
// its extension names.
func FormatOf(path string, forced Format) (Format, error) {
	switch forced {
	case FormatParquet, FormatJSONL, FormatText:
		return forced, nil
	case FormatAuto:
	default:
		return "", fmt.Errorf("dataset: unknown format %q (want %s, %s or %s)", forced, FormatParquet, FormatJSONL, FormatText)
	}
	name := strings.ToLower(filepath.Base(path))
	name = strings.TrimSuffix(name, ".gz")
	switch filepath.Ext(name) {
	case ".parquet", ".pq":
		if strings.HasSuffix(strings.ToLower(path), ".gz") {
			return "", fmt.Errorf("dataset: %s: gzip-compressed Parquet is not supported; Parquet compresses its own pages", path)
		}
		return FormatParquet, nil
	case ".jsonl", ".ndjson", ".json":
		return FormatJSONL, nil
	case ".txt", ".text", ".md":
		return FormatText, nil
	}
	return "", fmt.Errorf("dataset: %s: unknown file type (want .parquet, .jsonl, .ndjson or .json, optionally .gz for JSON lines; .txt, .text or .md for plain texts)", path)
}

// SniffFormat says which format a file's first bytes show: Parquet (its
// magic), JSON lines or a JSON array ('{' or '[' first, past a byte order
// mark and spaces), or "" when they show neither (plain text, gzip, empty).
// It tells a file given to the wrong kind of stage from a corrupt one, and
// refuses gzip without its .gz ending and UTF-16 text, which would read as
// JSON that is not.
func SniffFormat(open func(string) (fs.File, error), path string) (Format, error) {
	if open == nil {
		open = func(name string) (fs.File, error) { return os.Open(name) }
	}
	f, err := open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	head := make([]byte, 512)
	n, err := io.ReadFull(f, head)
	if err != nil && err != io.ErrUnexpectedEOF && err != io.EOF {
		return "", err
	}
	head = head[:n]
	if bytes.HasPrefix(head, []byte("PAR1")) {
		return FormatParquet, nil
	}
	switch {
	case bytes.HasPrefix(head, []byte{0x1f, 0x8b}) && !strings.EqualFold(filepath.Ext(path), ".gz"):
		return "", fmt.Errorf("%s is gzip-compressed: name it %s.gz, and it is read as such", path, filepath.Base(path))
	case bytes.HasPrefix(head, []byte{0xff, 0xfe}) || bytes.HasPrefix(head, []byte{0xfe, 0xff}):
		return "", fmt.Errorf("%s is UTF-16 text: save it as UTF-8", path)
	}
	head = bytes.TrimLeft(bytes.TrimPrefix(head, []byte(lines.BOM)), " \t\r\n")
	if len(head) > 0 && (head[0] == '{' || head[0] == '[') {
		return FormatJSONL, nil
	}
	return "", nil
}

// countRows counts the rows of files whose row count is not in their
// metadata (JSONL), so that shuffle passes can be planned.
func (s *Source) countRows() error {
	s.total, s.textBytes = 0, 0
	for _, f := range s.files {
		if c, ok := f.(interface{ count() error }); ok {
			if err := c.count(); err != nil {
				return err
			}
		}
		s.total += f.numRows()
		if b, ok := f.(interface{ textBytes() int64 }); ok {
			s.textBytes += b.textBytes()
		}
	}
	s.totalKnown = true
	return nil
}

// Schema returns the schema of the record batches.
func (s *Source) Schema() *arrow.Schema { return s.schema }

// Rows returns the number of rows Next will deliver, when it is known before
// reading (always for Parquet; for JSONL only when shuffling).
func (s *Source) Rows() (n int64, known bool) {
	if s.opts.Limit > 0 && (!s.totalKnown || s.opts.Limit < s.total) {
		return s.opts.Limit, s.totalKnown
	}
	return s.total, s.totalKnown
}

// Next returns the next record batch, or io.EOF after the last one. The
// caller releases the batch.
func (s *Source) Next(ctx context.Context) (arrow.RecordBatch, error) {
	if s.done {
		return nil, io.EOF
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	s.ctx = ctx
	b := array.NewRecordBuilder(s.opts.Allocator, s.schema)
	defer b.Release()
	var cols []*array.StringBuilder
	var msgs *messagesBuilder
	if s.conv != nil {
		msgs = newMessagesBuilder(b.Field(0).(*array.ListBuilder))
	} else {
		cols = make([]*array.StringBuilder, s.schema.NumFields())
		for i := range cols {
			cols[i] = b.Field(i).(*array.StringBuilder)
		}
	}
	n := 0
	for n < s.opts.BatchRows {
		r, err, ok := s.next()
		if !ok {
			s.done = true
			break
		}
		if err != nil {
			s.done = true
			s.stop()
			return nil, err
		}
		for i, c := range cols {
			c.Append(r.v[i])
		}
		if msgs != nil {
			msgs.append(r.conv)
		}
		n++
	}
	if n == 0 {
		return nil, io.EOF
	}
	return b.NewRecordBatch(), nil
}

// Close releases the files. It is safe to call more than once.
func (s *Source) Close() error {
	if s.stop != nil {
		s.stop()
	}
	s.done = true
	return s.closeFiles()
}

func (s *Source) closeFiles() error {
	var errs []error
	for _, f := range s.files {
		errs = append(errs, f.close())
	}
	s.files = nil
	return errors.Join(errs...)
}

// rows yields every row in delivery order, honouring Limit and Shuffle; an
// error is yielded once, last.
func (s *Source) rows(yield func(record, error) bool) {
	limit := s.opts.Limit
	emitted := int64(0)
	var rowErr error
	emit := func(r record) bool {
		keep, err := s.applyNulls(r)
		if err != nil {
			rowErr = err
			return false
		}
		if !keep {
			return true
		}
		if s.conv != nil {
			if r.conv, err = s.conversation(r); err != nil && s.opts.DropInvalid {
				if s.invalid.Dropped++; len(s.invalid.First) < 3 {
					s.invalid.First = append(s.invalid.First, strings.TrimPrefix(err.Error(), "dataset: "))
				}
				return true
			}
			if err != nil {
				rowErr = fmt.Errorf("%w\n\t(invalid: drop drops such conversations and counts them)", err)
				return false
			}
		} else if s.opts.SystemText != "" && r.v[3] == "" {
			r.v[3] = s.opts.SystemText // every record's, or the default of those without their own
		}
		if !yield(r, nil) {
			return false
		}
		emitted++
		return limit == 0 || emitted < limit
	}
	all := func(int64) bool { return true }

	if !s.opts.Shuffle {
		n, stopped, err := s.scanFiles(all, emit)
		switch {
		case err != nil:
			yield(record{}, err)
		case rowErr != nil:
			yield(record{}, rowErr)
		case !stopped && n == 0:
			yield(record{}, fmt.Errorf("dataset: %s: no rows", strings.Join(s.opts.Paths, ", ")))
		}
		return
	}

	if err := s.shuffle(emit); err != nil {
		yield(record{}, err)
	} else if rowErr != nil {
		yield(record{}, rowErr)
	}
}

// scanFiles scans the files in order: row i of them all is offered to want
// and, where wanted, yielded. It stops where yield returns false.
func (s *Source) scanFiles(want func(int64) bool, yield func(record) bool) (rows int64, stopped bool, err error) {
	for i, f := range s.files {
		n, stopped, err := f.scan(s.ctx, int32(i), rows, want, yield)
		rows += n
		if err != nil || stopped {
			return rows, stopped, err
		}
	}
	return rows, false, nil
}

// conversation maps a record's messages' roles, puts the system text in
// front when the conversation has no system message, and checks the
// turns; an error names the record.
func (s *Source) conversation(r record) ([]chat.Message, error) {
	if r.flaw != nil {
		return nil, fmt.Errorf("dataset: %s, %w", s.where(r), r.flaw)
	}
	msgs := make([]chat.Message, 0, len(r.msgs)+1)
	system := s.opts.SystemText
	if s.opts.SystemColumn != "" && r.v[0] != "" {
		system = r.v[0]
	}
	for i, m := range r.msgs {
		prev := ""
		if len(msgs) > 0 {
			prev = msgs[len(msgs)-1].Role
		}
		cm, err := s.conv.message(i, m, prev)
		if err != nil {
			return nil, fmt.Errorf("dataset: %s: %w", s.where(r), err)
		}
		if i == 0 && cm.Role != "system" && system != "" {
			msgs = append(msgs, chat.Message{Role: "system", Content: system})
		}
		msgs = append(msgs, cm)
	}
	if err := checkTurns(msgs); err != nil {
		if r.null&(1<<nullList) != 0 {
			// The default policy reads a null as empty, and an empty
			// conversation cannot be trained on: say how to skip them.
			return nil, fmt.Errorf("dataset: %s: column %s is null: %w; nulls: drop skips such records", s.where(r), s.nullName(nullList), err)
		}
		return nil, fmt.Errorf("dataset: %s: %w", s.where(r), err)
	}
	return msgs, nil
}

// messagesBuilder appends conversations to a ColMessages column.
type messagesBuilder struct {
	list          *array.ListBuilder
	elem          *array.StructBuilder
	role, content *array.StringBuilder
}

func newMessagesBuilder(lb *array.ListBuilder) *messagesBuilder {
	st := lb.ValueBuilder().(*array.StructBuilder)
	return &messagesBuilder{list: lb, elem: st, role: st.FieldBuilder(0).(*array.StringBuilder), content: st.FieldBuilder(1).(*array.StringBuilder)}
}

func (b *messagesBuilder) append(msgs []chat.Message) {
	b.list.Append(true)
	for _, m := range msgs {
		b.elem.Append(true)
		b.role.Append(m.Role)
		b.content.Append(m.Content)
	}
}
