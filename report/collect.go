// Package report assembles a DAG's recent runs into one self-contained HTML
// page: the last run's DAG with each stage's state, rows, time and cache
// hit or miss; the loss curves of the last runs' adapters overlaid; eval
// results as a table and as a trend across runs; and the packing
// efficiency, token counts and dropped examples of the data stages.
//
// The page has no script and loads nothing: charts are inline SVG, styles
// inline CSS, fonts the system's, and a Content-Security-Policy forbids
// every fetch. It reads on a phone as on a desktop.
package report

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"gemmaft/pipeline"
	"gemmaft/stages"
	"gemmaft/trainer"
)

// Stage kinds the report treats apart. Any kind named eval, or starting
// with eval, is read as an evaluation: its numeric statistics are scores.
const (
	trainKind = "qlora"
	modelKind = "model"
	evalKind  = "eval"
)

// metrics and events files in a training stage's entry, and the events a
// run in progress writes in its scratch folder.
const (
	metricsFile   = trainer.MetricsFile
	eventsDir     = stages.EventsDir
	liveEventsDir = stages.LiveEventsDir
)

// A Report is what the page shows.
type Report struct {
	DAG, Spec, Cache string
	Program          string
	Generated        time.Time
	RunningBy        string
	// Unfinished names the last run when it did not finish and left no
	// record: Runs then begin with the run before it.
	Unfinished string
	// Runs are the last runs, newest first.
	Runs      []*Run
	Stages    []StageRow // the last run's stages, in DAG order
	Trainings []*Training
	Scores    []string // eval score names, in order of first appearance
	Data      []DataRow
	DataTrend []DataTrendCol
}

// A Run is one recorded run.
type Run struct {
	Rec                                *pipeline.RunRecord
	Label                              string // when it started, as the page names it
	Tick                               string // the same, shorter, for a chart's axis
	Index                              int    // 0 is the oldest shown
	Computed, Cached, Failed, Canceled int
	Scores                             map[string]float64
	TrainLoss, EvalLoss                float64 // of the first training stage; NaN if none
}

// StageRow is one stage of the last run.
type StageRow struct {
	pipeline.StageRecord
	Cache string // hit, miss, or "" when not part of the run
	// ComputedAt and ComputeSeconds come from a cached entry's manifest:
	// when it was computed, and in how long, less the time it waited for
	// its inputs.
	ComputedAt     time.Time
	ComputeSeconds float64
	Size           int64 // bytes of the entry's outputs; 0 when the run has no entry
	Depth, Column  int   // place in the drawing
	Needs          []string
	Events         string // the entry's tb/ folder, when it has one
}

// OwnSeconds is the time the stage took in the last run, less the time it
// waited for inputs other stages were computing.
func (r StageRow) OwnSeconds() float64 { return r.Seconds - r.WaitSeconds }

// A Training is one training stage's adapters across the runs shown.
type Training struct {
	Stage   string
	Curves  []*Curve // newest first
	HasEval bool
}

// A Curve is one adapter's training: one cache entry, used by one or more
// of the runs shown.
type Curve struct {
	Key     string
	Runs    []*Run // the runs that used it, newest first
	State   string // computed, cached, failed, canceled (in its newest run)
	Label   string // the run that computed it (or first used it)
	Diff    string // parameters and inputs that differ from the other curves
	Metrics []trainer.Metric
	Note    string // why there is no curve, or that it is partial
	Entry   string
	Events  string // tb/ folder, when there is one
	Color   string
	Params  map[string]any
	// BestStep, with early stopping, is the step whose adapter the entry
	// holds, BestEval its held-out loss.
	BestStep     int
	BestEval     float64
	StoppedEarly bool
	inputs       map[string]string
}

// DataRow is one data stage of the last run, with its key figures.
type DataRow struct {
	Name, Kind, State string
	Rows              int64
	Records           *float64 // records (sources, chat, tokenize) or examples given to the packer
	Tokens            *float64 // tokens produced (tokenize) or placed in rows (pack)
	Trained           *float64 // tokens with a label
	Efficiency        *float64 // real tokens / slots (pack)
	Dropped           *float64 // records or examples left out
	Skipped           *float64 // empty or untrained examples the packer skipped
	Cut               *float64 // over-long examples truncated or split
}

// DataTrendCol is one figure of one data stage across the runs shown.
type DataTrendCol struct {
	Stage, Figure string
	Percent       bool
	Values        []*float64 // by run, newest first
}

// Collect reads the last n runs of dag from st (all kept runs when n <= 0).
func Collect(st *pipeline.Store, dag *pipeline.DAG, n int) (*Report, error) {
	r := &Report{DAG: dag.Name, Spec: dag.Path, Cache: st.Root, Program: pipeline.Version(),
		Generated: time.Now(), RunningBy: st.RunningBy(dag), Unfinished: st.Unfinished(dag)}
	recs := st.Runs(dag, n)
	for i, rec := range recs {
		run := &Run{Rec: rec, Index: len(recs) - 1 - i, Scores: map[string]float64{}, TrainLoss: math.NaN(), EvalLoss: math.NaN()}
		first := true
		for _, s := range rec.Stages {
			switch s.State {
			case "computed":
				run.Computed++
			case "cached":
				run.Cached++
			case "failed":
				run.Failed++
			case "canceled":
				run.Canceled++
			}
			if s.State != "computed" && s.State != "cached" {
				continue
			}
			for _, sc := range scoresOf(s) {
				if _, seen := run.Scores[sc.name]; !seen {
					run.Scores[sc.name] = sc.value
				}
				if !contains(r.Scores, sc.name) {
					r.Scores = append(r.Scores, sc.name)
				}
			}
			if s.Kind == trainKind && first {
				first = false
				if v, ok := num(s.Stats["final_loss"]); ok {
					run.TrainLoss = v
				}
				if v, ok := num(s.Stats["eval_loss"]); ok {
					run.EvalLoss = v
				}
			}
		}
		r.Runs = append(r.Runs, run)
	}
	if len(r.Runs) == 0 {
		return r, nil
	}
	labelRuns(r.Runs)
	r.Stages = stageRows(st, r.Runs[0].Rec)
	r.Trainings = trainings(st, r.Runs)
	r.Data, r.DataTrend = dataRows(r.Runs)
	return r, nil
}

type score struct {
	name  string
	value float64
}

// notScores are statistics of an eval stage that describe the run, not
// the model.
var notScores = map[string]bool{"cores": true, "rows": true, "steps": true, "seconds": true, "train_seconds": true, "eval_seconds": true, pipeline.WaitSecondsStat: true}

// scoresOf are a stage's eval results: a training stage's held-out and
// final training loss, every numeric statistic of an eval stage.
func scoresOf(s pipeline.StageRecord) []score {
	var out []score
	switch {
	case s.Kind == trainKind:
		// Named apart from an eval stage's held-out loss, which is of
		// other records.
		if v, ok := num(s.Stats["eval_loss"]); ok {
			out = append(out, score{s.Name + ": loss on its eval rows", v})
		}
		if v, ok := num(s.Stats["final_loss"]); ok {
			out = append(out, score{s.Name + ": final train loss", v})
		}
	case isEval(s.Kind):
		names := make([]string, 0, len(s.Stats))
		for k := range s.Stats {
			names = append(names, k)
		}
		sort.Strings(names)
		for _, k := range names {
			if v, ok := num(s.Stats[k]); ok && !notScores[k] {
				out = append(out, score{s.Name + ": " + scoreLabel(k), v})
			}
		}
	}
	return out
}

// scoreLabel reads an eval statistic's name for people: loss_adapter is
// "loss (adapter)", acc_norm_base "acc norm (base)".
func scoreLabel(stat string) string {
	for _, model := range []string{"base", "adapter"} {
		if name, ok := strings.CutSuffix(stat, "_"+model); ok {
			return strings.ReplaceAll(name, "_", " ") + " (" + model + ")"
		}
	}
	return strings.ReplaceAll(stat, "_", " ")
}

func isEval(kind string) bool { return strings.HasPrefix(kind, evalKind) }

// stageRows lays out the last run's stages: depth is the longest path from
// a stage without inputs; a stage takes the column of its first input when
// that place is free, else the first free column of its row.
func stageRows(st *pipeline.Store, rec *pipeline.RunRecord) []StageRow {
	rows := make([]StageRow, len(rec.Stages))
	index := map[string]int{}
	taken := map[[2]int]bool{}
	for i, s := range rec.Stages {
		row := StageRow{StageRecord: s}
		switch s.State {
		case "cached":
			row.Cache = "hit"
		case "computed", "failed", "canceled":
			row.Cache = "miss"
		}
		col := -1
		for _, in := range s.Inputs {
			j, ok := index[in.Stage]
			if !ok {
				continue
			}
			row.Needs = append(row.Needs, in.Stage)
			row.Depth = max(row.Depth, rows[j].Depth+1)
			if col < 0 {
				col = rows[j].Column
			}
		}
		if col < 0 || taken[[2]int{row.Depth, col}] {
			for col = 0; taken[[2]int{row.Depth, col}]; col++ {
			}
		}
		row.Column = col
		taken[[2]int{row.Depth, col}] = true
		if s.Key != "" && (s.State == "cached" || s.State == "computed") {
			dir := st.EntryDir(s.Key)
			if m, err := pipeline.ReadManifest(dir); err == nil {
				for _, o := range m.Outputs {
					row.Size += o.Size
				}
				if s.State == "cached" {
					row.ComputedAt, row.ComputeSeconds = m.Finished, m.Seconds-m.WaitSeconds()
				}
			}
			if isDir(filepath.Join(dir, eventsDir)) {
				row.Events = filepath.Join(dir, eventsDir)
			}
		}
		index[s.Name] = i
		rows[i] = row
	}
	return rows
}

// palette is Tableau 10, readable on light and dark backgrounds.
var palette = []string{"#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"}

// trainings gathers, for each training stage of the newest run, the
// distinct adapters the runs shown used, with their logged metrics.
func trainings(st *pipeline.Store, runs []*Run) []*Training {
	var out []*Training
	for _, s := range runs[0].Rec.Stages {
		if s.Kind != trainKind {
			continue
		}
		tr := &Training{Stage: s.Name}
		byKey := map[string]*Curve{}
		for _, run := range runs { // newest first
			rec := stageRecord(run.Rec, s.Name)
			if rec == nil || rec.Kind != trainKind || rec.State == "not selected" || rec.Key == "" {
				continue
			}
			c := byKey[rec.Key]
			if c == nil {
				c = &Curve{Key: rec.Key, State: rec.State, inputs: map[string]string{}}
				json.Unmarshal(rec.Params, &c.Params)
				if b, ok := num(rec.Stats["best_step"]); ok {
					c.BestStep = int(b)
					c.BestEval, _ = num(rec.Stats["eval_loss"])
					c.StoppedEarly, _ = rec.Stats["stopped_early"].(bool)
				}
				for _, in := range rec.Inputs {
					c.inputs[in.Stage] = in.Key
				}
				byKey[rec.Key] = c
				tr.Curves = append(tr.Curves, c)
			}
			c.Runs = append(c.Runs, run)
			if rec.State == "computed" || c.Label == "" {
				c.Label = run.Label
			}
		}
		for i, c := range tr.Curves {
			c.Color = palette[i%len(palette)]
			loadCurve(st, c)
			if c.Note == "" && c.StoppedEarly {
				c.Note = fmt.Sprintf("stopped early; the adapter is step %d's, the best held-out loss", c.BestStep)
			}
			for _, m := range c.Metrics {
				if m.EvalLoss != nil && !math.IsNaN(*m.EvalLoss) {
					tr.HasEval = true
				}
			}
		}
		diffs(tr.Curves)
		out = append(out, tr)
	}
	return out
}

// loadCurve reads a curve's metrics: from its entry, or for a run that
// failed or was stopped, what it logged in its scratch folder.
func loadCurve(st *pipeline.Store, c *Curve) {
	dir := st.EntryDir(c.Key)
	if (c.State == "failed" || c.State == "canceled") && !isFile(filepath.Join(dir, metricsFile)) { // entries appear whole
		ms, err := trainer.ReadMetrics(filepath.Join(st.ScratchDir(c.Key), metricsFile))
		if isDir(filepath.Join(st.ScratchDir(c.Key), liveEventsDir)) {
			c.Events = filepath.Join(st.ScratchDir(c.Key), liveEventsDir)
		}
		if err == nil && len(ms) > 0 {
			c.Metrics = ms
			c.Note = fmt.Sprintf("%s after step %d (what it logged before)", c.State, ms[len(ms)-1].Step)
		} else {
			c.Note = c.State + " before logging a step"
		}
		return
	}
	c.Entry = dir
	if c.State == "failed" || c.State == "canceled" {
		// A forced retraining that stopped: the entry an earlier run
		// computed is still the cached one, and its curve is the one the
		// later stages used.
		c.Note = fmt.Sprintf("a later run's retraining was %s; this is the cached entry's curve", c.State)
	}
	ms, err := trainer.ReadMetrics(filepath.Join(dir, metricsFile))
	switch {
	case errors.Is(err, fs.ErrNotExist):
		c.Note = "its cache entry is gone (removed by gc)"
	case err != nil:
		c.Note = "metrics unreadable: " + err.Error()
	default:
		c.Metrics = ms
	}
	if isDir(filepath.Join(dir, eventsDir)) {
		c.Events = filepath.Join(dir, eventsDir)
	}
}

// diffs says, for each curve, which parameters and inputs set it apart
// from the others.
func diffs(curves []*Curve) {
	if len(curves) < 2 {
		return
	}
	params := map[string]bool{}
	inputs := map[string]bool{}
	for _, c := range curves {
		for k := range c.Params {
			params[k] = true
		}
		for k := range c.inputs {
			inputs[k] = true
		}
	}
	var differ []string
	for k := range params {
		first, _ := json.Marshal(curves[0].Params[k])
		for _, c := range curves[1:] {
			if v, _ := json.Marshal(c.Params[k]); string(v) != string(first) {
				differ = append(differ, k)
				break
			}
		}
	}
	sort.Strings(differ)
	var changed []string
	for k := range inputs {
		for _, c := range curves[1:] {
			if c.inputs[k] != curves[0].inputs[k] {
				changed = append(changed, k)
				break
			}
		}
	}
	sort.Strings(changed)
	for _, c := range curves {
		var parts []string
		for _, k := range differ {
			v, ok := c.Params[k]
			if !ok {
				parts = append(parts, k+" unset")
				continue
			}
			parts = append(parts, k+" "+paramString(v))
		}
		for _, k := range changed {
			parts = append(parts, k+" "+pipeline.ShortKey(c.inputs[k]))
		}
		c.Diff = strings.Join(parts, ", ")
	}
}

func paramString(v any) string {
	switch x := v.(type) {
	case string:
		return x
	case float64:
		return fmt.Sprintf("%g", x)
	}
	b, _ := json.Marshal(v)
	return string(b)
}

// dataRows are the key figures of the data stages: those of the last run,
// and the packing and token figures of every run shown.
func dataRows(runs []*Run) ([]DataRow, []DataTrendCol) {
	var rows []DataRow
	for _, s := range runs[0].Rec.Stages {
		if !isData(s) {
			continue
		}
		row := DataRow{Name: s.Name, Kind: s.Kind, State: s.State, Rows: s.Rows}
		get := func(names ...string) *float64 {
			var sum float64
			found := false
			for _, n := range names {
				if v, ok := num(s.Stats[n]); ok {
					sum += v
					found = true
				}
			}
			if !found {
				return nil
			}
			return &sum
		}
		row.Records = get("records")
		if row.Records == nil {
			row.Records = get("examples_in")
		}
		row.Tokens = get("tokens")
		if row.Tokens == nil {
			row.Tokens = get("real_tokens")
		}
		row.Trained = get("trained_tokens")
		row.Efficiency = get("efficiency")
		row.Dropped = get("dropped", "dropped_records")
		row.Skipped = get("skipped_empty", "skipped_untrained")
		row.Cut = get("truncated", "split")
		rows = append(rows, row)
	}
	var cols []DataTrendCol
	for _, s := range runs[0].Rec.Stages {
		if !isData(s) {
			continue
		}
		var figures []figure
		switch {
		case has(s.Stats, "efficiency"):
			figures = []figure{{"efficiency", "efficiency", true}, {"real_tokens", "tokens", false}, {"dropped", "dropped", false}}
		case has(s.Stats, "tokens"):
			figures = []figure{{"tokens", "tokens", false}, {"dropped_records", "dropped", false}}
		default:
			continue
		}
		for _, f := range figures {
			col := DataTrendCol{Stage: s.Name, Figure: f.label, Percent: f.percent}
			for _, run := range runs {
				var val *float64
				if rec := stageRecord(run.Rec, s.Name); rec != nil && (rec.State == "cached" || rec.State == "computed") {
					if v, ok := num(rec.Stats[f.stat]); ok {
						val = &v
					}
				}
				col.Values = append(col.Values, val)
			}
			cols = append(cols, col)
		}
	}
	return rows, cols
}

// A figure is a statistic shown across runs.
type figure struct {
	stat, label string
	percent     bool
}

// isData tells the data stages: neither training, nor evaluation, nor a
// model, and with a table or data statistics.
func isData(s pipeline.StageRecord) bool {
	if s.Kind == trainKind || s.Kind == modelKind || isEval(s.Kind) {
		return false
	}
	return s.Rows > 0 || has(s.Stats, "records") || has(s.Stats, "tokens") || has(s.Stats, "efficiency")
}

func has(m map[string]any, k string) bool { _, ok := m[k]; return ok }

func stageRecord(rec *pipeline.RunRecord, name string) *pipeline.StageRecord {
	for i := range rec.Stages {
		if rec.Stages[i].Name == name {
			return &rec.Stages[i]
		}
	}
	return nil
}

// num reads a statistic as a number (records decoded from JSON hold
// float64; records built in memory hold Go numbers).
func num(v any) (float64, bool) {
	switch x := v.(type) {
	case float64:
		return x, !math.IsNaN(x) && !math.IsInf(x, 0)
	case float32:
		return float64(x), true
	case int:
		return float64(x), true
	case int64:
		return float64(x), true
	case json.Number:
		f, err := x.Float64()
		return f, err == nil
	}
	return 0, false
}

func contains(xs []string, x string) bool {
	for _, y := range xs {
		if y == x {
			return true
		}
	}
	return false
}

func isFile(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.Mode().IsRegular()
}

func isDir(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.IsDir()
}

// labelRuns names each run by its start, in the reader's local time, to
// the minute unless two runs shown started in the same minute; Tick is the
// shorter name on a trend's axis.
func labelRuns(runs []*Run) {
	layout, tick := "Jan 2 15:04", "01-02 15:04"
	seen := map[string]bool{}
	for _, r := range runs {
		l := r.Rec.Started.Local().Format(layout)
		if seen[l] {
			layout, tick = "Jan 2 15:04:05", "15:04:05"
			break
		}
		seen[l] = true
	}
	for _, r := range runs {
		r.Label = r.Rec.Started.Local().Format(layout)
		r.Tick = r.Rec.Started.Local().Format(tick)
	}
}
