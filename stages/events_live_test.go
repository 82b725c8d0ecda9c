package stages

import (
	"log/slog"
	"math"
	"path/filepath"
	"testing"
	"time"

	"gemmaft/internal/tfevents/tfeventstest"
	"gemmaft/pipeline"
	"gemmaft/trainer"
)

// Live events are readable after each step, before the run ends.
func TestLiveEventsFollowTheRun(t *testing.T) {
	scratch := t.TempDir()
	task := &pipeline.Task{Name: "adapter", Log: slog.New(slog.DiscardHandler)}
	p := (qloraKind{}).Params().(*qloraParams)
	live := startLiveEvents(task, scratch, p, time.Now())
	dir := filepath.Join(scratch, LiveEventsDir)
	for step := 1; step <= 3; step++ {
		ev := math.NaN()
		if step == 2 {
			ev = 1.5
		}
		live.step(trainer.Progress{Step: step, TotalSteps: 3, Loss: 3 - float64(step)/2, EvalLoss: ev, LR: 2e-4, GradNorm: 1, TokensPerSec: 100})
		events, _, err := tfeventstest.ReadDir(dir)
		if err != nil {
			t.Fatalf("after step %d: %v", step, err)
		}
		if got := len(tfeventstest.Scalars(events)[trainer.TagLoss]); got != step {
			t.Fatalf("after step %d: %d loss points visible", step, got)
		}
	}
	live.close()
	events, _, err := tfeventstest.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	sc := tfeventstest.Scalars(events)
	if e := sc[trainer.TagEvalLoss]; len(e) != 1 || e[0].Step != 2 {
		t.Errorf("eval loss %v", e)
	}
	if _, ok := sc[trainer.TagPeakGPU]; ok {
		t.Error("GPU memory without a GPU")
	}
	if len(tfeventstest.Texts(events)[trainer.TagSettings]) != 1 {
		t.Error("no settings text")
	}
}
