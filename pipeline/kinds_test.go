package pipeline

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/memory"
)

// Test kinds: small stages that exercise the engine without any real data
// library.

var testSchema = arrow.NewSchema([]arrow.Field{
	{Name: "i", Type: arrow.PrimitiveTypes.Int64},
	{Name: "s", Type: arrow.BinaryTypes.String},
}, nil)

func testRegistry() *Registry {
	r := NewRegistry()
	r.Register("gen", &genKind{version: 1})
	r.Register("double", doubleKind{})
	r.Register("concat", concatKind{})
	r.Register("count", countKind{})
	r.Register("fail", failKind{})
	r.Register("resume", resumeKind{})
	r.Register("chunks", chunksKind{})
	return r
}

// gen writes rows i = 0..rows-1 with s = "<prefix><i>", where prefix is the
// content of `file` when given.
type genKind struct{ version int }

type genParams struct {
	Rows    int    `json:"rows"`
	Batch   int    `json:"batch"`
	File    string `json:"file,omitempty"`
	DelayMs int    `json:"delay_ms"`
	// Tags change nothing but the key; Files adds that many small files
	// to the entry.
	Tags  []string `json:"tags,omitempty"`
	Files int      `json:"files,omitempty"`
}

// genRevision, when set, is the Revision of gen's parameters.
var genRevision func(*genParams) int

func (p *genParams) Revision() int {
	if genRevision == nil {
		return 0
	}
	return genRevision(p)
}

func (g *genKind) Version() int       { return g.version }
func (g *genKind) Inputs() (int, int) { return 0, 0 }
func (g *genKind) Params() any        { return &genParams{Rows: 100, Batch: 10} }
func (p *genParams) Validate() error {
	if p.Rows < 0 {
		return &ParamError{Param: "rows", Msg: "must not be negative", Fix: "write a row count such as 100"}
	}
	if p.Batch <= 0 {
		return &ParamError{Param: "batch", Msg: "must be positive"}
	}
	return nil
}

func (g *genKind) Prepare(params any, dir string) (Runner, error) {
	p := params.(*genParams)
	s := &genStage{p: p}
	if p.File != "" {
		s.path = p.File
		if !filepath.IsAbs(s.path) {
			s.path = filepath.Join(dir, s.path)
		}
		if _, err := os.Stat(s.path); err != nil {
			return nil, &ParamError{Param: "file", Msg: err.Error(), Fix: "point file at an existing file"}
		}
	}
	return s, nil
}

type genStage struct {
	p    *genParams
	path string
}

func (s *genStage) Files() []string {
	if s.path == "" {
		return nil
	}
	return []string{s.path}
}

// genRuns counts gen computations in this process, for tests.
var genRuns atomic.Int64

func (s *genStage) Run(ctx context.Context, t *Task) error {
	genRuns.Add(1)
	prefix := ""
	if s.path != "" {
		// Hash-only source files can be huge (the benchmark's); read a little.
		f, err := os.Open(s.path)
		if err != nil {
			return err
		}
		buf := make([]byte, 16)
		n, _ := io.ReadFull(f, buf)
		f.Close()
		prefix = string(buf[:n])
	}
	t.SetTotal(int64(s.p.Rows))
	out, err := t.Output(testSchema)
	if err != nil {
		return err
	}
	for start := 0; start < s.p.Rows; start += s.p.Batch {
		end := min(start+s.p.Batch, s.p.Rows)
		b := array.NewRecordBuilder(memory.DefaultAllocator, testSchema)
		for i := start; i < end; i++ {
			b.Field(0).(*array.Int64Builder).Append(int64(i))
			b.Field(1).(*array.StringBuilder).Append(fmt.Sprintf("%s%d", prefix, i))
		}
		rec := b.NewRecordBatch()
		b.Release()
		err := out.Write(rec)
		rec.Release()
		if err != nil {
			return err
		}
		if s.p.DelayMs > 0 {
			select {
			case <-time.After(time.Duration(s.p.DelayMs) * time.Millisecond):
			case <-ctx.Done():
				return ctx.Err()
			}
		}
	}
	for i := 0; i < s.p.Files; i++ {
		if err := os.WriteFile(filepath.Join(t.Dir, fmt.Sprintf("f%05d", i)), []byte("x"), 0o644); err != nil {
			return err
		}
	}
	t.SetStat("rows", s.p.Rows)
	return nil
}

// double streams its input, doubling i and upper-casing s.
type doubleKind struct{}

type doubleParams struct {
	Factor  int `json:"factor"`
	DelayMs int `json:"delay_ms"`
}

func (doubleKind) Version() int       { return 1 }
func (doubleKind) Inputs() (int, int) { return 1, 1 }
func (doubleKind) Params() any        { return &doubleParams{Factor: 2} }
func (doubleKind) Prepare(params any, _ string) (Runner, error) {
	return &doubleStage{p: params.(*doubleParams)}, nil
}

type doubleStage struct{ p *doubleParams }

func (*doubleStage) Files() []string { return nil }
func (s *doubleStage) Run(ctx context.Context, t *Task) error {
	out, err := t.Output(testSchema)
	if err != nil {
		return err
	}
	for {
		rec, err := t.Inputs[0].Next(ctx)
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		is := rec.Column(0).(*array.Int64)
		ss := rec.Column(1).(*array.String)
		b := array.NewRecordBuilder(memory.DefaultAllocator, testSchema)
		for i := 0; i < int(rec.NumRows()); i++ {
			b.Field(0).(*array.Int64Builder).Append(is.Value(i) * int64(s.p.Factor))
			b.Field(1).(*array.StringBuilder).Append(strings.ToUpper(ss.Value(i)))
		}
		rec.Release()
		nr := b.NewRecordBatch()
		b.Release()
		err = out.Write(nr)
		nr.Release()
		if err != nil {
			return err
		}
		if s.p.DelayMs > 0 {
			time.Sleep(time.Duration(s.p.DelayMs) * time.Millisecond)
		}
	}
}

// concat appends all its inputs, in order.
type concatKind struct{}

type noParams struct{}

func (concatKind) Version() int       { return 1 }
func (concatKind) Inputs() (int, int) { return 2, -1 }
func (concatKind) Params() any        { return &noParams{} }
func (concatKind) Prepare(any, string) (Runner, error) {
	return concatStage{}, nil
}

type concatStage struct{}

func (concatStage) Files() []string { return nil }
func (concatStage) Run(ctx context.Context, t *Task) error {
	out, err := t.Output(testSchema)
	if err != nil {
		return err
	}
	for _, in := range t.Inputs {
		for {
			rec, err := in.Next(ctx)
			if err == io.EOF {
				break
			}
			if err != nil {
				return err
			}
			err = out.Write(rec)
			rec.Release()
			if err != nil {
				return err
			}
		}
	}
	return nil
}

// count reads its input's entry as files and writes count.txt: a stage
// with no table, like a trainer writing an adapter.
type countKind struct{}

func (countKind) Version() int       { return 1 }
func (countKind) Inputs() (int, int) { return 1, 1 }
func (countKind) Params() any        { return &noParams{} }
func (countKind) Prepare(any, string) (Runner, error) {
	return countStage{}, nil
}

type countStage struct{}

func (countStage) Files() []string { return nil }
func (countStage) Run(ctx context.Context, t *Task) error {
	dir, err := t.Inputs[0].Dir(ctx)
	if err != nil {
		return err
	}
	m, err := ReadManifest(dir)
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(t.Dir, "count.txt"), []byte(fmt.Sprintln(m.Rows)), 0o644)
}

// fail reads after_batches batches of its input, then fails (or panics).
type failKind struct{}

type failParams struct {
	AfterBatches int  `json:"after_batches"`
	Panic        bool `json:"panic"`
	NoSpace      bool `json:"no_space"` // fail as a full disk does
}

func (failKind) Version() int       { return 1 }
func (failKind) Inputs() (int, int) { return 1, 1 }
func (failKind) Params() any        { return &failParams{} }
func (failKind) Prepare(p any, _ string) (Runner, error) {
	return failStage{p: p.(*failParams)}, nil
}

type failStage struct{ p *failParams }

var errPlanned = errors.New("planned failure")

func (failStage) Files() []string { return nil }
func (s failStage) Run(ctx context.Context, t *Task) error {
	if _, err := t.Output(testSchema); err != nil {
		return err
	}
	for i := 0; i < s.p.AfterBatches; i++ {
		rec, err := t.Inputs[0].Next(ctx)
		if err != nil {
			return err
		}
		rec.Release()
	}
	if s.p.Panic {
		var m map[string]int
		m["boom"]++
	}
	if s.p.NoSpace {
		return &fs.PathError{Op: "write", Path: filepath.Join(t.Dir, "data.arrow"), Err: syscall.ENOSPC}
	}
	return errPlanned
}

// resume counts its attempts in its scratch folder and fails until the
// third, like a trainer resuming from checkpoints.
type resumeKind struct{}

func (resumeKind) Version() int       { return 1 }
func (resumeKind) Inputs() (int, int) { return 0, 0 }
func (resumeKind) Params() any        { return &noParams{} }
func (resumeKind) Prepare(any, string) (Runner, error) {
	return resumeStage{}, nil
}

type resumeStage struct{}

func (resumeStage) Files() []string { return nil }

// ResumePoint: the attempts counted so far, if any.
func (resumeStage) ResumePoint(scratch string) string {
	if data, _ := os.ReadFile(filepath.Join(scratch, "attempts")); len(data) > 0 {
		return fmt.Sprintf("%d attempts made", len(data))
	}
	return ""
}
func (resumeStage) Run(ctx context.Context, t *Task) error {
	dir, err := t.Scratch()
	if err != nil {
		return err
	}
	state := filepath.Join(dir, "attempts")
	data, _ := os.ReadFile(state)
	attempts := len(data) + 1
	if err := os.WriteFile(state, []byte(strings.Repeat("x", attempts)), 0o644); err != nil {
		return err
	}
	if attempts < 3 {
		return fmt.Errorf("attempt %d interrupted", attempts)
	}
	return os.WriteFile(filepath.Join(t.Dir, "attempts.txt"), []byte(fmt.Sprint(attempts)), 0o644)
}

// chunks reads its file through Task.Open in reads of 4 bytes (or, with
// random: true, with ReadAt from the end backwards), calling chunkHook
// after each, and writes one row per chunk. With by_path it reads the file
// with os.ReadFile instead and calls Task.CheckFiles afterwards.
type chunksKind struct{}

type chunksParams struct {
	File   string `json:"file"`
	Random bool   `json:"random"`
	ByPath bool   `json:"by_path"`
}

// chunkHook, when set, runs after each chunk a chunks stage reads (i counts
// from 0); tests use it to change the file mid-read.
var chunkHook func(i int)

func (chunksKind) Version() int       { return 1 }
func (chunksKind) Inputs() (int, int) { return 0, 0 }
func (chunksKind) Params() any        { return &chunksParams{} }
func (chunksKind) Prepare(params any, dir string) (Runner, error) {
	p := params.(*chunksParams)
	return &chunksStage{p: p, path: filepath.Join(dir, p.File)}, nil
}

type chunksStage struct {
	p    *chunksParams
	path string
}

func (s *chunksStage) Files() []string { return []string{s.path} }
func (s *chunksStage) Run(ctx context.Context, t *Task) error {
	var chunks []string
	hook := func(i int) {
		if chunkHook != nil {
			chunkHook(i)
		}
	}
	switch {
	case s.p.ByPath:
		data, err := os.ReadFile(s.path)
		if err != nil {
			return err
		}
		chunks = append(chunks, string(data))
		if err := t.CheckFiles(s.path); err != nil {
			return err
		}
		hook(0)
	case s.p.Random:
		f, err := t.Open(s.path)
		if err != nil {
			return err
		}
		fi, _ := f.Stat()
		for off, i := fi.Size(), 0; off > 0; i++ {
			n := min(off, 4)
			off -= n
			buf := make([]byte, n)
			if _, err := f.ReadAt(buf, off); err != nil {
				f.Close()
				return err
			}
			chunks = append(chunks, string(buf))
			hook(i)
		}
		if err := f.Close(); err != nil {
			return err
		}
	default:
		f, err := t.Open(s.path)
		if err != nil {
			return err
		}
		defer f.Close()
		for i := 0; ; i++ {
			buf := make([]byte, 4)
			n, err := f.Read(buf)
			if n > 0 {
				chunks = append(chunks, string(buf[:n]))
				hook(i)
			}
			if err == io.EOF {
				break
			}
			if err != nil {
				return err
			}
		}
	}
	out, err := t.Output(testSchema)
	if err != nil {
		return err
	}
	b := array.NewRecordBuilder(memory.DefaultAllocator, testSchema)
	defer b.Release()
	for i, c := range chunks {
		b.Field(0).(*array.Int64Builder).Append(int64(i))
		b.Field(1).(*array.StringBuilder).Append(c)
	}
	rec := b.NewRecordBatch()
	defer rec.Release()
	return out.Write(rec)
}
