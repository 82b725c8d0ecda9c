package dataset

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"slices"
	"sort"
	"strings"
	"unicode/utf8"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/memory"
	"github.com/apache/arrow-go/v18/parquet"
	"github.com/apache/arrow-go/v18/parquet/file"
	"github.com/apache/arrow-go/v18/parquet/metadata"
	"github.com/apache/arrow-go/v18/parquet/pqarrow"

	"gemmaft/internal/lines"
)

// parquetReadBuffer bounds what is read from the file at once: column chunks
// are streamed through a buffer of this size instead of being loaded whole,
// so memory does not grow with the row group size of the file.
const parquetReadBuffer = 1 << 20

// parquetBatchRows is the number of rows decoded per Arrow batch.
const parquetBatchRows = 1024

type parquetFile struct {
	open   openFunc
	name   string
	meta   *metadata.FileMetaData
	mem    memory.Allocator
	want   []string // file column names, in record order
	absent []bool   // of want: an optional column the file does not have, read as ""
	system bool     // the file has a system column that want does not read
	input  string   // a column that looks like the input, when the file has no input column
	leaves []int    // leaf column indices to read, deduplicated
	bytes  int64
	// conv, for conversations, names the list column and its fields;
	// convJSON says the column is text holding the list as JSON.
	conv     *convFields
	convJSON bool
}

// openParquet opens the Parquet file at path to read the columns want;
// optional, when not "", is one of them that the file may lack (Alpaca's
// input), which then reads as "" as a JSON record without the field does.
func openParquet(open openFunc, path string, want []string, optional string, conv *convFields, mem memory.Allocator, named map[string]string) (*parquetFile, error) {
	pf := &parquetFile{open: open, name: path, mem: mem, want: want, absent: make([]bool, len(want)), conv: conv}
	f, err := pf.openFile()
	if err != nil {
		return nil, err
	}
	defer f.Close()
	rdr, err := openParquetReader(f, nil)
	if err != nil {
		return nil, fmt.Errorf("dataset: %s: not a readable Parquet file (corrupt or truncated?): %w", path, err)
	}
	pf.meta = rdr.MetaData()
	fr, err := pqarrow.NewFileReader(rdr, pqarrow.ArrowReadProperties{}, mem)
	if err != nil {
		return nil, fmt.Errorf("dataset: %s: reading the Parquet schema: %w", path, err)
	}

	byName := map[string]*pqarrow.SchemaField{}
	var names []string
	for i := range fr.Manifest.Fields {
		sf := &fr.Manifest.Fields[i]
		byName[sf.Field.Name] = sf
		names = append(names, sf.Field.Name)
	}
	seen := map[int]bool{}
	leaf := func(sf *pqarrow.SchemaField) {
		if !seen[sf.ColIndex] {
			seen[sf.ColIndex] = true
			pf.leaves = append(pf.leaves, sf.ColIndex)
		}
		for rg := range pf.meta.NumRowGroups() {
			if cc, err := pf.meta.RowGroup(rg).ColumnChunk(sf.ColIndex); err == nil {
				pf.bytes += cc.TotalUncompressedSize()
			}
		}
	}
	for i, name := range want {
		sf, ok := byName[name]
		if !ok && name == optional {
			pf.absent[i] = true
			continue
		}
		if !ok {
			return nil, fmt.Errorf("dataset: %s: no column %q; the file has columns %s%s", path, name, quoteList(names), fieldHint(names, name, conv != nil, named[name], want))
		}
		if !sf.IsLeaf() || !isStringType(sf.Field.Type) {
			return nil, fmt.Errorf("dataset: %s: column %q has type %s, not string", path, name, sf.Field.Type)
		}
		leaf(sf)
	}
	if conv != nil {
		sf, ok := byName[conv.list]
		if !ok {
			return nil, fmt.Errorf("dataset: %s: no column %q; the file has columns %s%s", path, conv.list, quoteList(names), fieldHint(names, conv.list, true, named[conv.list], want))
		}
		leaves, err := conversationLeaves(sf, conv)
		switch {
		case err != nil:
			return nil, fmt.Errorf("dataset: %s: column %q: %w", path, conv.list, err)
		case leaves == nil: // text holding JSON
			pf.convJSON = true
			leaf(sf)
		default:
			for _, l := range leaves {
				leaf(l)
			}
		}
	}
	sort.Ints(pf.leaves)
	_, hasSystem := byName[ColSystem]
	pf.system = hasSystem && !slices.Contains(want, ColSystem)
	if i := slices.Index(want, optional); i >= 0 && pf.absent[i] {
		pf.input = unreadInput(names, want)
	}
	return pf, nil
}

func (pf *parquetFile) unreadSystem() bool  { return pf.system }
func (pf *parquetFile) unreadInput() string { return pf.input }

// parquetSource is what the Parquet reader needs of a file.
type parquetSource interface {
	fs.File
	io.ReaderAt
	io.Seeker
}

func (pf *parquetFile) openFile() (parquetSource, error) {
	f, err := pf.open(pf.name)
	if err != nil {
		return nil, fmt.Errorf("dataset: %w", err)
	}
	src, ok := f.(parquetSource)
	if !ok {
		f.Close()
		return nil, fmt.Errorf("dataset: %s: the file system gives no random access, which Parquet needs", pf.name)
	}
	return src, nil
}

// openParquetReader opens a Parquet reader that streams column chunks; meta,
// when known, spares parsing the footer again. Malformed footers can make
// the library panic; that becomes an error.
func openParquetReader(f parquet.ReaderAtSeeker, meta *metadata.FileMetaData) (rdr *file.Reader, err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("%v", p)
		}
	}()
	props := parquet.NewReaderProperties(memory.DefaultAllocator)
	props.BufferedStreamEnabled = true
	props.BufferSize = parquetReadBuffer
	opts := []file.ReadOption{file.WithReadProps(props)}
	if meta != nil {
		opts = append(opts, file.WithMetadata(meta))
	}
	return file.NewParquetReader(f, opts...)
}

// conversationLeaves finds the leaves of a conversation column: a list of
// structs with a string role and a content that is a string or a list of
// text parts (structs with string fields "type" and "text", as Hugging Face
// datasets store OpenAI's parts); none for a string column holding the
// list as JSON.
func conversationLeaves(sf *pqarrow.SchemaField, conv *convFields) (leaves []*pqarrow.SchemaField, err error) {
	role, content, err := conversationFields(sf, conv)
	if err != nil || role == nil {
		return nil, err
	}
	if isStringType(content.Field.Type) {
		return []*pqarrow.SchemaField{role, content}, nil
	}
	typ, text := textPartFields(content)
	return []*pqarrow.SchemaField{role, typ, text}, nil
}

// textPartFields returns the type and text fields of a content given as a
// list of parts, or nil, nil when it is not one.
func textPartFields(content *pqarrow.SchemaField) (typ, text *pqarrow.SchemaField) {
	elem := structElem(content)
	if elem == nil {
		return nil, nil
	}
	for i := range elem.Children {
		c := &elem.Children[i]
		if !c.IsLeaf() || !isStringType(c.Field.Type) {
			continue
		}
		switch c.Field.Name {
		case "type":
			typ = c
		case "text":
			text = c
		}
	}
	if typ == nil || text == nil {
		return nil, nil
	}
	return typ, text
}

// structElem is the element of a list of structs, or nil when sf is not one.
func structElem(sf *pqarrow.SchemaField) *pqarrow.SchemaField {
	switch sf.Field.Type.ID() {
	case arrow.LIST, arrow.LARGE_LIST:
	default:
		return nil
	}
	if len(sf.Children) != 1 || sf.Children[0].Field.Type.ID() != arrow.STRUCT {
		return nil
	}
	return &sf.Children[0]
}

// conversationFields finds the role and content fields of a conversation
// column (nil, nil for a string column holding the list as JSON).
func conversationFields(sf *pqarrow.SchemaField, conv *convFields) (role, content *pqarrow.SchemaField, err error) {
	if sf.IsLeaf() && isStringType(sf.Field.Type) {
		return nil, nil, nil
	}
	elem := structElem(sf)
	if elem == nil {
		return nil, nil, fmt.Errorf("has type %s; want a list of structs with string fields %q and %q, or text holding that list as JSON", sf.Field.Type, conv.role, conv.content)
	}
	for i := range elem.Children {
		c := &elem.Children[i]
		switch c.Field.Name {
		case conv.role:
			role = c
		case conv.content:
			content = c
		}
	}
	for _, f := range []struct {
		sf   *pqarrow.SchemaField
		name string
	}{{role, conv.role}, {content, conv.content}} {
		if f.sf == nil {
			var have []string
			for _, c := range elem.Children {
				have = append(have, c.Field.Name)
			}
			return nil, nil, fmt.Errorf("its messages have no field %q; they have %s (map names with columns:)", f.name, quoteList(have))
		}
		if f.sf == content {
			if typ, _ := textPartFields(content); typ != nil {
				continue
			}
		}
		if !f.sf.IsLeaf() || !isStringType(f.sf.Field.Type) {
			return nil, nil, fmt.Errorf("field %q of its messages has type %s, not string or a list of text parts (only text content is supported)", f.name, f.sf.Field.Type)
		}
	}
	return role, content, nil
}

func isStringType(t arrow.DataType) bool {
	switch t.ID() {
	case arrow.STRING, arrow.LARGE_STRING, arrow.STRING_VIEW:
		return true
	case arrow.DICTIONARY:
		return isStringType(t.(*arrow.DictionaryType).ValueType)
	}
	return false
}

func quoteList(names []string) string {
	q := make([]string, len(names))
	for i, n := range names {
		q[i] = fmt.Sprintf("%q", n)
	}
	return strings.Join(q, ", ")
}

func (pf *parquetFile) path() string     { return pf.name }
func (pf *parquetFile) numRows() int64   { return pf.meta.NumRows }
func (pf *parquetFile) textBytes() int64 { return pf.bytes }
func (pf *parquetFile) close() error     { return nil }

// scan reads the file one row group at a time, in batches of parquetBatchRows.
func (pf *parquetFile) scan(ctx context.Context, file int32, base int64, want func(int64) bool, yield func(record) bool) (rows int64, stopped bool, err error) {
	f, err := pf.openFile()
	if err != nil {
		return 0, false, err
	}
	defer f.Close()
	rdr, err := openParquetReader(f, pf.meta)
	if err != nil {
		return 0, false, fmt.Errorf("dataset: %s: %w", pf.name, err)
	}
	fr, err := pqarrow.NewFileReader(rdr, pqarrow.ArrowReadProperties{BatchSize: parquetBatchRows}, pf.mem)
	if err != nil {
		return 0, false, fmt.Errorf("dataset: %s: %w", pf.name, err)
	}
	for rg := range pf.meta.NumRowGroups() {
		if err := ctx.Err(); err != nil {
			return rows, false, err
		}
		n, stop, err := pf.scanRowGroup(ctx, fr, rg, file, base+rows, rows, want, yield)
		if err != nil || stop {
			return rows + n, stop, err
		}
		rows += n
	}
	return rows, false, nil
}

func (pf *parquetFile) scanRowGroup(ctx context.Context, fr *pqarrow.FileReader, rg int, file int32, base, fileRow int64, want func(int64) bool, yield func(record) bool) (rows int64, stopped bool, err error) {
	// The decoder can panic on corrupt pages; report it as the corrupt data
	// it is, naming the row group.
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("dataset: %s: row group %d: corrupt data: %v", pf.name, rg, p)
		}
	}()
	rr, err := fr.GetRecordReader(ctx, pf.leaves, []int{rg})
	if err != nil {
		return 0, false, fmt.Errorf("dataset: %s: row group %d: %w", pf.name, rg, err)
	}
	defer rr.Release()
	cols := make([]stringValues, len(pf.want))
	var conv convColumn
	for {
		rec, err := rr.Read()
		if err == io.EOF {
			break
		}
		if err != nil {
			return rows, false, fmt.Errorf("dataset: %s: row group %d: %w", pf.name, rg, err)
		}
		sc := rec.Schema()
		for i, name := range pf.want {
			if pf.absent[i] {
				cols[i] = noValues
				continue
			}
			idx := sc.FieldIndices(name)
			if len(idx) == 0 {
				return rows, false, fmt.Errorf("dataset: %s: row group %d: column %q missing from the decoded batch", pf.name, rg, name)
			}
			cols[i], err = newStringValues(rec.Column(idx[0]))
			if err != nil {
				return rows, false, fmt.Errorf("dataset: %s: column %q: %w", pf.name, name, err)
			}
		}
		if pf.conv != nil {
			idx := sc.FieldIndices(pf.conv.list)
			if len(idx) == 0 {
				return rows, false, fmt.Errorf("dataset: %s: row group %d: column %q missing from the decoded batch", pf.name, rg, pf.conv.list)
			}
			if conv, err = newConvColumn(rec.Column(idx[0]), pf.conv, pf.convJSON); err != nil {
				return rows, false, fmt.Errorf("dataset: %s: column %q: %w", pf.name, pf.conv.list, err)
			}
		}
		for i := range int(rec.NumRows()) {
			if !want(base + rows) {
				rows++
				continue
			}
			r := record{file: file, pos: fileRow + rows}
			for c, col := range cols {
				if col.null(i) {
					r.null |= 1 << c
				}
				v := col.value(i)
				if !utf8.ValidString(v) {
					return rows, false, fmt.Errorf("dataset: %s: row index %d, column %s: invalid UTF-8 at byte %d",
						pf.name, fileRow+rows, pf.want[c], lines.InvalidUTF8At(v))
				}
				// Copy: the batch's buffers are reused once it is released.
				r.v[c] = strings.Clone(v)
			}
			if pf.conv != nil {
				msgs, null, err := conv.messages(i)
				if errors.As(err, new(flawError)) {
					r.flaw = err // the conversation's: invalid: drop may drop it
				} else if err != nil {
					return rows, false, fmt.Errorf("dataset: %s: row index %d, %w", pf.name, fileRow+rows, err)
				}
				r.setMessages(msgs, null)
			}
			rows++
			if !yield(r) {
				return rows, true, nil
			}
		}
	}
	if want := pf.meta.RowGroup(rg).NumRows(); rows != want {
		return rows, false, fmt.Errorf("dataset: %s: row group %d: decoded %d rows, the footer says %d (corrupt file?)", pf.name, rg, rows, want)
	}
	return rows, false, nil
}

// stringValues reads the text of a string column of any Arrow layout; a null
// reads as "".
type stringValues struct {
	arr  interface{ Value(int) string }
	dict *array.Dictionary
	null func(int) bool
}

// noValues are the values of a column the file does not have: "" in
// every row, none of them null.
var noValues = stringValues{arr: emptyStrings{}, null: func(int) bool { return false }}

type emptyStrings struct{}

func (emptyStrings) Value(int) string { return "" }

func newStringValues(a arrow.Array) (stringValues, error) {
	switch c := a.(type) {
	case *array.String:
		return stringValues{arr: c, null: c.IsNull}, nil
	case *array.LargeString:
		return stringValues{arr: c, null: c.IsNull}, nil
	case *array.StringView:
		return stringValues{arr: c, null: c.IsNull}, nil
	case *array.Dictionary:
		inner, err := newStringValues(c.Dictionary())
		if err != nil {
			return stringValues{}, err
		}
		return stringValues{arr: inner.arr, dict: c, null: c.IsNull}, nil
	}
	return stringValues{}, errors.New("type " + a.DataType().String() + " is not string")
}

func (v stringValues) value(i int) string {
	if v.null(i) {
		return ""
	}
	if v.dict != nil {
		return v.arr.Value(v.dict.GetValueIndex(i))
	}
	return v.arr.Value(i)
}

// convColumn reads the conversations of a decoded Parquet column.
type convColumn struct {
	conv          *convFields
	json          stringValues // a text column holding JSON
	isJSON        bool
	list          array.ListLike
	elems         *array.Struct
	role, content stringValues
	// A content given as a list of text parts: the lists, and their
	// parts' type and text.
	parts              array.ListLike
	partType, partText stringValues
}

func newConvColumn(a arrow.Array, conv *convFields, isJSON bool) (convColumn, error) {
	c := convColumn{conv: conv, isJSON: isJSON}
	if isJSON {
		var err error
		c.json, err = newStringValues(a)
		return c, err
	}
	list, ok := a.(array.ListLike)
	if !ok {
		return c, fmt.Errorf("decoded as %s, not a list", a.DataType())
	}
	elems, ok := list.ListValues().(*array.Struct)
	if !ok {
		return c, fmt.Errorf("decoded as %s, not a list of structs", a.DataType())
	}
	st := elems.DataType().(*arrow.StructType)
	ri, ok1 := st.FieldIdx(conv.role)
	ci, ok2 := st.FieldIdx(conv.content)
	if !ok1 || !ok2 {
		return c, fmt.Errorf("decoded as %s, without the fields %q and %q", a.DataType(), conv.role, conv.content)
	}
	var err error
	if c.role, err = newStringValues(elems.Field(ri)); err != nil {
		return c, err
	}
	c.list, c.elems = list, elems
	if parts, ok := elems.Field(ci).(array.ListLike); ok {
		return c, c.setParts(parts)
	}
	c.content, err = newStringValues(elems.Field(ci))
	return c, err
}

// setParts reads contents given as lists of text parts.
func (c *convColumn) setParts(parts array.ListLike) error {
	st, ok := parts.ListValues().(*array.Struct)
	if !ok {
		return fmt.Errorf("content decoded as %s, not a list of parts", parts.DataType())
	}
	ti, ok1 := st.DataType().(*arrow.StructType).FieldIdx("type")
	xi, ok2 := st.DataType().(*arrow.StructType).FieldIdx("text")
	if !ok1 || !ok2 {
		return fmt.Errorf("content decoded as %s, without the fields \"type\" and \"text\"", parts.DataType())
	}
	var err error
	if c.partType, err = newStringValues(st.Field(ti)); err != nil {
		return err
	}
	if c.partText, err = newStringValues(st.Field(xi)); err != nil {
		return err
	}
	c.parts = parts
	return nil
}

// contentParts returns the texts of message k's content, given as a list
// of parts (nil for a null list), checked as the JSON reader checks them.
func (c convColumn) contentParts(k int) ([]string, error) {
	if c.parts.IsNull(k) {
		return nil, nil
	}
	start, end := c.parts.ValueOffsets(k)
	out := make([]string, 0, end-start)
	for j := start; j < end; j++ {
		at := int(j - start)
		if typ := c.partType.value(int(j)); typ != "text" {
			return nil, fmt.Errorf("part %d is of type %q; only text parts are supported", at, typ)
		}
		if c.partText.null(int(j)) {
			return nil, fmt.Errorf("part %d has no text string", at)
		}
		text := c.partText.value(int(j))
		if !utf8.ValidString(text) {
			return nil, fmt.Errorf("part %d: invalid UTF-8 at byte %d", at, lines.InvalidUTF8At(text))
		}
		out = append(out, strings.Clone(text))
	}
	return out, nil
}

// messages returns row i's messages, copied out of the batch; null says
// the list itself was null.
func (c convColumn) messages(i int) (msgs []rawMessage, null bool, err error) {
	if c.isJSON {
		if c.json.null(i) {
			return nil, true, nil
		}
		text := c.json.value(i)
		if !json.Valid([]byte(text)) { // a text column holds the conversation as JSON
			return nil, false, fmt.Errorf("column %s: a text column read as a JSON list of messages, and this row's text is not JSON", c.conv.list)
		}
		msgs, err := c.conv.parseJSONMessages([]byte(text))
		return msgs, false, err
	}
	if c.list.IsNull(i) {
		return nil, true, nil
	}
	start, end := c.list.ValueOffsets(i)
	msgs = make([]rawMessage, 0, end-start)
	for j := start; j < end; j++ {
		k := int(j)
		at := int(j - start)
		if c.elems.IsNull(k) {
			return nil, false, flaw("column %s: message %d is null", c.conv.list, at)
		}
		if c.role.null(k) {
			return nil, false, flaw("column %s: message %d has a null %s", c.conv.list, at, c.conv.role)
		}
		var m rawMessage
		if c.parts != nil {
			parts, err := c.contentParts(k)
			if err != nil {
				return nil, false, flaw("column %s: message %d, field %s: %w", c.conv.list, at, c.conv.content, err)
			}
			m = rawMessage{parts: parts, null: parts == nil}
		} else {
			m = rawMessage{content: strings.Clone(c.content.value(k)), null: c.content.null(k)}
		}
		m.role = strings.Clone(c.role.value(k))
		for _, v := range [2]struct{ name, s string }{{c.conv.role, m.role}, {c.conv.content, m.content}} {
			if !utf8.ValidString(v.s) {
				return nil, false, fmt.Errorf("column %s: message %d, field %s: invalid UTF-8 at byte %d", c.conv.list, at, v.name, lines.InvalidUTF8At(v.s))
			}
		}
		msgs = append(msgs, m)
	}
	return msgs, false, nil
}
