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
// stage's single input, in order. The stage writes about a row per row
// read, so it expects its input's rows once their count is known: a stage
// reading it as it streams can then show a total and a time left.
func mapBatches(ctx context.Context, t *pipeline.Task, schema *arrow.Schema, fn func(arrow.RecordBatch) (arrow.RecordBatch, error)) error {
	out, err := t.Output(schema)
	if err != nil {
		return err
	}
	totalKnown := false
	return eachBatch(ctx, t.Inputs[0], func(rec arrow.RecordBatch) error {
		if !totalKnown {
			if n, ok := t.Inputs[0].Rows(); ok {
				t.SetTotal(n)
				totalKnown = true
			}
		}
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

// typedColumn returns the column called name of a batch read from in as a
// T (see columnIndex for want); typeName says what T is in the error, and
// fits, when set, checks what the Go type does not (a list's elements).
func typedColumn[T arrow.Array](in *pipeline.Input, rec arrow.RecordBatch, name, want, typeName string, fits func(T) bool) (T, error) {
	var zero T
	i, err := columnIndex(in, rec, name, want)
	if err != nil {
		return zero, err
	}
	c, ok := rec.Column(i).(T)
	if !ok || fits != nil && !fits(c) {
		return zero, fmt.Errorf("column %q of stage %s is %s, want %s", name, in.Name, rec.Column(i).DataType(), typeName)
	}
	return c, nil
}

// stringColumn returns the column called name as utf8 text.
func stringColumn(in *pipeline.Input, rec arrow.RecordBatch, name, want string) (*array.String, error) {
	return typedColumn[*array.String](in, rec, name, want, "utf8", nil)
}

// boolColumn returns the column called name as bools.
func boolColumn(in *pipeline.Input, rec arrow.RecordBatch, name, want string) (*array.Boolean, error) {
	return typedColumn[*array.Boolean](in, rec, name, want, "bool", nil)
}

// int32Lists returns the column called name as a list<int32> array.
func int32Lists(in *pipeline.Input, rec arrow.RecordBatch, name, want string) (*array.List, error) {
	return typedColumn(in, rec, name, want, "list<int32>", func(l *array.List) bool {
		return l.DataType().(*arrow.ListType).Elem().ID() == arrow.INT32
	})
}
