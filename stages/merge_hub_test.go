package stages

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"gemmaft/internal/testenv"
	"gemmaft/pipeline"
	"gemmaft/trainer"
)

// hubTokenizerTrainSpec is trainSpec with the training tokenizer read
// from the test Hub by an hf:// reference.
func hubTokenizerTrainSpec(t *testing.T) string {
	return strings.Replace(trainSpec(t, 2), testenv.GemmaFile(t, "tokenizer.json"), "hf://google/gemma-3-tiny-it/tokenizer.json", 1)
}

// TestMergeHubTokenizer: training data tokenized with an hf:// tokenizer,
// an adapter on a model stage's checkpoint (which has no tokenizer): the
// merge stage ships the tokenizer training read and the tokenizer files
// beside it in the repository, at the commit training read; with the Hub
// gone, from the cache.
func TestMergeHubTokenizer(t *testing.T) {
	f := newHubFixture(t)
	r := newTestRun(t)
	spec := hubTokenizerTrainSpec(t) + "  merged: {kind: merge, needs: [adapter, base]}\n"
	check := func(rec *pipeline.RunRecord) {
		t.Helper()
		for _, name := range []string{"tokenizer.json", "tokenizer_config.json"} {
			got, _ := os.ReadFile(filepath.Join(stageEntry(t, rec, "merged"), MergedModelDir, name))
			want, err := os.ReadFile(testenv.GemmaFile(t, name))
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("the merged folder's %s is not the Hub's that training read (%d bytes, want %d)", name, len(got), len(want))
			}
		}
	}
	rec, err := r.run(r.spec(spec), pipeline.Options{})
	if err != nil {
		t.Fatal(err)
	}
	check(rec)

	// The Hub gone, the branch moved on there: another merge of the same
	// adapter reads the cache at the commit training read.
	f.model.Commit("main", map[string][]byte{"tokenizer.json": []byte("{}")})
	f.srv.Close()
	t.Setenv("HF_HUB_OFFLINE", "1")
	spec = strings.Replace(spec, "{kind: merge, needs: [adapter, base]}", "{kind: merge, needs: [adapter, base], with: {max_shard_gb: 1}}", 1)
	rec, err = r.run(r.spec(spec), pipeline.Options{})
	if err != nil {
		t.Fatalf("merging offline: %v", err)
	}
	wantStates(t, rec, map[string]string{"tokens": "cached", "adapter": "cached", "merged": "computed"})
	check(rec)
}

// TestMergeHubTokenizerBaseHasOne: with a base that has its own tokenizer,
// the merge ships the base's and does not ask the Hub for the files beside
// the training tokenizer, which training never fetched: offline, it works.
func TestMergeHubTokenizerBaseHasOne(t *testing.T) {
	f := newHubFixture(t)
	r := newTestRun(t)
	model := filepath.Join(r.dir, "model")
	cfg, err := trainer.Preset("tiny")
	if err != nil {
		t.Fatal(err)
	}
	if err := trainer.WriteRandomCheckpoint(model, cfg, trainer.InitOptions{Seed: 7, Std: 0.3}); err != nil {
		t.Fatal(err)
	}
	own, err := os.ReadFile(testenv.GemmaFile(t, "tokenizer.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(model, "tokenizer.json"), own, 0o644); err != nil {
		t.Fatal(err)
	}
	spec := strings.Replace(hubTokenizerTrainSpec(t), "  base: {kind: model, with: {preset: tiny, seed: 7, std: 0.3}}\n", "", 1)
	spec = strings.Replace(spec, "needs: [pack, base]", "needs: [pack]", 1)
	spec = strings.Replace(spec, "with: {r: 4,", "with: {model: "+model+", quantize: none, r: 4,", 1)
	spec += "  merged: {kind: merge, needs: [adapter], with: {model: " + model + "}}\n"
	path := r.spec(spec)
	if _, err := r.run(path, pipeline.Options{Until: "adapter"}); err != nil {
		t.Fatal(err)
	}
	f.srv.Close()
	t.Setenv("HF_HUB_OFFLINE", "1")
	rec, err := r.run(path, pipeline.Options{})
	if err != nil {
		t.Fatalf("merging offline into a base with its own tokenizer: %v", err)
	}
	got, _ := os.ReadFile(filepath.Join(stageEntry(t, rec, "merged"), MergedModelDir, "tokenizer.json"))
	if !bytes.Equal(got, own) {
		t.Errorf("the merged folder's tokenizer.json is not the base's own")
	}
}
