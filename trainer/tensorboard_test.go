package trainer

import (
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"gemmaft/internal/tfevents/tfeventstest"
)

func TestWriteEventsEveryMetric(t *testing.T) {
	ev := func(v float64) *float64 { return &v }
	history := []Metric{
		{Step: 1, Epoch: 0.25, Loss: 12.5, LR: 1e-4, GradNorm: 3.5, Tokens: 1000, TokensPerSec: 500, ElapsedSec: 2},
		{Step: 2, Epoch: 0.5, Loss: 12.0, EvalLoss: ev(12.25), LR: 2e-4, GradNorm: 2.5, Tokens: 2000, TokensPerSec: 510, ElapsedSec: 4, PeakGPUGiB: 3.5},
		{Step: 3, Epoch: 0.75, Loss: 11.5, EvalLoss: ev(math.NaN()), LR: 1e-4, GradNorm: 1.5, Tokens: 3000, TokensPerSec: 520, ElapsedSec: 1}, // resumed: elapsed restarts
	}
	dir := filepath.Join(t.TempDir(), "tb")
	start := time.Unix(1_800_000_000, 0)
	if err := WriteEvents(dir, history, "| setting | value |\n|---|---|\n| lr | 0.0002 |\n", start); err != nil {
		t.Fatal(err)
	}
	events, _, err := tfeventstest.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	sc := tfeventstest.Scalars(events)
	check := func(tag string, want []float64) {
		t.Helper()
		got := sc[tag]
		if len(got) != len(want) {
			t.Errorf("%s: %d points, want %d", tag, len(got), len(want))
			return
		}
		for i, p := range got {
			if p.Value != float32(want[i]) {
				t.Errorf("%s[%d] = %v, want %v", tag, i, p.Value, want[i])
			}
		}
	}
	check(TagLoss, []float64{12.5, 12, 11.5})
	check(TagLearningRate, []float64{1e-4, 2e-4, 1e-4})
	check(TagGradNorm, []float64{3.5, 2.5, 1.5})
	check(TagEpoch, []float64{0.25, 0.5, 0.75})
	check(TagTokens, []float64{1000, 2000, 3000})
	check(TagTokensPerSec, []float64{500, 510, 520})
	check(TagPeakGPU, []float64{0, 3.5, 0})
	check(TagEvalLoss, []float64{12.25})
	if p := sc[TagEvalLoss]; len(p) == 1 && p[0].Step != 2 {
		t.Errorf("eval loss at step %d, want 2", p[0].Step)
	}
	if len(sc) != 8 {
		t.Errorf("tags %v, want 8", len(sc))
	}
	loss := sc[TagLoss]
	if loss[0].WallTime != 1_800_000_002 || loss[1].WallTime != 1_800_000_004 || loss[2].WallTime != 1_800_000_004 {
		t.Errorf("wall times %v %v %v: want start+elapsed, never going back", loss[0].WallTime, loss[1].WallTime, loss[2].WallTime)
	}
	if txt := tfeventstest.Texts(events)[TagSettings]; len(txt) != 1 || txt[0] == "" {
		t.Errorf("settings text %q", txt)
	}
}

func TestWriteEventsNoGPU(t *testing.T) {
	dir := t.TempDir()
	if err := WriteEvents(dir, []Metric{{Step: 1, Loss: 1, LR: 1}}, "", time.Now()); err != nil {
		t.Fatal(err)
	}
	events, _, err := tfeventstest.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	sc := tfeventstest.Scalars(events)
	if _, ok := sc[TagPeakGPU]; ok {
		t.Error("a run without a GPU logs GPU memory")
	}
	if _, ok := sc[TagEvalLoss]; ok {
		t.Error("a run without eval logs an eval loss")
	}
	if len(tfeventstest.Texts(events)) != 0 {
		t.Error("empty settings written")
	}
}

func TestReadMetrics(t *testing.T) {
	p := filepath.Join(t.TempDir(), MetricsFile)
	os.WriteFile(p, []byte(`{"step":1,"epoch":0.5,"loss":2,"lr":0.1,"grad_norm":1,"tokens":10,"tokens_per_sec":5,"elapsed_sec":1}
{"step":2,"epoch":1,"loss":1.5,"eval_loss":1.75,"lr":0.1,"grad_norm":1,"tokens":20,"tokens_per_sec":5,"elapsed_sec":2}
`), 0o644)
	ms, err := ReadMetrics(p)
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) != 2 || ms[1].EvalLoss == nil || *ms[1].EvalLoss != 1.75 || ms[0].EvalLoss != nil {
		t.Errorf("read %+v", ms)
	}
	os.WriteFile(p, []byte("{\"step\":1}\nnot json\n"), 0o644)
	if _, err := ReadMetrics(p); err == nil {
		t.Error("a damaged line reads without error")
	}
}

// TestLossCurveMarksLonePoints: the one evaluation a run takes by default,
// and the loss of a one-step run, show in loss.svg; a line of one point
// draws nothing.
func TestLossCurveMarksLonePoints(t *testing.T) {
	eval := 2.5
	svg := string(LossCurveSVG([]Metric{{Step: 1, Loss: 3}, {Step: 2, Loss: 2.8}, {Step: 3, Loss: 2.6, EvalLoss: &eval}}))
	if strings.Count(svg, `<circle`) != 1 || !strings.Contains(svg, `fill="#ff7f0e"/>`) {
		t.Errorf("one evaluation, not one orange marker:\n%s", svg)
	}
	svg = string(LossCurveSVG([]Metric{{Step: 1, Loss: 3}}))
	if strings.Count(svg, `<circle`) != 1 || !strings.Contains(svg, `fill="#1f77b4"/>`) {
		t.Errorf("one step, not one blue marker:\n%s", svg)
	}
}
