package stages

import (
	"encoding/json"
	"fmt"
	"math"
	"path/filepath"
	"runtime"
	"sort"
	"time"

	"gemmaft/internal/tfevents"
	"gemmaft/pipeline"
	"gemmaft/trainer"
)

// EventsDir is the folder of TensorBoard event files in the entry of a
// stage that writes them (qlora; eval, once it exists): `tensorboard
// --logdir ENTRY/tb` shows them, `wandb sync --sync-tensorboard ENTRY/tb`
// uploads them.
const EventsDir = "tb"

// writeTrainEvents turns the metrics.jsonl that training left in the entry
// into TensorBoard events in tb/, with the run's settings as text.
func writeTrainEvents(t *pipeline.Task, p *qloraParams, model string, rows int, started time.Time) error {
	history, err := trainer.ReadMetrics(filepath.Join(t.Dir, trainer.MetricsFile))
	if err != nil {
		return err
	}
	started = trainingStart(history, started, time.Now())
	settings := paramRows(p)
	settings = append(settings,
		[2]string{"gradient_checkpointing", fmt.Sprint(p.GradientCheckpointing)},
		[2]string{"checkpoint_every", fmt.Sprint(p.CheckpointEvery)},
		[2]string{"model (resolved)", model},
		[2]string{"rows", fmt.Sprint(rows)},
		[2]string{"cores", fmt.Sprint(runtime.GOMAXPROCS(0))},
		[2]string{"program", pipeline.Version()},
		[2]string{"started", started.UTC().Format(time.RFC3339)})
	md := fmt.Sprintf("Stage **%s** (qlora)\n\n", t.Name) + tfevents.MarkdownTable("setting", "value", settings)
	if err := trainer.WriteEvents(filepath.Join(t.Dir, EventsDir), history, md, started); err != nil {
		return fmt.Errorf("writing TensorBoard events: %w", err)
	}
	return nil
}

// trainingStart is when the training whose metrics are history began: the
// attempt's start, or, for an attempt that resumed a checkpoint (whose
// elapsed time goes on from the checkpoint's), as long before now as the
// last metric's elapsed time, so that start + elapsed stamps no event
// later than now.
func trainingStart(history []trainer.Metric, attempt, now time.Time) time.Time {
	if n := len(history); n > 0 {
		if s := now.Add(-time.Duration(history[n-1].ElapsedSec * float64(time.Second))); s.Before(attempt) {
			return s
		}
	}
	return attempt
}

// writeScoreEvents writes scores (an evaluation's results, by name) as
// scalars tagged prefix/name at step, with settings as text: what an eval
// stage writes into its tb/ folder.
func writeScoreEvents(dir, prefix string, step int64, scores map[string]float64, settings [][2]string, now time.Time) error {
	w, err := tfevents.Create(dir, now)
	if err != nil {
		return err
	}
	if len(settings) > 0 {
		w.Add(0, now, tfevents.Text(trainer.TagSettings, tfevents.MarkdownTable("setting", "value", settings)))
	}
	names := make([]string, 0, len(scores))
	for k := range scores {
		names = append(names, k)
	}
	sort.Strings(names)
	vals := make([]tfevents.Value, 0, len(names))
	for _, k := range names {
		vals = append(vals, tfevents.Scalar(prefix+"/"+k, scores[k]))
	}
	w.Add(step, now, vals...)
	return w.Close()
}

// paramRows lists a stage's parameters (those of its cache key), sorted by
// name, values as JSON.
func paramRows(params any) [][2]string {
	data, _ := json.Marshal(params)
	var m map[string]json.RawMessage
	json.Unmarshal(data, &m)
	names := make([]string, 0, len(m))
	for k := range m {
		names = append(names, k)
	}
	sort.Strings(names)
	rows := make([][2]string, 0, len(names))
	for _, k := range names {
		v := string(m[k])
		var s string
		if json.Unmarshal(m[k], &s) == nil {
			v = s
		}
		rows = append(rows, [2]string{k, v})
	}
	return rows
}

// LiveEventsDir is the folder, in a training stage's scratch folder
// (pipeline.Store.ScratchDir), where the run in progress writes its
// TensorBoard events step by step: `tensorboard --logdir` on it follows a
// long run live. The scratch folder goes once the entry is committed; the
// entry's tb/ is then the run's record.
const LiveEventsDir = "tb-live"

// liveEvents writes each optimizer step's progress as events while
// training runs. It never fails the run: a write error stops it, logged.
type liveEvents struct {
	w   *tfevents.Writer
	t   *pipeline.Task
	gpu bool
}

func startLiveEvents(t *pipeline.Task, scratch string, p *qloraParams, started time.Time) *liveEvents {
	dir := filepath.Join(scratch, LiveEventsDir)
	w, err := tfevents.Create(dir, started)
	if err != nil {
		t.Log.Warn("no live TensorBoard events", "err", err)
		return &liveEvents{t: t}
	}
	md := fmt.Sprintf("Stage **%s** (qlora), in progress\n\n", t.Name) + tfevents.MarkdownTable("setting", "value", paramRows(p))
	w.Add(0, started, tfevents.Text(trainer.TagSettings, md))
	t.Log.Info("training; follow it live with tensorboard --logdir " + dir)
	return &liveEvents{w: w, t: t}
}

func (l *liveEvents) step(p trainer.Progress) {
	if l.w == nil {
		return
	}
	vals := []tfevents.Value{
		tfevents.Scalar(trainer.TagLoss, p.Loss),
		tfevents.Scalar(trainer.TagLearningRate, p.LR),
		tfevents.Scalar(trainer.TagGradNorm, p.GradNorm),
		tfevents.Scalar(trainer.TagTokensPerSec, p.TokensPerSec),
	}
	if l.gpu = l.gpu || p.PeakMemory > 0; l.gpu {
		vals = append(vals, tfevents.Scalar(trainer.TagPeakGPU, float64(p.PeakMemory)/(1<<30)))
	}
	if !math.IsNaN(p.EvalLoss) {
		vals = append(vals, tfevents.Scalar(trainer.TagEvalLoss, p.EvalLoss))
	}
	err := l.w.Add(int64(p.Step), time.Now(), vals...)
	if err == nil {
		err = l.w.Flush()
	}
	if err != nil {
		l.t.Log.Warn("live TensorBoard events stopped", "err", err)
		l.w.Close()
		l.w = nil
	}
}

func (l *liveEvents) close() {
	if l.w != nil {
		l.w.Close()
	}
}
