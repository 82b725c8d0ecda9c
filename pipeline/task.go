package pipeline

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/ipc"

	"gemmaft/dataset"
)

// TableFile is the file that holds a stage's table inside its cache entry
// (what Task.Output writes): an Arrow IPC file, which dataset.OpenIPC,
// pyarrow, polars and DuckDB open as it is.
const TableFile = "data.arrow"

// A Task is what a stage's Run gets: its inputs, a place for its outputs,
// and ways to report.
type Task struct {
	Name string
	// Key is the stage's cache key: what the processes computing one stage
	// together (the ranks of a training run) must agree on.
	Key    string
	Inputs []*Input
	// Dir is the entry being written. Files the stage puts here become part
	// of its cached output; the engine hashes and commits them.
	Dir string
	Log *slog.Logger

	scratch string
	tracker *Tracker
	ctx     context.Context
	outs    []stream
	keyed   []*keyedFile           // the files of the key, as hashed
	inputs  map[string]*inputCheck // by path, what the stage read of them
	plan    *Plan                  // the run's, for FilesWithDigest

	mu    sync.Mutex
	out   *Output
	stats map[string]any
}

// Scratch returns a folder that survives an interrupted attempt at this
// stage and is removed once its entry is committed: the place for resumable
// state such as training checkpoints. A new attempt with the same key finds
// what the last one left there.
func (t *Task) Scratch() (string, error) {
	return t.scratch, os.MkdirAll(t.scratch, 0o755)
}

// SetStat records a statistic for the manifest and the run report. Values
// must encode as JSON (numbers, strings, small maps and lists).
func (t *Task) SetStat(name string, value any) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.stats[name] = value
}

// SetTotal says how many rows the stage expects to produce (or, for a stage
// with inputs, to read), for the progress display's ETA.
func (t *Task) SetTotal(rows int64) { t.tracker.total.Store(rows) }

// Report sets the progress of a stage whose work is counted in other units
// than rows (training steps), with a short note for the display.
func (t *Task) Report(done, total int64, unit, note string) {
	t.tracker.Report(done, total, unit, note)
}

// StartCount is Report that starts the count's clock at done, so that the
// rate and ETA time only what is counted from now on (see
// Tracker.StartCount).
func (t *Task) StartCount(done, total int64, unit, note string) {
	t.tracker.StartCount(done, total, unit, note)
}

// Output starts the stage's table with the given schema. Every stage that
// produces rows calls it once, before its first row, even for an empty table.
func (t *Task) Output(schema *arrow.Schema) (*Output, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.out != nil {
		return nil, errors.New("Output called twice")
	}
	f, err := os.Create(filepath.Join(t.Dir, TableFile))
	if err != nil {
		return nil, err
	}
	h := sha256.New()
	cw := &countingWriter{w: io.MultiWriter(f, h)}
	w, err := ipc.NewFileWriter(cw, ipc.WithSchema(schema))
	if err != nil {
		f.Close()
		return nil, err
	}
	t.out = &Output{task: t, file: f, hash: h, counter: cw, w: w}
	return t.out, nil
}

// An Output is a stage's table: every batch written goes into the entry's
// Arrow file and, at the same time, to the stages streaming from it.
type Output struct {
	task    *Task
	file    *os.File
	hash    hash.Hash
	counter *countingWriter
	w       *ipc.FileWriter
	rows    int64
}

// Write appends a batch. It blocks while a streaming consumer is behind
// (backpressure) and returns the context's error if the run is canceled.
// The caller keeps its own reference to rec.
func (o *Output) Write(rec arrow.RecordBatch) error {
	if err := o.w.Write(rec); err != nil {
		return err
	}
	o.rows += rec.NumRows()
	tr := o.task.tracker
	tr.rowsOut.Add(rec.NumRows())
	tr.bytes.Store(o.counter.n)
	for _, s := range o.task.outs {
		rec.Retain()
		select {
		case s.ch <- rec:
		case <-s.gone: // the consumer stopped (it failed): nobody reads
			rec.Release()
		case <-o.task.ctx.Done():
			rec.Release()
			return context.Cause(o.task.ctx)
		}
	}
	return nil
}

// Rows is the number of rows written so far.
func (o *Output) Rows() int64 { return o.rows }

func (o *Output) close() (string, error) {
	if err := o.w.Close(); err != nil {
		o.file.Close()
		return "", err
	}
	if err := o.file.Close(); err != nil {
		return "", err
	}
	return hex.EncodeToString(o.hash.Sum(nil)), nil
}

func (o *Output) abort() { o.file.Close() }

type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// An Input is one upstream stage's output as a stage reads it: either a
// live stream from a stage computing in the same run, or its cached entry.
type Input struct {
	Name string // the upstream stage
	Kind string // its kind, which says what its entry holds

	store     *Store
	dir       string
	committed chan struct{}
	ch        chan arrow.RecordBatch // nil: read the committed entry
	ctx       context.Context
	tracker   *Tracker // the reading stage's
	upstream  *Tracker // the producing stage's, when it computes in this run
	knownRows int64    // rows of a cached upstream

	table *dataset.IPCReader // the committed entry's table, once opened
	eof   bool

	waited atomic.Int64 // nanoseconds spent waiting for the entry's commit
}

// Next returns the next batch of the input, or io.EOF after the last. The
// caller owns the batch and releases it when done.
func (in *Input) Next(ctx context.Context) (arrow.RecordBatch, error) {
	if in.eof {
		return nil, io.EOF
	}
	if in.ch != nil {
		select {
		case rec, ok := <-in.ch:
			if !ok {
				in.eof = true
				return nil, io.EOF
			}
			in.tracker.rowsIn.Add(rec.NumRows())
			return rec, nil
		case <-ctx.Done():
			return nil, context.Cause(ctx)
		}
	}
	if in.table == nil {
		if err := in.open(ctx); err != nil {
			return nil, err
		}
	}
	// The reader hands each batch over to the caller, so a consumer
	// downstream may hold it past the next call.
	rec, err := in.table.Next()
	if err == io.EOF {
		in.eof = true
		in.table.Close()
		return nil, io.EOF
	}
	if err != nil {
		return nil, fmt.Errorf("reading the table of stage %s: %w", in.Name, err)
	}
	in.tracker.rowsIn.Add(rec.NumRows())
	return rec, nil
}

func (in *Input) open(ctx context.Context) error {
	path, err := in.TablePath(ctx)
	if err != nil {
		return err
	}
	t, err := dataset.OpenIPC(path)
	if err != nil {
		return fmt.Errorf("reading the table of stage %s: %w", in.Name, err)
	}
	in.table = t
	return nil
}

// Dir waits until the upstream entry is committed and returns its folder,
// for stages that read an input's files rather than its rows (a model
// checkpoint). Its rows need not be read then.
func (in *Input) Dir(ctx context.Context) (string, error) {
	if in.ch != nil {
		// Nobody will read the stream; keep it flowing so the producer
		// can finish.
		ch, ctx := in.ch, in.ctx
		go func() {
			for {
				select {
				case rec, ok := <-ch:
					if !ok {
						return
					}
					rec.Release()
				case <-ctx.Done():
					return
				}
			}
		}()
		in.ch, in.eof = nil, false
	}
	select {
	case <-in.committed:
		return in.dir, nil
	default:
	}
	began := time.Now()
	defer func() { in.waited.Add(int64(time.Since(began))) }()
	defer in.tracker.waitFor(in.Name)()
	select {
	case <-in.committed:
		return in.dir, nil
	case <-ctx.Done():
		return "", context.Cause(ctx)
	}
}

// TablePath waits until the upstream entry is committed and returns the
// path of its table (TableFile), for stages that read the rows in an order
// of their own, such as training reading packed rows at random.
func (in *Input) TablePath(ctx context.Context) (string, error) {
	dir, err := in.Dir(ctx)
	if err != nil {
		return "", err
	}
	path := filepath.Join(dir, TableFile)
	if _, err := os.Stat(path); errors.Is(err, fs.ErrNotExist) {
		return "", fmt.Errorf("stage %s (%s) produced no table (%s)", in.Name, in.Kind, TableFile)
	}
	return path, nil
}

// Lineage waits until the upstream entry is committed and returns its
// manifest and those of every entry upstream of it that the cache still
// holds, nearest first: what a stage needs to describe its input's making
// (a model card names the training settings and the data).
func (in *Input) Lineage(ctx context.Context) ([]*Manifest, error) {
	first, err := in.Manifest(ctx)
	if err != nil {
		return nil, err
	}
	return in.store.Lineage(first, in.Name)
}

// Manifest waits until the upstream entry is committed and returns its
// manifest alone: its parameters, files and statistics.
func (in *Input) Manifest(ctx context.Context) (*Manifest, error) {
	dir, err := in.Dir(ctx)
	if err != nil {
		return nil, err
	}
	m, err := ReadManifest(dir)
	if err != nil {
		return nil, fmt.Errorf("stage %s: %w", in.Name, err)
	}
	return m, nil
}

// Lineage returns first, the manifest of stage name's entry, and the
// manifests of every entry upstream of it that the store still holds,
// nearest first.
func (s *Store) Lineage(first *Manifest, name string) ([]*Manifest, error) {
	out := []*Manifest{first}
	seen := map[string]bool{first.Key: true}
	for i := 0; i < len(out); i++ {
		for _, ref := range out[i].Inputs {
			if seen[ref.Key] {
				continue
			}
			seen[ref.Key] = true
			m, err := ReadManifest(s.EntryDir(ref.Key))
			if errors.Is(err, fs.ErrNotExist) {
				continue // collected since; what it made is still here
			}
			if err != nil {
				return nil, fmt.Errorf("stage %s, upstream of %s: %w", ref.Stage, name, err)
			}
			out = append(out, m)
		}
	}
	return out, nil
}

// Rows is the number of rows the input will have, when already known.
func (in *Input) Rows() (int64, bool) {
	if in.upstream != nil {
		if in.upstream.done.Load() {
			return in.upstream.rowsOut.Load(), true
		}
		if t := in.upstream.total.Load(); t >= 0 {
			return t, true
		}
		return 0, false
	}
	return in.knownRows, in.knownRows > 0 || in.ch == nil
}

// drain reads what the stage left of a streamed input.
func (in *Input) drain(ctx context.Context) error {
	if in.ch == nil {
		if in.table != nil && !in.eof {
			in.table.Close()
		}
		return nil
	}
	for !in.eof {
		rec, err := in.Next(ctx)
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		rec.Release()
	}
	return nil
}
