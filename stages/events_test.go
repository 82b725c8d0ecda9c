package stages

import (
	"math"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"gemmaft/internal/tfevents/tfeventstest"
	"gemmaft/pipeline"
	"gemmaft/trainer"
)

// The qlora stage's entry holds tb/ with one event file: every logged
// metric as a scalar, step for step equal to metrics.jsonl, and the run's
// settings as text.
func TestQLoRAStageWritesEvents(t *testing.T) {
	r := newTestRun(t)
	spec := strings.Replace(trainSpec(t, 6), "backend: cpu}", "backend: cpu, eval_fraction: 0.2, eval_every: 3}", 1)
	spec = r.spec(spec)
	if _, err := r.run(spec, pipeline.Options{}); err != nil {
		t.Fatal(err)
	}
	dir := adapterEntry(t, r.store, spec)
	m, err := pipeline.ReadManifest(dir)
	if err != nil {
		t.Fatal(err)
	}
	var tbFiles int
	for _, o := range m.Outputs {
		if strings.HasPrefix(o.Path, EventsDir+"/events.out.tfevents.") {
			tbFiles++
		}
	}
	if tbFiles != 1 {
		t.Fatalf("manifest outputs %v: want one event file under %s/", m.Outputs, EventsDir)
	}
	history, err := trainer.ReadMetrics(filepath.Join(dir, trainer.MetricsFile))
	if err != nil {
		t.Fatal(err)
	}
	events, _, err := tfeventstest.ReadDir(filepath.Join(dir, EventsDir))
	if err != nil {
		t.Fatal(err)
	}
	sc := tfeventstest.Scalars(events)
	for _, tag := range []string{trainer.TagLoss, trainer.TagLearningRate, trainer.TagGradNorm, trainer.TagEpoch, trainer.TagTokens, trainer.TagTokensPerSec} {
		if len(sc[tag]) != len(history) {
			t.Errorf("%s: %d points, metrics.jsonl has %d lines", tag, len(sc[tag]), len(history))
		}
	}
	if _, ok := sc[trainer.TagPeakGPU]; ok {
		t.Error("a CPU run logs GPU memory")
	}
	var evals int
	for i, h := range history {
		if i >= len(sc[trainer.TagLoss]) {
			break
		}
		p := sc[trainer.TagLoss][i]
		if p.Step != int64(h.Step) || p.Value != float32(h.Loss) || sc[trainer.TagLearningRate][i].Value != float32(h.LR) ||
			sc[trainer.TagTokens][i].Value != float32(h.Tokens) || sc[trainer.TagGradNorm][i].Value != float32(h.GradNorm) {
			t.Errorf("step %d: events differ from metrics.jsonl %+v", h.Step, h)
		}
		if h.EvalLoss != nil && !math.IsNaN(*h.EvalLoss) {
			evals++
		}
	}
	if evals != 2 || len(sc[trainer.TagEvalLoss]) != evals {
		t.Errorf("eval/loss has %d points, metrics.jsonl %d eval losses (want 2: steps 3 and 6)", len(sc[trainer.TagEvalLoss]), evals)
	}
	texts := tfeventstest.Texts(events)[trainer.TagSettings]
	if len(texts) != 1 || !strings.Contains(texts[0], "| lr | 0.01 |") || !strings.Contains(texts[0], "| backend | cpu |") {
		t.Errorf("settings text %q: want the run's parameters as a table", texts)
	}
}

func TestScoreEvents(t *testing.T) {
	dir := t.TempDir()
	err := writeScoreEvents(dir, "eval", 120, map[string]float64{"tr_mmlu_acc": 0.42, "loss": 1.5},
		[][2]string{{"tasks", "tr_mmlu"}}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	events, _, err := tfeventstest.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	sc := tfeventstest.Scalars(events)
	if p := sc["eval/tr_mmlu_acc"]; len(p) != 1 || p[0].Value != float32(0.42) || p[0].Step != 120 {
		t.Errorf("eval/tr_mmlu_acc %v", p)
	}
	if p := sc["eval/loss"]; len(p) != 1 || p[0].Value != 1.5 {
		t.Errorf("eval/loss %v", p)
	}
	if len(tfeventstest.Texts(events)[trainer.TagSettings]) != 1 {
		t.Error("no settings text")
	}
}

// TestTrainingStartAfterAResume: an attempt that resumed a checkpoint
// stamps its events from when the training began, not from its own start,
// so that none is stamped later than its end.
func TestTrainingStartAfterAResume(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	attempt := now.Add(-time.Hour) // this attempt trained an hour, after two before it
	resumed := []trainer.Metric{{Step: 1, ElapsedSec: 60}, {Step: 9, ElapsedSec: 3 * 3600}}
	if got, want := trainingStart(resumed, attempt, now), now.Add(-3*time.Hour); !got.Equal(want) {
		t.Errorf("after a resume: %v, want %v", got, want)
	}
	fresh := []trainer.Metric{{Step: 1, ElapsedSec: 60}, {Step: 9, ElapsedSec: 3590}}
	if got := trainingStart(fresh, attempt, now); !got.Equal(attempt) {
		t.Errorf("one attempt: %v, want its start %v", got, attempt)
	}
	if got := trainingStart(nil, attempt, now); !got.Equal(attempt) {
		t.Errorf("no metrics: %v", got)
	}
}
