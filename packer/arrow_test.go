package packer

import (
	"slices"
	"strings"
	"testing"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/memory"
)

func TestRecordBatchRoundTrip(t *testing.T) {
	rows := []Row{
		{InputIDs: []int32{2, 10, 11, 2, 12, 0}, Labels: []int32{-100, 10, 11, -100, 12, -100}, PositionIDs: []int32{0, 1, 2, 0, 1, 0}, SeqLengths: []int32{3, 2}},
		{InputIDs: []int32{2, 5, 6, 7, 8, 9}, Labels: []int32{-100, -100, 6, 7, 8, 9}, PositionIDs: []int32{0, 1, 2, 3, 4, 5}, SeqLengths: []int32{6}},
	}
	rec := NewRecordBatch(nil, rows)
	defer rec.Release()
	if !rec.Schema().Equal(Schema()) || rec.NumRows() != 2 {
		t.Fatalf("schema %v, %d rows", rec.Schema(), rec.NumRows())
	}
	for i, want := range rows {
		got, err := RowAt(rec, i)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(got.InputIDs, want.InputIDs) || !slices.Equal(got.Labels, want.Labels) ||
			!slices.Equal(got.PositionIDs, want.PositionIDs) || !slices.Equal(got.SeqLengths, want.SeqLengths) {
			t.Errorf("row %d: %+v, want %+v", i, got, want)
		}
	}
	if _, err := RowAt(rec, 2); err == nil {
		t.Error("row out of range accepted")
	}
	other := array.NewRecordBuilder(memory.DefaultAllocator, arrow.NewSchema([]arrow.Field{{Name: "text", Type: arrow.BinaryTypes.String}}, nil))
	defer other.Release()
	other.Field(0).(*array.StringBuilder).Append("x")
	bad := other.NewRecordBatch()
	defer bad.Release()
	if _, err := RowAt(bad, 0); err == nil || !strings.Contains(err.Error(), "not a packed batch") {
		t.Errorf("foreign batch: %v", err)
	}
}

func TestNothingToPack(t *testing.T) {
	p, err := New(Options{SeqLen: 4, Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	p.Add(nil, nil)
	p.Add([]int32{1, 2, 3, 4, 5}, []int32{1, 2, 3, 4, 5})
	p.Add([]int32{1, 2}, []int32{-100, -100})
	_, err = p.Finish(func(Row) error { return nil })
	if err == nil || !strings.Contains(err.Error(), "of 3 examples, 1 were empty, 1 longer than seq_len 4 were dropped and 1 had no trained label") {
		t.Errorf("err = %v", err)
	}
}
