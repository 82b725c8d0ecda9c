package report

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"gemmaft/pipeline"
	"gemmaft/report/reporttest"
	"gemmaft/trainer"
)

// fixture is a store holding hand-written run records and entries.
type fixture struct {
	t     *testing.T
	st    *pipeline.Store
	dag   *pipeline.DAG
	start time.Time
	n     int
}

func newFixture(t *testing.T, name string) *fixture {
	st, err := pipeline.OpenStore(filepath.Join(t.TempDir(), "cache"))
	if err != nil {
		t.Fatal(err)
	}
	return &fixture{t: t, st: st, dag: &pipeline.DAG{Name: name, Path: "/srv/gemmaft/dags/" + name + ".yaml"},
		start: time.Date(2026, 11, 20, 2, 30, 0, 0, time.UTC)}
}

// record keeps rec as the next night's run, as the engine keeps it
// (runs/<first 8 bytes of sha256 of the spec's path>/<start>-<pid>.json).
func (f *fixture) record(ok bool, errText string, stages ...pipeline.StageRecord) *pipeline.RunRecord {
	f.t.Helper()
	started := f.start.Add(time.Duration(f.n) * 24 * time.Hour)
	f.n++
	rec := &pipeline.RunRecord{DAG: f.dag.Name, Spec: f.dag.Path, Started: started, Finished: started.Add(90 * time.Minute),
		Seconds: 5400, OK: ok, Error: errText, Cache: f.st.Root, Stages: stages}
	f.write(rec)
	return rec
}

// write stores rec as the engine records a run.
func (f *fixture) write(rec *pipeline.RunRecord) {
	f.t.Helper()
	started := rec.Started
	sum := sha256.Sum256([]byte(f.dag.Path))
	dir := filepath.Join(f.st.Root, "runs", hex.EncodeToString(sum[:8]))
	os.MkdirAll(dir, 0o755)
	data, _ := json.MarshalIndent(rec, "", "  ")
	if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("%020d-1.json", started.UnixNano())), data, 0o644); err != nil {
		f.t.Fatal(err)
	}
}

// metrics writes a metrics.jsonl of steps lines into dir, loss falling
// from start.
func (f *fixture) metrics(dir string, steps int, start float64, evalEvery int) {
	f.t.Helper()
	os.MkdirAll(dir, 0o755)
	var b bytes.Buffer
	for s := 1; s <= steps; s++ {
		m := trainer.Metric{Step: s, Loss: start - 0.1*float64(s), LR: 1e-4, Tokens: int64(s * 8192), TokensPerSec: 2048, ElapsedSec: float64(s) * 4, PeakGPUGiB: 16.4}
		if evalEvery > 0 && s%evalEvery == 0 {
			e := m.Loss + 0.05
			m.EvalLoss = &e
		}
		line, _ := json.Marshal(m)
		b.Write(append(line, '\n'))
	}
	if err := os.WriteFile(filepath.Join(dir, trainer.MetricsFile), b.Bytes(), 0o644); err != nil {
		f.t.Fatal(err)
	}
}

func key(c byte) string { return strings.Repeat(string(c), 64) }

func params(lr float64) json.RawMessage {
	return json.RawMessage(fmt.Sprintf(`{"lr": %g, "r": 32, "target_modules": ["q_proj", "v_proj"]}`, lr))
}

// dataStages are a source, tokens and pack stages with their statistics.
func dataStages(state string, efficiency float64, dropped int) []pipeline.StageRecord {
	return []pipeline.StageRecord{
		{Name: "alpaca", Kind: "parquet", Key: key('1'), State: state, Rows: 51000, Seconds: 3, Stats: map[string]any{"records": 51000.0, "files": 2.0}},
		{Name: "tokens", Kind: "tokenize", Key: key('2'), State: state, Rows: 51000, Seconds: 40, Inputs: []pipeline.InputRef{{Stage: "alpaca", Key: key('1')}},
			Stats: map[string]any{"records": 51000.0, "tokens": 2.1e7, "trained_tokens": 1.2e7, "dropped_records": 0.0}},
		{Name: "pack", Kind: "pack", Key: key('3'), State: state, Rows: 5200, Seconds: 12, Inputs: []pipeline.InputRef{{Stage: "tokens", Key: key('2')}},
			Stats: map[string]any{"examples_in": 51000.0, "real_tokens": 2.09e7, "efficiency": efficiency, "dropped": float64(dropped), "skipped_empty": 1.0, "truncated": 0.0, "split": 0.0}},
	}
}

func adapter(k string, state string, lr float64, evalLoss float64) pipeline.StageRecord {
	s := pipeline.StageRecord{Name: "adapter", Kind: "qlora", Key: k, State: state, Params: params(lr), Seconds: 5000,
		Inputs: []pipeline.InputRef{{Stage: "pack", Key: key('3')}}, Stats: map[string]any{"final_loss": 1.2, "eval_loss": evalLoss}}
	if state == "failed" {
		s.Stats = nil
		s.Error = "step 4: loss is NaN"
	}
	return s
}

func evalStage(state string, acc float64) pipeline.StageRecord {
	return pipeline.StageRecord{Name: "trmmlu", Kind: "eval", Key: key('e'), State: state, Seconds: 300,
		Inputs: []pipeline.InputRef{{Stage: "adapter", Key: key('a')}}, Stats: map[string]any{"accuracy": acc, "rows": 1000.0, "cores": 16.0}}
}

func render(t *testing.T, f *fixture, n int) (*Report, *reporttest.Page, string) {
	t.Helper()
	r, err := Collect(f.st, f.dag, n)
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	if err := r.WriteHTML(&b); err != nil {
		t.Fatal(err)
	}
	p, err := reporttest.Parse(b.Bytes())
	if err != nil {
		t.Fatalf("%v\n%s", err, b.String())
	}
	return r, p, b.String()
}

// A week of nights: an adapter reused from cache, one whose run failed
// (its partial curve comes from the scratch folder), one whose entry gc
// removed, an eval stage's scores, and data statistics that change.
func TestReportNights(t *testing.T) {
	f := newFixture(t, "gemma3-12b-tr")
	st := f.st
	// night 1: adapter A computed; night 2: all cached.
	f.record(true, "", append(dataStages("computed", 0.95, 3), adapter(key('a'), "computed", 2e-4, 1.31), evalStage("computed", 0.41))...)
	f.record(true, "", append(dataStages("cached", 0.95, 3), adapter(key('a'), "cached", 2e-4, 1.31), evalStage("cached", 0.41))...)
	// night 3: lr changed, training failed at step 4.
	f.metrics(st.ScratchDir(key('b')), 3, 2.0, 0)
	os.MkdirAll(filepath.Join(st.ScratchDir(key('b')), "tb-live"), 0o755)
	f.record(false, "stage adapter: step 4: loss is NaN", append(dataStages("cached", 0.95, 3), adapter(key('b'), "failed", 1e-3, 0))...)
	// night 4: new data (more dropped), lr changed again, trained; A's entry is gone.
	f.metrics(st.EntryDir(key('c')), 10, 2.0, 5)
	os.MkdirAll(filepath.Join(st.EntryDir(key('c')), "tb"), 0o755)
	f.record(true, "", append(dataStages("computed", 0.97, 7), adapter(key('c'), "computed", 1e-4, 1.25), evalStage("computed", 0.44))...)

	r, p, raw := render(t, f, 10)
	if len(r.Runs) != 4 {
		t.Fatalf("%d runs", len(r.Runs))
	}
	if !strings.Contains(p.Title, "gemma3-12b-tr: ok") {
		t.Errorf("title %q", p.Title)
	}
	// Curves: C (newest), B (failed, partial), A (entry gone, two runs).
	tr := r.Trainings[0]
	if len(tr.Curves) != 3 || tr.Curves[0].Key != key('c') || tr.Curves[1].Key != key('b') || tr.Curves[2].Key != key('a') {
		t.Fatalf("curves %+v", tr.Curves)
	}
	if c := tr.Curves[1]; len(c.Metrics) != 3 || !strings.Contains(c.Note, "failed after step 3") {
		t.Errorf("failed run's curve: %d points, note %q", len(c.Metrics), c.Note)
	}
	if c := tr.Curves[2]; len(c.Metrics) != 0 || !strings.Contains(c.Note, "removed by gc") || len(c.Runs) != 2 {
		t.Errorf("gc'd adapter: %d points, note %q, %d runs", len(c.Metrics), c.Note, len(c.Runs))
	}
	legend := p.Legend["adapter"]
	if len(legend) != 3 || !strings.Contains(legend[0], "lr 0.0001") || !strings.Contains(legend[1], "lr 0.001") || !strings.Contains(legend[2], "lr 0.0002") {
		t.Errorf("legend %q: want the learning rates that set the adapters apart", legend)
	}
	for _, l := range legend {
		if strings.Contains(l, "target_modules") || strings.Contains(l, " r ") {
			t.Errorf("legend %q names a parameter all adapters share", l)
		}
	}
	if ch := p.Charts["loss:adapter"]; ch.Lines != 2 || len(ch.Series) != 3 {
		t.Errorf("loss chart: %d lines of %d series; want C and B drawn, A empty", ch.Lines, len(ch.Series))
	}
	if !strings.Contains(raw, `stroke-dasharray="6 4"`) {
		t.Error("the failed run's curve is not dashed")
	}
	if ch := p.Charts["eval-loss:adapter"]; ch.Points != 2 {
		t.Errorf("eval loss chart has %d points, want C's two", ch.Points)
	}
	// Eval: the eval stage's scores (not its row count), the adapter's losses.
	ev := p.Tables["eval-table"]
	if want := []string{"run", "adapter: loss on its eval rows", "adapter: final train loss", "trmmlu: accuracy"}; fmt.Sprint(ev.Head) != fmt.Sprint(want) {
		t.Errorf("eval table head %q, want %q", ev.Head, want)
	}
	if acc := ev.Column("trmmlu: accuracy"); len(acc) != 4 || acc[0] != "0.44 +0.03" || acc[1] != "—" || acc[3] != "0.41" {
		t.Errorf("accuracy column %q", acc)
	}
	if tr := p.Charts["trend:trmmlu: accuracy"]; tr.Points != 3 {
		t.Errorf("accuracy trend has %d points, want 3 (the failed night has none)", tr.Points)
	}
	// Data: the last run's figures, and the trend.
	dt := p.Tables["data-table"]
	if len(dt.Rows) != 3 || dt.Column("packing efficiency")[2] != "97.0%" || dt.Column("dropped")[2] != "7" ||
		dt.Column("skipped")[2] != "1" || dt.Column("tokens")[1] != "21,000,000" {
		t.Errorf("data table %q", dt.Rows)
	}
	trend := p.Tables["data-trend"]
	if eff := trend.Column("pack · efficiency"); fmt.Sprint(eff) != "[97.0% 95.0% 95.0% 95.0%]" {
		t.Errorf("efficiency across runs %q", eff)
	}
	if dr := trend.Column("pack · dropped"); fmt.Sprint(dr) != "[7 3 3 3]" {
		t.Errorf("dropped across runs %q", dr)
	}
	// Runs: the failed night says why.
	runs := p.Tables["runs-table"]
	if res := runs.Column("result"); fmt.Sprint(res) != "[ok failed ok ok]" {
		t.Errorf("results %q", res)
	}
	if e := runs.Column("error"); !strings.Contains(e[1], "loss is NaN") {
		t.Errorf("errors %q", e)
	}
	// The TensorBoard folder is named where it exists: the entry's tb/, or
	// for the failed run the events it wrote as it ran.
	if tbs := p.Tables["curves:adapter"].Column("TensorBoard"); !strings.HasSuffix(tbs[0], "/tb") || !strings.HasSuffix(tbs[1], "/tb-live") || tbs[2] != "—" {
		t.Errorf("TensorBoard column %q", tbs)
	}
	if peak := p.Tables["curves:adapter"].Column("peak GPU"); peak[0] != "16.4 GiB" {
		t.Errorf("peak GPU %q", peak)
	}

	// --runs 2 keeps the last two nights.
	r, p, _ = render(t, f, 2)
	if len(r.Runs) != 2 || len(p.Tables["runs-table"].Rows) != 2 || len(r.Trainings[0].Curves) != 2 {
		t.Errorf("--runs 2: %d runs, %d curves", len(r.Runs), len(r.Trainings[0].Curves))
	}
}

func TestReportFailedLastRun(t *testing.T) {
	f := newFixture(t, "nightly")
	f.record(true, "", dataStages("computed", 0.9, 0)...)
	stages := dataStages("cached", 0.9, 0)
	stages[2].State, stages[2].Error = "failed", "pack: disk full"
	f.record(false, "stage pack: disk full", stages...)
	_, p, raw := render(t, f, 5)
	if !strings.Contains(p.Title, "FAILED") || !strings.Contains(p.Text, "FAILED") || !strings.Contains(raw, `id="run-error"`) {
		t.Errorf("a failed last run is not flagged: title %q", p.Title)
	}
	if p.Nodes["pack"] != "failed" {
		t.Errorf("DAG nodes %v", p.Nodes)
	}
	if !strings.Contains(p.Text, "The last run has no qlora stage") || !strings.Contains(p.Text, "No eval results") {
		t.Error("missing training and eval sections say nothing")
	}
}

// TestReportInterruptedRun: a run stopped by a signal is called
// interrupted, not failed, and its canceled stages are counted.
func TestReportInterruptedRun(t *testing.T) {
	f := newFixture(t, "nightly")
	f.record(true, "", dataStages("computed", 0.9, 0)...)
	stages := dataStages("cached", 0.9, 0)
	stages[2].State, stages[2].Error = "canceled", "interrupted by SIGINT"
	rec := f.record(false, "run interrupted: interrupted by SIGINT", stages...)
	rec.Interrupted = true
	f.write(rec)
	_, p, _ := render(t, f, 5)
	if !strings.Contains(p.Title, "INTERRUPTED") || strings.Contains(p.Title, "FAILED") || !strings.Contains(p.Text, "1 canceled") {
		t.Errorf("an interrupted last run: title %q\n%s", p.Title, p.Text)
	}
	if res := p.Tables["runs-table"].Column("result"); fmt.Sprint(res) != "[interrupted ok]" && fmt.Sprint(res) != "[ok interrupted]" {
		t.Errorf("results %q", res)
	}
}

func TestReportNoRuns(t *testing.T) {
	f := newFixture(t, "fresh")
	r, p, _ := render(t, f, 10)
	if len(r.Runs) != 0 || !strings.Contains(p.Text, "No run of this spec is recorded") || p.Sections["training"] {
		t.Errorf("empty report: %q", p.Text)
	}
}

// Names come from specs and errors from anywhere: they are text, never markup.
func TestReportEscapes(t *testing.T) {
	f := newFixture(t, `x"><script>alert(1)</script>`)
	s := dataStages("computed", 0.9, 0)
	s[0].Name = `<img src=x onerror=alert(1)>`
	s[1].Inputs[0].Stage = s[0].Name
	f.record(false, `<script>alert("err")</script>`, s...)
	_, p, _ := render(t, f, 5) // Parse fails on any script, img or handler
	if !strings.Contains(p.Text, `<script>alert("err")</script>`) || !strings.Contains(p.Text, `<img src=x onerror=alert(1)>`) {
		t.Errorf("names and errors are not shown as text: %q", p.Text)
	}
}

func TestTrendTicksThinOut(t *testing.T) {
	f := newFixture(t, "many")
	for i := 0; i < 14; i++ {
		f.record(true, "", evalStage("computed", 0.3+float64(i)/100))
	}
	_, p, raw := render(t, f, 14)
	if tr := p.Charts["trend:trmmlu: accuracy"]; tr.Points != 14 {
		t.Errorf("%d points, want 14", tr.Points)
	}
	svg := raw[strings.Index(raw, `data-chart="trend:trmmlu: accuracy"`):]
	svg = svg[:strings.Index(svg, "</svg>")]
	// x ticks are the ones drawn under the frame (y ticks are end-anchored).
	if n := strings.Count(svg, `class="tick" x=`) - strings.Count(svg, `text-anchor="end"`); n > 7 {
		t.Errorf("%d run labels on the axis: they overlap", n)
	}
}

// TestReportEarlyStopping: an adapter that early stopping chose shows the
// best evaluation's held-out loss and step, not the last evaluation's, and
// says that it stopped early.
func TestReportEarlyStopping(t *testing.T) {
	f := newFixture(t, "nightly")
	f.metrics(f.st.EntryDir(key('a')), 6, 2.0, 1)
	a := adapter(key('a'), "computed", 2e-4, 1.55)
	a.Stats["best_step"], a.Stats["stopped_early"] = 4.0, true
	f.record(true, "", append(dataStages("computed", 0.95, 3), a)...)
	r, p, _ := render(t, f, 10)
	if ev := p.Tables["curves:adapter"].Column("eval loss"); fmt.Sprint(ev) != "[1.5500 (step 4)]" {
		t.Errorf("eval loss column %q, want the best evaluation's", ev)
	}
	if legend := p.Legend["adapter"]; len(legend) != 1 || !strings.Contains(legend[0], "stopped early; the adapter is step 4's") {
		t.Errorf("legend %q", legend)
	}
	if c := r.Trainings[0].Curves[0]; c.BestStep != 4 || !c.StoppedEarly {
		t.Errorf("curve %+v", c)
	}
}

// TestReportStageTimeLessWaiting: a stage's time is its own, less what it
// waited for inputs other stages computed (a merge waiting on training
// took two minutes by the clock and one second of its own).
func TestReportStageTimeLessWaiting(t *testing.T) {
	f := newFixture(t, "gemma3-12b-tr")
	ev := evalStage("computed", 0.41)
	ev.Stats[pipeline.WaitSecondsStat] = 300.0 // waited for the merge
	f.record(true, "", pipeline.StageRecord{Name: "merged", Kind: "merge", Key: key('m'), State: "computed", Seconds: 112.3, WaitSeconds: 111.4}, ev)
	r, _, raw := render(t, f, 10)
	if !strings.Contains(raw, `title="1 m 52 s with 1 m 51 s waiting for its inputs">0.90 s<`) {
		t.Errorf("the stage's time is not its own:\n%s", raw)
	}
	if strings.Contains(raw, "1 m 52 s<") || !strings.Contains(raw, "0.90 s</text>") { // the DAG's box says the same
		t.Errorf("the DAG's box gives the time with the wait:\n%s", raw)
	}
	if fmt.Sprint(r.Scores) != "[trmmlu: accuracy]" { // the wait is no score
		t.Errorf("scores %q", r.Scores)
	}
}

// TestReportStoppedRetraining: a forced retraining stopped after a few
// steps leaves the adapter an earlier run computed in the cache; the
// report shows that entry's curve, not the stopped attempt's steps.
func TestReportStoppedRetraining(t *testing.T) {
	f := newFixture(t, "nightly")
	f.metrics(f.st.EntryDir(key('a')), 30, 3.0, 10)
	f.record(true, "", append(dataStages("computed", 0.9, 0), adapter(key('a'), "computed", 2e-4, 1.3))...)
	f.metrics(f.st.ScratchDir(key('a')), 3, 3.0, 0) // what the stopped attempt logged
	stopped := adapter(key('a'), "canceled", 2e-4, 0)
	stopped.Error = "interrupted by SIGINT"
	f.record(false, "run interrupted", append(dataStages("cached", 0.9, 0), stopped)...)
	r, _, _ := render(t, f, 5)
	c := r.Trainings[0].Curves[0]
	if len(r.Trainings[0].Curves) != 1 || len(c.Metrics) != 30 || !strings.Contains(c.Note, "a later run's retraining was canceled") {
		t.Errorf("curve of %d points, note %q", len(c.Metrics), c.Note)
	}
}

// TestReportUntrainedStage: runs that stopped before the qlora stage (--until
// pack) say so under its heading, not an empty table.
func TestReportUntrainedStage(t *testing.T) {
	f := newFixture(t, "nightly")
	skipped := adapter(key('a'), "not selected", 2e-4, 0)
	skipped.Stats = nil
	f.record(true, "", append(dataStages("computed", 0.9, 0), skipped)...)
	_, p, raw := render(t, f, 5)
	if !strings.Contains(p.Text, "No run in these runs trained or used it") || strings.Contains(raw, `<table class="curves"`) {
		t.Errorf("an untrained qlora stage:\n%s", p.Text)
	}
}
