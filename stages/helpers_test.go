package stages

import (
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/memory"
	"github.com/apache/arrow-go/v18/parquet"
	"github.com/apache/arrow-go/v18/parquet/pqarrow"

	"gemmaft/dataset"
	"gemmaft/pipeline"
)

type testRun struct {
	t     testing.TB
	dir   string
	store *pipeline.Store
	log   *slog.Logger // the runs' logger; nil: none
}

func newTestRun(t testing.TB) *testRun {
	t.Helper()
	dir := t.TempDir()
	st, err := pipeline.OpenStore(filepath.Join(dir, "cache"))
	if err != nil {
		t.Fatal(err)
	}
	return &testRun{t: t, dir: dir, store: st}
}

func (r *testRun) spec(content string) string {
	r.t.Helper()
	p := filepath.Join(r.dir, "spec.yaml")
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		r.t.Fatal(err)
	}
	return p
}

// run loads and runs spec; load errors are returned as they are.
func (r *testRun) run(spec string, opts pipeline.Options) (*pipeline.RunRecord, error) {
	dag, err := loadSpec(spec, Registry())
	if err != nil {
		return nil, err
	}
	return (&pipeline.Engine{Store: r.store, Log: r.log}).Run(context.Background(), dag, opts)
}

// plan loads spec and plans the whole DAG over the run's cache.
func (r *testRun) plan(spec string) *pipeline.Plan {
	r.t.Helper()
	dag, err := loadSpec(spec, Registry())
	if err != nil {
		r.t.Fatal(err)
	}
	plan, err := r.store.Plan(dag, pipeline.Options{})
	if err != nil {
		r.t.Fatal(err)
	}
	return plan
}

// table opens the cached table of a stage in a run record.
func (r *testRun) table(rec *pipeline.RunRecord, stage string) *dataset.IPCReader {
	r.t.Helper()
	for _, s := range rec.Stages {
		if s.Name == stage {
			rd, err := dataset.OpenIPC(filepath.Join(r.store.EntryDir(s.Key), pipeline.TableFile))
			if err != nil {
				r.t.Fatal(err)
			}
			return rd
		}
	}
	r.t.Fatalf("no stage %s", stage)
	return nil
}

// forEach calls fn for every batch of a table.
func forEach(t testing.TB, rd *dataset.IPCReader, fn func(arrow.RecordBatch)) {
	t.Helper()
	defer rd.Close()
	for {
		rec, err := rd.Next()
		if err == io.EOF {
			return
		}
		if err != nil {
			t.Fatal(err)
		}
		fn(rec)
		rec.Release()
	}
}

// entries counts committed cache entries.
func (r *testRun) entries() int {
	keys, err := r.store.Keys()
	if err != nil {
		r.t.Fatal(err)
	}
	return len(keys)
}

// writeParquet writes one record batch as a Parquet file.
func writeParquet(t testing.TB, path string, rec arrow.RecordBatch) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	w, err := pqarrow.NewFileWriter(rec.Schema(), f, parquet.NewWriterProperties(), pqarrow.DefaultWriterProps())
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Write(rec); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
}

// stringBatch builds a batch of string columns from rows of values.
func stringBatch(names []string, rows ...[]string) arrow.RecordBatch {
	fields := make([]arrow.Field, len(names))
	for i, n := range names {
		fields[i] = arrow.Field{Name: n, Type: arrow.BinaryTypes.String}
	}
	b := array.NewRecordBuilder(memory.DefaultAllocator, arrow.NewSchema(fields, nil))
	defer b.Release()
	for _, row := range rows {
		for i, v := range row {
			b.Field(i).(*array.StringBuilder).Append(v)
		}
	}
	return b.NewRecordBatch()
}

// loadSpec loads the spec at path as a run of all its stages plans it:
// every stage prepared, what each reads found (pipeline.Load leaves that
// to the plans that need the stage).
func loadSpec(path string, reg *pipeline.Registry) (*pipeline.DAG, error) {
	dag, err := pipeline.Load(path, reg)
	if err != nil {
		return nil, err
	}
	if err := dag.Check(pipeline.Options{}); err != nil {
		return nil, err
	}
	return dag, nil
}
