package dataset

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"strconv"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/ipc"
	"github.com/apache/arrow-go/v18/parquet"
	"github.com/apache/arrow-go/v18/parquet/compress"
	"github.com/apache/arrow-go/v18/parquet/pqarrow"
)

// Records is a stream of record batches of one schema, as an IPCReader
// reads them: Next returns io.EOF after the last, and the caller releases
// each batch.
type Records interface {
	Schema() *arrow.Schema
	Next() (arrow.RecordBatch, error)
}

// Converted is r with each batch passed through convert, of schema s.
func Converted(r Records, s *arrow.Schema, convert func(arrow.RecordBatch) (arrow.RecordBatch, error)) Records {
	return converted{r, s, convert}
}

type converted struct {
	r       Records
	s       *arrow.Schema
	convert func(arrow.RecordBatch) (arrow.RecordBatch, error)
}

func (c converted) Schema() *arrow.Schema { return c.s }

func (c converted) Next() (arrow.RecordBatch, error) {
	rec, err := c.r.Next()
	if err != nil {
		return nil, err
	}
	defer rec.Release()
	return c.convert(rec)
}

// ExportJSONL writes the rows of r to w as JSON lines: one object per row
// with the keys in schema order, strings as JSON strings (HTML characters
// such as "<" left as they are, since chat text is full of them), lists as
// arrays and nulls as null. It returns the number of rows written.
func ExportJSONL(w io.Writer, r Records) (int64, error) {
	bw := bufio.NewWriterSize(w, 1<<20)
	enc := newRowEncoder(r.Schema())
	var rows int64
	var line []byte
	for {
		rec, err := r.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return rows, err
		}
		for i := range int(rec.NumRows()) {
			line = append(enc.appendRow(line[:0], rec, i), '\n')
			if _, err := bw.Write(line); err != nil {
				rec.Release()
				return rows, err
			}
			rows++
		}
		rec.Release()
	}
	return rows, bw.Flush()
}

// rowEncoder appends the rows of records of one schema as JSON objects,
// the keys in schema order.
type rowEncoder struct {
	enc  *jsonEncoder
	keys [][]byte // each field's name as a JSON string, and the colon
}

func newRowEncoder(schema *arrow.Schema) *rowEncoder {
	r := &rowEncoder{enc: newJSONEncoder(), keys: make([][]byte, schema.NumFields())}
	for i, f := range schema.Fields() {
		r.keys[i] = append(r.enc.appendString(nil, f.Name), ':')
	}
	return r
}

func (r *rowEncoder) appendRow(dst []byte, rec arrow.RecordBatch, i int) []byte {
	dst = append(dst, '{')
	for c, col := range rec.Columns() {
		if c > 0 {
			dst = append(dst, ',')
		}
		dst = append(dst, r.keys[c]...)
		dst = r.enc.appendValue(dst, col, i)
	}
	return append(dst, '}')
}

// jsonEncoder appends Arrow values as JSON.
type jsonEncoder struct {
	buf bytes.Buffer
	enc *json.Encoder
}

func newJSONEncoder() *jsonEncoder {
	e := &jsonEncoder{}
	e.enc = json.NewEncoder(&e.buf)
	e.enc.SetEscapeHTML(false)
	return e
}

func (e *jsonEncoder) appendString(dst []byte, s string) []byte {
	e.buf.Reset()
	e.enc.Encode(s) // cannot fail for a string
	return append(dst, bytes.TrimSuffix(e.buf.Bytes(), []byte("\n"))...)
}

func (e *jsonEncoder) appendValue(dst []byte, a arrow.Array, i int) []byte {
	if a.IsNull(i) {
		return append(dst, "null"...)
	}
	switch c := a.(type) {
	case *array.String:
		return e.appendString(dst, c.Value(i))
	case *array.LargeString:
		return e.appendString(dst, c.Value(i))
	case *array.StringView:
		return e.appendString(dst, c.Value(i))
	case *array.Int8:
		return strconv.AppendInt(dst, int64(c.Value(i)), 10)
	case *array.Int16:
		return strconv.AppendInt(dst, int64(c.Value(i)), 10)
	case *array.Int32:
		return strconv.AppendInt(dst, int64(c.Value(i)), 10)
	case *array.Int64:
		return strconv.AppendInt(dst, c.Value(i), 10)
	case *array.Uint8:
		return strconv.AppendUint(dst, uint64(c.Value(i)), 10)
	case *array.Uint16:
		return strconv.AppendUint(dst, uint64(c.Value(i)), 10)
	case *array.Uint32:
		return strconv.AppendUint(dst, uint64(c.Value(i)), 10)
	case *array.Uint64:
		return strconv.AppendUint(dst, c.Value(i), 10)
	case *array.Float32:
		return appendFloat(dst, float64(c.Value(i)), 32)
	case *array.Float64:
		return appendFloat(dst, c.Value(i), 64)
	case *array.Boolean:
		return strconv.AppendBool(dst, c.Value(i))
	case array.ListLike:
		start, end := c.ValueOffsets(i)
		values := c.ListValues()
		dst = append(dst, '[')
		for j := start; j < end; j++ {
			if j > start {
				dst = append(dst, ',')
			}
			dst = e.appendValue(dst, values, int(j))
		}
		return append(dst, ']')
	case *array.Struct:
		st := c.DataType().(*arrow.StructType)
		dst = append(dst, '{')
		for f := range c.NumField() {
			if f > 0 {
				dst = append(dst, ',')
			}
			dst = append(e.appendString(dst, st.Field(f).Name), ':')
			dst = e.appendValue(dst, c.Field(f), i)
		}
		return append(dst, '}')
	}
	b, err := json.Marshal(a.GetOneForMarshal(i))
	if err != nil {
		return append(dst, "null"...)
	}
	return append(dst, b...)
}

// appendFloat writes NaN and infinities, which JSON cannot express, as null.
func appendFloat(dst []byte, v float64, bits int) []byte {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return append(dst, "null"...)
	}
	return strconv.AppendFloat(dst, v, 'g', -1, bits)
}

// ExportParquet writes the rows of r to w as a Snappy-compressed Parquet
// file, one row group per record batch, with the Arrow schema stored so
// that Arrow readers get the same types back. It returns the number of
// rows written.
func ExportParquet(w io.Writer, r Records) (int64, error) {
	props := parquet.NewWriterProperties(parquet.WithCompression(compress.Codecs.Snappy))
	// The Parquet writer closes a sink that is an io.Closer; the caller owns w.
	sink := struct{ io.Writer }{w}
	fw, err := pqarrow.NewFileWriter(r.Schema(), sink, props, pqarrow.NewArrowWriterProperties(pqarrow.WithStoreSchema()))
	if err != nil {
		return 0, fmt.Errorf("dataset: writing Parquet: %w", err)
	}
	return writeBatches(fw, r, "Parquet")
}

// ExportIPC writes the rows of r to w as an Arrow IPC file. It returns the
// number of rows written.
func ExportIPC(w io.Writer, r Records) (int64, error) {
	fw, err := ipc.NewFileWriter(w, ipc.WithSchema(r.Schema()))
	if err != nil {
		return 0, fmt.Errorf("dataset: writing Arrow IPC: %w", err)
	}
	return writeBatches(fw, r, "Arrow IPC")
}

// batchWriter is a file writer of record batches: Parquet's or Arrow IPC's.
type batchWriter interface {
	Write(arrow.RecordBatch) error
	Close() error
}

// writeBatches writes every batch of r with fw and closes it, returning
// the rows written; format names the file's format in errors.
func writeBatches(fw batchWriter, r Records, format string) (int64, error) {
	var rows int64
	for {
		rec, err := r.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			fw.Close()
			return rows, err
		}
		err = fw.Write(rec)
		rows += rec.NumRows()
		rec.Release()
		if err != nil {
			fw.Close()
			return rows, fmt.Errorf("dataset: writing %s: %w", format, err)
		}
	}
	if err := fw.Close(); err != nil {
		return rows, fmt.Errorf("dataset: writing %s: %w", format, err)
	}
	return rows, nil
}
