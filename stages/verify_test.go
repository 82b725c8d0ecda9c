package stages

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"gemmaft/internal/testenv"
	"gemmaft/pipeline"
	"gemmaft/trainer"
)

// hookDisplay runs a function once the engine starts computing: after the
// plan hashed every input file for the keys, before any stage reads one.
type hookDisplay func()

func (h hookDisplay) Start([]*pipeline.Tracker) func() { h(); return func() {} }

// runHooked runs spec with hook called between planning and computing.
func (r *testRun) runHooked(spec string, hook func()) (*pipeline.RunRecord, error) {
	dag, err := loadSpec(spec, Registry())
	if err != nil {
		return nil, err
	}
	return (&pipeline.Engine{Store: r.store, Progress: hookDisplay(hook)}).Run(context.Background(), dag, pipeline.Options{})
}

// swap replaces path with a file holding data, as rsync and downloads
// finish: a new file renamed over the old one.
func swap(t testing.TB, path string, data []byte) {
	t.Helper()
	if err := os.WriteFile(path+".part", data, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(path+".part", path); err != nil {
		t.Fatal(err)
	}
}

// wantInputChanged checks that a run failed on path changing and
// committed nothing.
func (r *testRun) wantInputChanged(err error, path string) {
	r.t.Helper()
	var ce *pipeline.InputChangedError
	if !errors.As(err, &ce) || ce.Path != path {
		r.t.Fatalf("want the run to fail on %s changing, got %v", path, err)
	}
	if !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "nothing was cached") {
		r.t.Errorf("message does not name the file: %v", err)
	}
}

// TestSourceReplacedDuringRun: a data file replaced after the plan hashed
// it (an rsync finishing mid-run) fails the stage naming it, and caches
// nothing; once the original is back, a run computes its rows. Before, the
// new file's rows were cached under the original's key and later served as
// "cached" with rows from no current input.
func TestSourceReplacedDuringRun(t *testing.T) {
	for _, format := range []string{"jsonl", "parquet"} {
		t.Run(format, func(t *testing.T) {
			r := newTestRun(t)
			data := filepath.Join(r.dir, "a."+format)
			write := func(output string) []byte {
				if format == "jsonl" {
					return []byte(`{"instruction": "Başkent?", "input": "", "output": "` + output + `"}` + "\n")
				}
				rec := stringBatch([]string{"instruction", "input", "output"}, []string{"Başkent?", "", output})
				defer rec.Release()
				writeParquet(t, data+".tmp", rec)
				b, _ := os.ReadFile(data + ".tmp")
				os.Remove(data + ".tmp")
				return b
			}
			original, other := write("Ankara."), write("İstanbul.")
			swap(t, data, original)
			spec := r.spec(fmt.Sprintf("name: s\nstages:\n  src: {kind: %s, with: {paths: [a.%s]}}\n  chat: {kind: chat_template, needs: [src]}\n", format, format))
			_, err := r.runHooked(spec, func() { swap(t, data, other) })
			r.wantInputChanged(err, data)
			if n := r.entries(); n != 0 {
				t.Fatalf("%d entries committed", n)
			}
			swap(t, data, original)
			rec, err := r.run(spec, pipeline.Options{})
			if err != nil {
				t.Fatal(err)
			}
			if rec.Stages[0].State != "computed" {
				t.Fatalf("source is %s after the original came back", rec.Stages[0].State)
			}
			rows := readChat(t, r, rec, "chat")
			if len(rows) != 1 || !strings.Contains(rows[0].text, "Ankara.") {
				t.Errorf("rows: %+v", rows)
			}
		})
	}
}

// TestTokenizerReplacedDuringRun: the same for the tokenizer file.
func TestTokenizerReplacedDuringRun(t *testing.T) {
	real := testenv.GemmaFile(t, "tokenizer.json")
	r := newTestRun(t)
	orig, err := os.ReadFile(real)
	if err != nil {
		t.Fatal(err)
	}
	tok := filepath.Join(r.dir, "tokenizer.json")
	swap(t, tok, orig)
	os.WriteFile(filepath.Join(r.dir, "a.jsonl"), []byte(`{"instruction": "Selam ver", "input": "", "output": "Merhaba."}`+"\n"), 0o644)
	spec := r.spec("name: s\nstages:\n  src: {kind: jsonl, with: {paths: [a.jsonl]}}\n  chat: {kind: chat_template, needs: [src]}\n  tokens: {kind: tokenize, needs: [chat], with: {tokenizer: tokenizer.json}}\n")
	// Another valid tokenizer.json: the same one with one more trailing byte.
	_, err = r.runHooked(spec, func() { swap(t, tok, append(append([]byte{}, orig...), '\n')) })
	r.wantInputChanged(err, tok)
	if _, err := r.run(spec, pipeline.Options{}); err != nil {
		t.Fatalf("a run with the new file in place: %v", err)
	}
}

// TestModelReplacedDuringRun: a base checkpoint replaced between the plan
// and its loading fails the qlora stage before it trains, naming the file,
// instead of training the new weights under the old weights' key.
func TestModelReplacedDuringRun(t *testing.T) {
	r := newTestRun(t)
	cfg, _ := trainer.Preset("tiny")
	model, other := filepath.Join(r.dir, "model"), filepath.Join(r.dir, "other")
	for i, dir := range []string{model, other} {
		if err := trainer.WriteRandomCheckpoint(dir, cfg, trainer.InitOptions{Seed: uint64(i), DType: "bfloat16"}); err != nil {
			t.Fatal(err)
		}
	}
	spec := trainSpec(t, 2)
	spec = strings.Replace(spec, "needs: [pack, base]", "needs: [pack]", 1)
	spec = strings.Replace(spec, "with: {r: 4,", "with: {model: "+model+", r: 4,", 1)
	path := r.spec(spec)
	weights := filepath.Join(model, "model.safetensors")
	b, err := os.ReadFile(filepath.Join(other, "model.safetensors"))
	if err != nil {
		t.Fatal(err)
	}
	rec, err := r.runHooked(path, func() { swap(t, weights, b) })
	r.wantInputChanged(err, weights)
	for _, s := range rec.Stages {
		if s.Name == "adapter" && s.State != "failed" {
			t.Errorf("adapter %s", s.State)
		}
	}
	if _, err := os.Stat(filepath.Join(r.store.Root, "scratch")); err == nil {
		cks, _ := filepath.Glob(filepath.Join(r.store.Root, "scratch", "*", "checkpoints", "step-*"))
		if len(cks) != 0 {
			t.Errorf("checkpoints written from the wrong weights: %v", cks)
		}
	}
}
