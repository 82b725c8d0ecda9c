package packer

import (
	"fmt"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/memory"
)

// Column names of packed rows.
const (
	ColInputIDs    = "input_ids"
	ColLabels      = "labels"
	ColPositionIDs = "position_ids"
	ColSeqLengths  = "seq_lengths"
)

var schema = arrow.NewSchema([]arrow.Field{
	{Name: ColInputIDs, Type: arrow.ListOf(arrow.PrimitiveTypes.Int32)},
	{Name: ColLabels, Type: arrow.ListOf(arrow.PrimitiveTypes.Int32)},
	{Name: ColPositionIDs, Type: arrow.ListOf(arrow.PrimitiveTypes.Int32)},
	{Name: ColSeqLengths, Type: arrow.ListOf(arrow.PrimitiveTypes.Int32)},
}, nil)

// Schema returns the Arrow schema of packed rows: four list<int32> columns.
func Schema() *arrow.Schema { return schema }

// BatchBuilder accumulates rows into an Arrow record batch.
type BatchBuilder struct {
	b      *array.RecordBuilder
	lists  [4]*array.ListBuilder
	values [4]*array.Int32Builder
	rows   int
}

// NewBatchBuilder returns a builder; mem nil means the Go allocator.
func NewBatchBuilder(mem memory.Allocator) *BatchBuilder {
	if mem == nil {
		mem = memory.NewGoAllocator()
	}
	bb := &BatchBuilder{b: array.NewRecordBuilder(mem, schema)}
	for i := range bb.lists {
		bb.lists[i] = bb.b.Field(i).(*array.ListBuilder)
		bb.values[i] = bb.lists[i].ValueBuilder().(*array.Int32Builder)
	}
	return bb
}

// Append copies one row into the batch.
func (bb *BatchBuilder) Append(r Row) {
	for i, col := range [4][]int32{r.InputIDs, r.Labels, r.PositionIDs, r.SeqLengths} {
		bb.lists[i].Append(true)
		bb.values[i].AppendValues(col, nil)
	}
	bb.rows++
}

// Len returns the number of rows appended since the last NewRecordBatch.
func (bb *BatchBuilder) Len() int { return bb.rows }

// NewRecordBatch returns the rows appended so far as a record batch, which
// the caller releases, and resets the builder.
func (bb *BatchBuilder) NewRecordBatch() arrow.RecordBatch {
	bb.rows = 0
	return bb.b.NewRecordBatch()
}

// Release frees the builder's buffers.
func (bb *BatchBuilder) Release() { bb.b.Release() }

// NewRecordBatch builds one record batch from rows.
func NewRecordBatch(mem memory.Allocator, rows []Row) arrow.RecordBatch {
	bb := NewBatchBuilder(mem)
	defer bb.Release()
	for _, r := range rows {
		bb.Append(r)
	}
	return bb.NewRecordBatch()
}

// RowAt returns row i of a record batch of packed rows. The slices share the
// batch's memory and are valid while it is.
func RowAt(rec arrow.RecordBatch, i int) (Row, error) {
	if !rec.Schema().Equal(schema) {
		return Row{}, fmt.Errorf("packer: not a packed batch: schema %s", rec.Schema())
	}
	if i < 0 || int64(i) >= rec.NumRows() {
		return Row{}, fmt.Errorf("packer: row %d out of range [0, %d)", i, rec.NumRows())
	}
	var cols [4][]int32
	for c := range cols {
		list := rec.Column(c).(*array.List)
		start, end := list.ValueOffsets(i)
		cols[c] = list.ListValues().(*array.Int32).Int32Values()[start:end]
	}
	return Row{InputIDs: cols[0], Labels: cols[1], PositionIDs: cols[2], SeqLengths: cols[3]}, nil
}
