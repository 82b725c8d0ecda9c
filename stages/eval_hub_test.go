package stages

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"gemmaft/pipeline"
	"gemmaft/trainer"
)

// TestEvalHub: an eval stage after a qlora stage that trained on hf://
// references finds the base and the tokenizer at the commits training
// read, and reads a question set from the Hub; a `model:` at another
// commit is an adapter for another base.
func TestEvalHub(t *testing.T) {
	f := newHubFixture(t)
	r := newTestRun(t)
	test, err := os.ReadFile(demoFile(t, "mc-tr-test.jsonl"))
	if err != nil {
		t.Fatal(err)
	}
	dev, err := os.ReadFile(demoFile(t, "mc-tr-dev.jsonl"))
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.SplitAfter(string(test), "\n")
	set := f.srv.AddRepo("dataset", "tr/mc")
	setCommit := set.Commit("main", map[string][]byte{"test.jsonl": []byte(strings.Join(lines[:4], "")), "dev.jsonl": dev})
	trained := f.model.Head("main")
	// Training reads the model and the tokenizer pinned to today's commit.
	spec := strings.ReplaceAll(hubSpec, "hf://google/gemma-3-tiny-it", "hf://google/gemma-3-tiny-it@"+trained) + `  eval:
    kind: eval
    needs: [adapter]
    with:
      tasks: [multiple_choice]
      multiple_choice: {paths: ["hf://datasets/tr/mc/test.jsonl"], dev: ["hf://datasets/tr/mc/dev.jsonl"], shots: 1}
`
	rec, err := r.run(r.spec(spec), pipeline.Options{})
	if err != nil {
		t.Fatal(err)
	}
	ev := stageRecord(t, rec, "eval")
	if len(ev.Refs) != 1 || ev.Refs[0].Revision != setCommit {
		t.Errorf("eval refs %+v, want the set's commit", ev.Refs)
	}
	res, items := readEval(t, ev.Entry)
	if len(items) != 4 || res.MultipleChoice.Shots != 1 {
		t.Errorf("%d items, %d shots", len(items), res.MultipleChoice.Shots)
	}
	if want := filepath.Join("models--google--gemma-3-tiny-it", "snapshots", trained); !strings.Contains(res.Models["base"], want) {
		t.Errorf("base %q is not the snapshot training read (%s)", res.Models["base"], want)
	}

	// The model's main moves to other weights: the eval without `model:`
	// still scores on the commit training read (cached: nothing changed
	// for it), and one given the moved branch refuses.
	dir := t.TempDir()
	cfg, _ := trainer.Preset("tiny")
	if err := trainer.WriteRandomCheckpoint(dir, cfg, trainer.InitOptions{Seed: 99, Std: 0.3}); err != nil {
		t.Fatal(err)
	}
	weights, _ := os.ReadFile(filepath.Join(dir, "model.safetensors"))
	moved := f.model.Commit("main", map[string][]byte{"model.safetensors": weights})
	rec, err = r.run(r.spec(spec), pipeline.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if s := stageRecord(t, rec, "eval"); s.State != "cached" {
		t.Errorf("after the move: eval %s (%s)", s.State, s.Reason)
	}
	other := strings.Replace(spec, "tasks: [multiple_choice]", "tasks: [multiple_choice]\n      model: hf://google/gemma-3-tiny-it", 1)
	_, err = r.run(r.spec(other), pipeline.Options{})
	if err == nil || !strings.Contains(err.Error(), "an adapter for another base") || !strings.Contains(err.Error(), moved) {
		t.Fatalf("eval on the moved branch: %v", err)
	}
	if n := r.evalEntries(); n != 1 {
		t.Errorf("%d eval entries, want the first run's only", n)
	}
}
