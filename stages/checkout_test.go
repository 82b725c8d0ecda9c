package stages

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"gemmaft/internal/testenv"
	"gemmaft/pipeline"
	"gemmaft/trainer"
)

// checkout lays out a copy of a project under r.dir/name, as a second clone
// of a repository is: spec.yaml and, for each path relative to it, a copy of
// a file or folder. The spec names its files by relative paths, so every
// copy's stages have the same keys and share the entries of one cache.
func checkout(t *testing.T, r *testRun, name, spec string, files map[string]string) string {
	t.Helper()
	root := filepath.Join(r.dir, name)
	for rel, from := range files {
		to := filepath.Join(root, rel)
		fi, err := os.Stat(from)
		if err != nil {
			t.Fatal(err)
		}
		if fi.IsDir() {
			err = os.CopyFS(to, os.DirFS(from))
		} else if err = os.MkdirAll(filepath.Dir(to), 0o755); err == nil {
			var b []byte
			if b, err = os.ReadFile(from); err == nil {
				err = os.WriteFile(to, b, 0o644)
			}
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	path := filepath.Join(root, "spec.yaml")
	if err := os.WriteFile(path, []byte(spec), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// checkoutSpec is trainSpec reading the demo records and the tokenizer from
// a checkout's data/ and tok/ (see checkoutFiles).
func checkoutSpec(t *testing.T) string {
	demo := filepath.Join(testenv.RepoRoot(t), "dataset", "demo", "alpaca-tr-demo.jsonl")
	spec := strings.Replace(trainSpec(t, 2), demo, "data/alpaca-tr-demo.jsonl", 1)
	return strings.Replace(spec, testenv.GemmaFile(t, "tokenizer.json"), "tok/tokenizer.json", 1)
}

// checkoutFiles are the files checkoutSpec reads, and extra.
func checkoutFiles(t *testing.T, extra map[string]string) map[string]string {
	files := map[string]string{
		"data/alpaca-tr-demo.jsonl": filepath.Join(testenv.RepoRoot(t), "dataset", "demo", "alpaca-tr-demo.jsonl"),
		"tok/tokenizer.json":        testenv.GemmaFile(t, "tokenizer.json"),
		"tok/tokenizer_config.json": testenv.GemmaFile(t, "tokenizer_config.json"),
	}
	for k, v := range extra {
		files[k] = v
	}
	return files
}

// wantStates checks the states of stages in a run record.
func wantStates(t *testing.T, rec *pipeline.RunRecord, states map[string]string) {
	t.Helper()
	for name, want := range states {
		if got := stageRecord(t, rec, name).State; got != want {
			t.Errorf("stage %s is %s, want %s", name, got, want)
		}
	}
}

// afterRemovedCheckout runs the spec of checkout a up to its adapter,
// removes a, and runs checkout b's in full on the same cache.
func afterRemovedCheckout(t *testing.T, r *testRun, a, b string) *pipeline.RunRecord {
	t.Helper()
	if _, err := r.run(a, pipeline.Options{Until: "adapter"}); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(filepath.Dir(a)); err != nil {
		t.Fatal(err)
	}
	rec, err := r.run(b, pipeline.Options{})
	if err != nil {
		t.Fatalf("running the second checkout after the first was removed: %v", err)
	}
	return rec
}

// TestMergeAfterAnotherCheckoutTokenized: two checkouts share a cache; the
// first trains, and is deleted; the second's merge stage, computed anew,
// ships the second checkout's copy of the tokenizer the cached tokenize
// entry names by the first one's path (a nightly retrain whose cache
// outlives the checkout that filled it).
func TestMergeAfterAnotherCheckoutTokenized(t *testing.T) {
	r := newTestRun(t)
	spec := checkoutSpec(t) + "  merged: {kind: merge, needs: [adapter, base]}\n"
	a := checkout(t, r, "a", spec, checkoutFiles(t, nil))
	b := checkout(t, r, "b", spec, checkoutFiles(t, nil))
	rec := afterRemovedCheckout(t, r, a, b)
	wantStates(t, rec, map[string]string{"tokens": "cached", "adapter": "cached", "merged": "computed"})
	m, err := pipeline.ReadManifest(stageEntry(t, rec, "tokens"))
	if err != nil {
		t.Fatal(err)
	}
	if len(m.Files) != 1 || !strings.HasPrefix(m.Files[0].Path, filepath.Dir(a)+string(filepath.Separator)) {
		t.Fatalf("the tokenize entry should name the first checkout's tokenizer: %+v", m.Files)
	}
	got, _ := os.ReadFile(filepath.Join(stageEntry(t, rec, "merged"), MergedModelDir, "tokenizer.json"))
	want, _ := os.ReadFile(filepath.Join(filepath.Dir(b), "tok", "tokenizer.json"))
	if len(want) == 0 || !bytes.Equal(got, want) {
		t.Error("the merged folder's tokenizer.json is not the one training used")
	}
}

// TestGenerateAfterAnotherCheckoutTrained: as
// TestMergeAfterAnotherCheckoutTokenized, for a generate stage whose base
// checkout and tokenizer come from the adapter's lineage: the qlora and
// tokenize entries name the deleted checkout's folders, and the second
// checkout's copies of them are used.
func TestGenerateAfterAnotherCheckoutTrained(t *testing.T) {
	r := newTestRun(t)
	model := filepath.Join(r.dir, "model")
	cfg, err := trainer.Preset("tiny")
	if err != nil {
		t.Fatal(err)
	}
	if err := trainer.WriteRandomCheckpoint(model, cfg, trainer.InitOptions{Seed: 7, DType: "bfloat16", Std: 0.3}); err != nil {
		t.Fatal(err)
	}
	q := filepath.Join(r.dir, "q.jsonl")
	if err := os.WriteFile(q, []byte(mtQuestions), 0o644); err != nil {
		t.Fatal(err)
	}
	spec := strings.Replace(checkoutSpec(t), "  base: {kind: model, with: {preset: tiny, seed: 7, std: 0.3}}\n", "", 1)
	spec = strings.Replace(spec, "needs: [pack, base]", "needs: [pack]", 1)
	spec = strings.Replace(spec, "with: {r: 4,", "with: {model: model, quantize: none, r: 4,", 1)
	spec += "  questions: {kind: mt_bench, with: {paths: [q.jsonl]}}\n" +
		"  answers: {kind: generate, needs: [questions, adapter], with: {max_new_tokens: 3}}\n"
	files := checkoutFiles(t, map[string]string{"model": model, "q.jsonl": q})
	a := checkout(t, r, "a", spec, files)
	b := checkout(t, r, "b", spec, files)
	rec := afterRemovedCheckout(t, r, a, b)
	wantStates(t, rec, map[string]string{"tokens": "cached", "adapter": "cached", "answers": "computed"})
	if rows := readAnswers(t, r, rec); len(rows) != 3 {
		t.Errorf("%d answered questions, want 3", len(rows))
	}
}

// TestTrainingTokenizerGone: a tokenizer the manifest names that is gone,
// with no copy among the run's inputs, fails naming its path, its digest
// and the fix; one that holds another file now fails as changed.
func TestTrainingTokenizerGone(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "tokenizer.json")
	m := &pipeline.Manifest{Stage: "tokens", Files: []pipeline.FileRef{{Path: path, SHA256: strings.Repeat("ab", 32)}}}
	task := &pipeline.Task{Name: "merged"}
	_, err := trainingTokenizer(task, m)
	if err == nil {
		t.Fatal("a missing tokenizer was accepted")
	}
	for _, w := range []string{path, strings.Repeat("ab", 32), "point stage tokens's tokenizer at a copy"} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("the error lacks %q: %v", w, err)
		}
	}
	if err := os.WriteFile(path, []byte("{}"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err = trainingTokenizer(task, m)
	if want := fmt.Sprintf("%s changed since stage tokens tokenized the training data", path); err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("want %q, got %v", want, err)
	}
}
