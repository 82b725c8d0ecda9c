package stages

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"gemmaft/internal/testenv"
	"gemmaft/pipeline"
)

// FuzzLoadSpec feeds whole specs to the loader with every stage kind
// registered. Whatever the bytes, Load returns a DAG or spec errors (exit
// 2) that name the spec file and a line inside it, never panics, never
// blocks, and a DAG it returns is ready to plan: every stage prepared, its
// canonical parameters valid JSON, its needs before it.
//
// The seeds are the example DAGs and the committed corpus in
// testdata/fuzz/FuzzLoadSpec, run by `go test` like any test; fuzz with
//
//	go test ./stages -run '^$' -fuzz FuzzLoadSpec
func FuzzLoadSpec(f *testing.F) {
	dags, _ := filepath.Glob(filepath.Join(testenv.RepoRoot(f), "dags", "*.yaml"))
	for _, d := range dags {
		b, err := os.ReadFile(d)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(string(b))
	}
	dir := f.TempDir()
	os.WriteFile(filepath.Join(dir, "a.jsonl"), []byte(`{"instruction": "Selam ver", "input": "", "output": "Merhaba."}`+"\n"), 0o644)
	os.WriteFile(filepath.Join(dir, "tok.json"), []byte("{}"), 0o644)
	os.MkdirAll(filepath.Join(dir, "model"), 0o755)
	os.WriteFile(filepath.Join(dir, "model", "config.json"), []byte("{}"), 0o644)
	os.WriteFile(filepath.Join(dir, "model", "model.safetensors"), []byte("{}"), 0o644)
	path := filepath.Join(dir, "spec.yaml")
	reg := Registry()
	f.Fuzz(func(t *testing.T, spec string) {
		if err := os.WriteFile(path, []byte(spec), 0o644); err != nil {
			t.Fatal(err)
		}
		type result struct {
			dag *pipeline.DAG
			err error
		}
		done := make(chan result, 1)
		go func() {
			dag, err := loadSpec(path, reg)
			done <- result{dag, err}
		}()
		var r result
		select {
		case r = <-done:
		case <-time.After(20 * time.Second):
			t.Fatalf("Load blocked on:\n%s", spec)
		}
		if r.err != nil {
			checkSpecError(t, path, spec, r.err)
			return
		}
		seen := map[string]bool{}
		for _, n := range r.dag.Nodes {
			if n.Runner == nil || n.Kind == nil {
				t.Fatalf("stage %s not prepared", n.Name)
			}
			if !json.Valid(n.Canon) {
				t.Fatalf("stage %s: canonical parameters %q are not JSON", n.Name, n.Canon)
			}
			for _, d := range n.Needs {
				if !seen[d.Name] {
					t.Fatalf("stage %s comes before its need %s", n.Name, d.Name)
				}
			}
			seen[n.Name] = true
		}
	})
}

// checkSpecError: a spec problem is a spec error naming the file, at a line
// of it, with a message.
func checkSpecError(t *testing.T, path, spec string, err error) {
	t.Helper()
	if !pipeline.IsSpecError(err) {
		t.Fatalf("not a spec error (would not exit 2): %T %v", err, err)
	}
	var errs pipeline.SpecErrors
	var one *pipeline.SpecError
	switch {
	case errors.As(err, &errs):
	case errors.As(err, &one):
		errs = pipeline.SpecErrors{one}
	}
	// YAML breaks lines at \n, \r\n and a lone \r.
	lines := strings.Count(strings.ReplaceAll(spec, "\r\n", "\n"), "\n") + strings.Count(strings.ReplaceAll(spec, "\r\n", ""), "\r") + 1
	for _, e := range errs {
		if e.File != path || e.Msg == "" {
			t.Fatalf("error without file or message: %+v", e)
		}
		if e.Line < 0 || e.Line > lines {
			t.Fatalf("error at line %d of a %d-line spec: %v", e.Line, lines, e)
		}
	}
}
