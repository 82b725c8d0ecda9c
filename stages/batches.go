package stages

import (
	"context"
	"fmt"
	"io"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"

	"gemmaft/pipeline"
)

// eachBatch calls fn for every batch of in, in order, releasing each after.
func eachBatch(ctx context.Context, in *pipeline.Input, fn func(arrow.RecordBatch) error) error {
	for {
		rec, err := in.Next(ctx)
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		err = fn(rec)
		rec.Release()
		if err != nil {
			return err
		}
	}
}

// mapBatches writes the stage's table with schema: fn of every batch of the
// stage's single input, in order.
func mapBatches(ctx context.Context, t *pipeline.Task, schema *arrow.Schema, fn func(arrow.RecordBatch) (arrow.RecordBatch, error)) error {
	out, err := t.Output(schema)
	if err != nil {
		return err
	}
	return eachBatch(ctx, t.Inputs[0], func(rec arrow.RecordBatch) error {
		nr, err := fn(rec)
		if err != nil {
			return err
		}
		defer nr.Release()
		return out.Write(nr)
	})
}

// columnIndex finds the column called name in a batch read from in. want
// names the kind (or kinds) whose table the reading stage takes, for the
// message when in has no such column.
func columnIndex(in *pipeline.Input, rec arrow.RecordBatch, name, want string) (int, error) {
	idx := rec.Schema().FieldIndices(name)
	if len(idx) != 1 {
		return 0, fmt.Errorf("input stage %s (%s) has no %q column; this stage reads the table of a %s stage", in.Name, in.Kind, name, want)
	}
	return idx[0], nil
}

// stringColumn returns the column called name of a batch read from in as
// utf8 text (see columnIndex for want).
func stringColumn(in *pipeline.Input, rec arrow.RecordBatch, name, want string) (*array.String, error) {
	i, err := columnIndex(in, rec, name, want)
	if err != nil {
		return nil, err
	}
	s, ok := rec.Column(i).(*array.String)
	if !ok {
		return nil, fmt.Errorf("column %q of stage %s is %s, want utf8", name, in.Name, rec.Column(i).DataType())
	}
	return s, nil
}

// boolColumn returns the column called name of a batch read from in as
// bools (see columnIndex for want).
func boolColumn(in *pipeline.Input, rec arrow.RecordBatch, name, want string) (*array.Boolean, error) {
	i, err := columnIndex(in, rec, name, want)
	if err != nil {
		return nil, err
	}
	b, ok := rec.Column(i).(*array.Boolean)
	if !ok {
		return nil, fmt.Errorf("column %q of stage %s is %s, want bool", name, in.Name, rec.Column(i).DataType())
	}
	return b, nil
}

// int32Lists returns the column called name of a batch read from in as a
// list<int32> array (see columnIndex for want).
func int32Lists(in *pipeline.Input, rec arrow.RecordBatch, name, want string) (*array.List, error) {
	i, err := columnIndex(in, rec, name, want)
	if err != nil {
		return nil, err
	}
	l, ok := rec.Column(i).(*array.List)
	if !ok || l.DataType().(*arrow.ListType).Elem().ID() != arrow.INT32 {
		return nil, fmt.Errorf("column %q of stage %s is %s, want list<int32>", name, in.Name, rec.Column(i).DataType())
	}
	return l, nil
}
