package dataset

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"slices"
	"strings"
	"sync/atomic"

	"gemmaft/internal/lines"
	"gemmaft/internal/spell"
)

// jsonlFile is a file of JSON objects, one per line, plain or gzip-compressed
// (by the .gz extension). Blank lines are ignored. Rows are named by their
// 1-based line number, as editors show them. A file holding one JSON array
// of objects (alpaca_data.json's layout, which Hugging Face datasets reads
// too) is read element by element, rows named by their 0-based index, as
// jq's .[i] finds them.
type jsonlFile struct {
	open  openFunc
	name  string
	gz    bool
	array bool // one JSON array, not JSON lines
	want  []string
	// optional are the fields of want whose absence from a record reads
	// as null.
	optional optionalFields
	conv     *convFields // for conversations
	rows     int64       // -1 until counted
	bytes    int64
	// system says that a record read so far has a system text that want
	// does not read (see Source.UnreadSystem); readsSystem that want does.
	system      atomic.Bool
	readsSystem bool
	// input is the first record's field that looks like the input, when
	// the record has no field for it (see Source.UnreadInput).
	input string
	// named are the fields the spec names, with the parameter that names
	// them (columns:, system_column), for the hint of one missing.
	named map[string]string
	// firstAt is where the file's first record is, which open checks.
	firstAt int64
}

// optionalFields are the fields a JSON record may leave out: an Alpaca
// record's input, read as "" (as a null one where columns: names the
// field, so that a misspelt name shows in the null counts), as many
// datasets leave it out, and the system column, read as "" (no null for
// the null policy to drop), as datasets give only some records a system
// text; "" where there is none.
type optionalFields struct{ input, system string }

func (o optionalFields) has(name string) bool {
	return name != "" && (name == o.input || name == o.system)
}

func openJSONL(open openFunc, path string, want []string, optional optionalFields, conv *convFields, named map[string]string) (*jsonlFile, error) {
	jf := &jsonlFile{open: open, name: path, gz: strings.HasSuffix(strings.ToLower(path), ".gz"), want: want, optional: optional, conv: conv, rows: -1,
		readsSystem: slices.Contains(want, ColSystem), named: named}
	if err := jf.detectArray(); err != nil {
		return nil, err
	}
	// Check the mapping on the first record, so that a wrong column name
	// fails before anything runs.
	rr, err := jf.records()
	if err != nil {
		return nil, err
	}
	defer rr.close()
	first, err := rr.next()
	if err == io.EOF {
		jf.rows = 0
		return jf, nil
	}
	if err != nil {
		return nil, err
	}
	jf.firstAt = rr.at()
	if _, err := jf.parse(first, jf.firstAt); err != nil {
		return nil, err
	}
	var rec map[string]json.RawMessage
	if json.Unmarshal(first, &rec) == nil {
		if _, has := rec[optional.input]; optional.input != "" && !has {
			jf.input = unreadInput(slices.Sorted(maps.Keys(rec)), want)
		}
	}
	return jf, nil
}

func (jf *jsonlFile) unreadSystem() bool  { return jf.system.Load() }
func (jf *jsonlFile) unreadInput() string { return jf.input }

// detectArray sets jf.array when the file's first byte past a byte order
// mark and white space starts a JSON array.
func (jf *jsonlFile) detectArray() error {
	lr, err := jf.lines()
	if err != nil {
		return err
	}
	defer lr.close()
	for {
		c, err := lr.r.ReadByte()
		switch {
		case err == io.EOF:
			return nil
		case err != nil:
			return fmt.Errorf("dataset: %s: %w", jf.name, err)
		case c == ' ' || c == '\t' || c == '\r' || c == '\n':
			continue
		}
		jf.array = c == '['
		return nil
	}
}

// A recordReader yields the records of a JSON file: its lines, or the
// elements of the array it holds.
type recordReader interface {
	// next returns the next record's JSON; it is valid until the next call.
	next() ([]byte, error)
	at() int64 // the last record's line (1-based) or element (0-based)
	close()
}

func (jf *jsonlFile) records() (recordReader, error) {
	lr, err := jf.lines()
	switch {
	case err != nil:
		return nil, err
	case !jf.array:
		return lr, nil
	}
	ar := &arrayReader{lr: lr, dec: json.NewDecoder(lr.r), index: -1}
	if tok, err := ar.dec.Token(); err != nil || tok != json.Delim('[') {
		lr.close()
		return nil, fmt.Errorf("dataset: %s: not a JSON array: %v", jf.name, err)
	}
	return ar, nil
}

// where names the place of a record: "line 3", or "element 2" in an array.
func (jf *jsonlFile) where(at int64) string {
	if jf.array {
		return fmt.Sprintf("element .[%d]", at) // as jq numbers them, from 0
	}
	return fmt.Sprintf("line %d", at)
}

// arrayReader yields the elements of a file holding one JSON array.
type arrayReader struct {
	lr    *lineReader // for the file and its decompression
	dec   *json.Decoder
	raw   json.RawMessage
	index int64
}

func (ar *arrayReader) at() int64 { return ar.index }
func (ar *arrayReader) close()    { ar.lr.close() }

func (ar *arrayReader) next() ([]byte, error) {
	if !ar.dec.More() {
		if _, err := ar.dec.Token(); err != nil { // the closing ]
			return nil, fmt.Errorf("dataset: %s: after element .[%d]: %w", ar.lr.name, ar.index, err)
		}
		if _, err := ar.dec.Token(); err != io.EOF {
			return nil, fmt.Errorf("dataset: %s: data after the JSON array", ar.lr.name)
		}
		return nil, io.EOF
	}
	ar.raw = ar.raw[:0]
	if err := ar.dec.Decode(&ar.raw); err != nil {
		return nil, fmt.Errorf("dataset: %s: element .[%d]: invalid JSON: %w", ar.lr.name, ar.index+1, err)
	}
	ar.index++
	return ar.raw, nil
}

func (jf *jsonlFile) path() string   { return jf.name }
func (jf *jsonlFile) numRows() int64 { return jf.rows }
func (jf *jsonlFile) close() error   { return nil }

func (jf *jsonlFile) textBytes() int64 {
	if jf.rows < 0 {
		return 0
	}
	return jf.bytes
}

// count reads the file once to learn its row count and size.
func (jf *jsonlFile) count() error {
	if jf.rows >= 0 && jf.bytes > 0 {
		return nil
	}
	rr, err := jf.records()
	if err != nil {
		return err
	}
	defer rr.close()
	var rows, size int64
	for {
		line, err := rr.next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return err
		}
		rows++
		size += int64(len(line))
	}
	jf.rows, jf.bytes = rows, size
	return nil
}

func (jf *jsonlFile) scan(ctx context.Context, file int32, base int64, want func(int64) bool, yield func(record) bool) (rows int64, stopped bool, err error) {
	rr, err := jf.records()
	if err != nil {
		return 0, false, err
	}
	defer rr.close()
	for {
		if rows%1024 == 0 {
			if err := ctx.Err(); err != nil {
				return rows, false, err
			}
		}
		line, err := rr.next()
		if err == io.EOF {
			return rows, false, nil
		}
		if err != nil {
			return rows, false, err
		}
		if !want(base + rows) {
			rows++
			continue
		}
		r, err := jf.parse(line, rr.at())
		if err != nil {
			return rows, false, err
		}
		r.file, r.pos = file, rr.at()
		rows++
		if !yield(r) {
			return rows, true, nil
		}
	}
}

// fieldHint says, of a record without the field name, what in the spec
// reads it: the format its fields have, or a columns: mapping to one of
// them; by is the parameter that named it, if one did (misspelt, then);
// read are the fields the source reads for other roles, which the hint
// does not offer.
func fieldHint(keys []string, name string, conv bool, by string, read []string) string {
	free := slices.DeleteFunc(slices.Clone(keys), func(k string) bool { return slices.Contains(read, k) })
	role := ""
	if r, ok := strings.CutPrefix(by, "columns:"); ok { // columns: maps role to name
		by, role = "columns:", r
	}
	switch {
	case slices.Contains(keys, ColQuestionID) && slices.Contains(keys, ColTurns):
		return "; MT-Bench questions, which a stage of kind mt_bench reads for a generate stage"
	case slices.Contains(keys, "conversations"):
		return "; a ShareGPT record: set format: sharegpt"
	case slices.Contains(keys, ColMessages):
		return "; an OpenAI-style record: set format: openai"
	case conv && slices.Contains(keys, ColInstruction):
		return "; an Alpaca record: leave format out (alpaca is the default)"
	case len(keys) == 0:
		return ""
	case by != "" && spell.Closest(name, free) != "":
		return fmt.Sprintf("; %s names %q: did you mean %q?", by, name, spell.Closest(name, free))
	case by == "columns:" && likelyField(free, role) != "":
		return fmt.Sprintf("; columns: maps %s to %q, which the file lacks: e.g. columns: {%s: %s}", role, name, role, likelyField(free, role))
	case by == "columns:":
		return fmt.Sprintf("; columns: maps %s to %q, which the file lacks: map it to one of these fields (columns: {%s: FIELD})", role, name, role)
	case by != "":
		return fmt.Sprintf("; %s names %q: name one of these fields, or leave %s out", by, name, by)
	}
	f := likelyField(free, name)
	switch {
	case name == ColText && f != "": // a text stage names its one field with column:
		return fmt.Sprintf("; name the record's field with column:, e.g. column: %s", f)
	case name == ColText:
		return "; name the record's field with column: FIELD"
	case f != "":
		return fmt.Sprintf("; name the record's field with columns:, e.g. columns: {%s: %s}", name, f)
	}
	return fmt.Sprintf("; name the record's field with columns: {%s: FIELD}", name)
}

// likelyField is the field of keys most likely to be name's: one spelt
// nearly as it (instrucion), one named with it (output-turkish), else one
// people often call it otherwise; "" when none looks like it.
func likelyField(keys []string, name string) string {
	if c := spell.Closest(name, keys); c != "" {
		return c
	}
	for _, k := range keys {
		if strings.Contains(strings.ToLower(k), name) {
			return k
		}
	}
	for _, k := range keys {
		if slices.Contains(likelyNames[name], strings.ToLower(k)) {
			return k
		}
	}
	return ""
}

// unreadInput is the field of keys that looks like an Alpaca record's
// input when the source reads none (its input field is not among keys),
// "" when none does: a Dolly record's context, an input-turkish left
// unmapped.
func unreadInput(keys, want []string) string {
	for _, k := range keys {
		l := strings.ToLower(k)
		if (strings.Contains(l, ColInput) && !strings.Contains(l, "ids") || slices.Contains(likelyNames[ColInput], l)) && !slices.Contains(want, k) {
			return k
		}
	}
	return ""
}

// likelyNames are other names datasets give the fields of a layout.
var likelyNames = map[string][]string{
	ColInstruction:  {"prompt", "question", "query", "instruction_tr", "soru", "talimat"},
	ColOutput:       {"response", "answer", "completion", "output_tr", "cevap", "yanit", "yanıt"},
	ColInput:        {"context", "girdi"},
	"conversations": {"conversation", "dialog", "dialogue", "turns", "chat"},
	ColMessages:     {"conversation", "dialog", "dialogue", "turns", "chat"},
}

// parse decodes one record, at line or element at, into a record. Only the
// mapped fields are checked; other fields may hold anything.
func (jf *jsonlFile) parse(line []byte, at int64) (record, error) {
	where := jf.where(at)
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(line, &obj); err != nil {
		var typeErr *json.UnmarshalTypeError
		if errors.As(err, &typeErr) {
			return record{}, fmt.Errorf("dataset: %s: %s: not a JSON object", jf.name, where)
		}
		if se := (*json.SyntaxError)(nil); at == 1 && !jf.array && errors.As(err, &se) && se.Offset == int64(len(line)) {
			// The first line ends inside its object: one object over
			// several lines, not JSON lines.
			return record{}, fmt.Errorf("dataset: %s: %s: invalid JSON: %w (a record over several lines? JSON lines hold one object a line: jq -c . converts)", jf.name, where, err)
		}
		return record{}, fmt.Errorf("dataset: %s: %s: invalid JSON: %w", jf.name, where, err)
	}
	if obj == nil {
		return record{}, fmt.Errorf("dataset: %s: %s: not a JSON object", jf.name, where)
	}
	if raw, ok := obj[ColSystem]; ok && !jf.readsSystem && !jf.system.Load() {
		var text string
		if json.Unmarshal(raw, &text) == nil && strings.TrimSpace(text) != "" {
			jf.system.Store(true)
		}
	}
	var r record
	noField := func(name string) error {
		keys := make([]string, 0, len(obj))
		for k := range obj {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		if at != jf.firstAt {
			// The file's first record has it (the stage opened): this
			// record is the odd one, not the mapping.
			return fmt.Errorf("dataset: %s: %s: no field %q, which the file's first record has; this record has fields %s: mend or remove it", jf.name, where, name, quoteList(keys))
		}
		return fmt.Errorf("dataset: %s: %s: no field %q; the record has fields %s%s", jf.name, where, name, quoteList(keys), fieldHint(keys, name, jf.conv != nil, jf.named[name], jf.want))
	}
	if c := jf.conv; c != nil {
		raw, ok := obj[c.list]
		if !ok {
			return record{}, noField(c.list)
		}
		if raw[0] == 'n' {
			r.setMessages(nil, true)
		} else {
			msgs, err := c.parseJSONMessages(raw)
			if errors.As(err, new(flawError)) {
				r.flaw = err // the conversation's: invalid: drop may drop it
			} else if err != nil {
				return record{}, fmt.Errorf("dataset: %s: %s, %w", jf.name, where, err)
			}
			r.setMessages(msgs, false)
		}
	}
	for i, name := range jf.want {
		raw, ok := obj[name]
		if !ok && jf.optional.has(name) {
			// No input (Alpaca's instructions without one), or no system
			// text of its own: "", and not a null, which is counted as
			// something the data holds; but a field columns: names and
			// the record lacks counts, so that a misspelt name shows.
			if name == jf.optional.input && jf.named[name] != "" {
				r.null |= 1 << i
			}
			continue
		}
		if !ok {
			return record{}, noField(name)
		}
		switch raw[0] {
		case 'n': // null
			r.null |= 1 << i
			continue
		case '"':
		default:
			return record{}, fmt.Errorf("dataset: %s: %s, column %s: %s, not a string", jf.name, where, name, JSONKind(raw[0]))
		}
		if err := DecodeJSONString(raw, &r.v[i]); err != nil {
			return record{}, fmt.Errorf("dataset: %s: %s, column %s: %w", jf.name, where, name, err)
		}
	}
	return r, nil
}

// hasSurrogateEscape reports whether a raw JSON string holds an escape in
// the UTF-16 surrogate range, \uD800 to \uDFFF.
func hasSurrogateEscape(raw []byte) bool {
	for i := 0; i+2 < len(raw); i++ {
		if raw[i] != '\\' {
			continue
		}
		if raw[i+1] == 'u' && (raw[i+2] == 'd' || raw[i+2] == 'D') && i+3 < len(raw) && bytes.IndexByte([]byte("89abAB"), raw[i+3]) >= 0 {
			return true
		}
		i++ // skip the escaped character: in \\ud800 the u is not an escape
	}
	return false
}

// decodedOffset converts the offset of a byte in a raw JSON string literal
// into its offset in the decoded string, falling back to the raw offset.
func decodedOffset(raw []byte, at int) int {
	var prefix string
	if err := json.Unmarshal(append(slices.Clip(raw[:at]), '"'), &prefix); err != nil {
		return at - 1
	}
	return len(prefix)
}

// JSONKind names the kind of a JSON value by its first byte, for errors.
func JSONKind(first byte) string {
	switch first {
	case '"':
		return "a string"
	case 'n':
		return "null"
	case '{':
		return "an object"
	case '[':
		return "an array"
	case 't', 'f':
		return "a boolean"
	}
	return "a number"
}

// maxLineBytes bounds a JSON line (a variable for tests).
var maxLineBytes = lines.DefaultMax

// lineReader yields the non-blank lines of a file, without their newline.
type lineReader struct {
	name  string
	f     fs.File
	gz    *gzip.Reader
	r     *bufio.Reader
	buf   []byte
	line  int64 // 1-based number of the last line returned
	atEOF bool
}

func (jf *jsonlFile) lines() (*lineReader, error) {
	f, err := jf.open(jf.name)
	if err != nil {
		return nil, fmt.Errorf("dataset: %w", err)
	}
	lr := &lineReader{name: jf.name, f: f}
	var src io.Reader = f
	if jf.gz {
		lr.gz, err = gzip.NewReader(f)
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("dataset: %s: not a gzip file: %w", jf.name, err)
		}
		src = lr.gz
	}
	lr.r = bufio.NewReaderSize(src, 64<<10)
	lines.SkipBOM(lr.r) // as editors on Windows write it
	return lr, nil
}

func (lr *lineReader) at() int64 { return lr.line }

func (lr *lineReader) close() {
	if lr.gz != nil {
		lr.gz.Close()
	}
	lr.f.Close()
}

// next returns the next non-blank line; it is valid until the next call.
func (lr *lineReader) next() ([]byte, error) {
	for {
		if lr.atEOF {
			return nil, io.EOF
		}
		lr.buf = lr.buf[:0]
		for {
			chunk, err := lr.r.ReadSlice('\n')
			lr.buf = append(lr.buf, chunk...)
			if len(lr.buf) > maxLineBytes+1 {
				// An endless line (no newline: a binary file, a stream)
				// would otherwise fill memory.
				return nil, fmt.Errorf("dataset: %s: %w", lr.name, &lines.TooLongError{Line: lr.line + 1, Max: maxLineBytes})
			}
			if err == bufio.ErrBufferFull {
				continue
			}
			if err == io.EOF {
				lr.atEOF = true
				break
			}
			if err != nil {
				if lr.gz != nil && errors.Is(err, io.ErrUnexpectedEOF) {
					err = fmt.Errorf("the gzip stream ends early (a truncated file?): %w", err)
				}
				return nil, fmt.Errorf("dataset: %s: line %d: %w", lr.name, lr.line+1, err)
			}
			break
		}
		if lr.atEOF && len(lr.buf) == 0 {
			return nil, io.EOF
		}
		lr.line++
		if line := bytes.TrimSpace(lr.buf); len(line) > 0 {
			return line, nil
		}
	}
}
