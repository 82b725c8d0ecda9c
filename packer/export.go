package packer

import (
	"fmt"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/memory"
)

// ColAttentionMask is the column an export adds to rows of token ids.
const ColAttentionMask = "attention_mask"

// ExportView is how rows of token ids are written for other trainers to
// read: an attention_mask column (int8) after labels, 1 on the tokens of
// the row's examples and 0 on a packed row's padding, as a Hugging Face
// tokenizer pads (Axolotl's pre-tokenized sets need the column); and a
// packed row's padding as the last entry of its seq_lengths, so that the
// lengths sum to the row's, as TRL's collator rebuilds position_ids from
// them (the padding's own position_ids already restart at 0). In the
// cache seq_lengths lists the examples alone, which the trainer reads as
// padding what is left of the row.
//
// It returns the schema of the rows written and the conversion of a
// record batch to it (the caller releases both batches). A table without
// an input_ids list<int32> column is not one of token ids: ok is false.
func ExportView(s *arrow.Schema) (out *arrow.Schema, convert func(arrow.RecordBatch) (arrow.RecordBatch, error), ok bool) {
	ids, lens := int32ListField(s, ColInputIDs), int32ListField(s, ColSeqLengths)
	if ids < 0 || s.HasField(ColAttentionMask) {
		return s, nil, false
	}
	fields := make([]arrow.Field, 0, s.NumFields()+1)
	maskAt := ids + 1 // after input_ids, or after labels where they follow
	if int32ListField(s, ColLabels) == maskAt {
		maskAt++
	}
	for i, f := range s.Fields() {
		if i == maskAt {
			fields = append(fields, arrow.Field{Name: ColAttentionMask, Type: arrow.ListOf(arrow.PrimitiveTypes.Int8)})
		}
		fields = append(fields, f)
	}
	if maskAt == s.NumFields() {
		fields = append(fields, arrow.Field{Name: ColAttentionMask, Type: arrow.ListOf(arrow.PrimitiveTypes.Int8)})
	}
	md := s.Metadata()
	out = arrow.NewSchema(fields, &md)
	convert = func(rec arrow.RecordBatch) (arrow.RecordBatch, error) {
		idCol := rec.Column(ids).(*array.List)
		var lenCol *array.List
		if lens >= 0 {
			lenCol = rec.Column(lens).(*array.List)
		}
		mem := memory.NewGoAllocator()
		mask := array.NewListBuilder(mem, arrow.PrimitiveTypes.Int8)
		defer mask.Release()
		maskValues := mask.ValueBuilder().(*array.Int8Builder)
		var padded *array.ListBuilder
		var paddedValues *array.Int32Builder
		if lenCol != nil {
			padded = array.NewListBuilder(mem, arrow.PrimitiveTypes.Int32)
			defer padded.Release()
			paddedValues = padded.ValueBuilder().(*array.Int32Builder)
		}
		for r := range int(rec.NumRows()) {
			start, end := idCol.ValueOffsets(r)
			n := int(end - start)
			used := n // a row of one example: every token its own
			if lenCol != nil {
				ls := int32Values(lenCol, r)
				used = 0
				for _, l := range ls {
					used += int(l)
				}
				if used > n {
					return nil, fmt.Errorf("row %d: seq_lengths sum to %d, more than its %d tokens", r, used, n)
				}
				padded.Append(true)
				paddedValues.AppendValues(ls, nil)
				if used < n {
					paddedValues.Append(int32(n - used))
				}
			}
			mask.Append(true)
			for j := range n {
				maskValues.Append(int8(boolInt(j < used)))
			}
		}
		maskArr := mask.NewListArray()
		defer maskArr.Release()
		var paddedArr arrow.Array
		if padded != nil {
			paddedArr = padded.NewListArray()
			defer paddedArr.Release()
		}
		cols := make([]arrow.Array, 0, len(fields))
		for i, c := range rec.Columns() {
			if i == maskAt {
				cols = append(cols, maskArr)
			}
			if i == lens {
				c = paddedArr
			}
			cols = append(cols, c)
		}
		if maskAt == len(rec.Columns()) {
			cols = append(cols, maskArr)
		}
		return array.NewRecordBatch(out, cols, rec.NumRows()), nil
	}
	return out, convert, true
}

// int32ListField is the index of s's list<int32> field name, -1 if none.
func int32ListField(s *arrow.Schema, name string) int {
	for _, i := range s.FieldIndices(name) {
		if arrow.TypeEqual(s.Field(i).Type, arrow.ListOf(arrow.PrimitiveTypes.Int32)) {
			return i
		}
	}
	return -1
}

// int32Values are row r's values of a list<int32> column.
func int32Values(l *array.List, r int) []int32 {
	start, end := l.ValueOffsets(r)
	return l.ListValues().(*array.Int32).Int32Values()[start:end]
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}
