package stages

import (
	"encoding/json"
	"fmt"
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
