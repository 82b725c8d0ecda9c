package stages

import (
	"context"
	"io"

	"github.com/apache/arrow-go/v18/arrow"

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
