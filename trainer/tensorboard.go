package trainer

import (
	"bufio"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"time"

	"gemmaft/internal/tfevents"
)

// Event tags of a training run in TensorBoard. They are the names Hugging
// Face's Trainer logs (train/loss, train/learning_rate, train/grad_norm,
// train/epoch, train/num_input_tokens_seen, eval/loss), so that dashboards
// made for TRL or Unsloth runs, in TensorBoard or in wandb after `wandb
// sync --sync-tensorboard`, show these runs too.
const (
	TagLoss         = "train/loss"
	TagLearningRate = "train/learning_rate"
	TagGradNorm     = "train/grad_norm"
	TagEpoch        = "train/epoch"
	TagTokens       = "train/num_input_tokens_seen"
	TagTokensPerSec = "train/tokens_per_second"
	TagPeakGPU      = "train/peak_gpu_memory_gib"
	TagEvalLoss     = "eval/loss"
	// TagSettings is the text of the run's settings.
	TagSettings = "settings"
)

// ReadMetrics reads a metrics.jsonl that Train wrote.
func ReadMetrics(path string) ([]Metric, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []Metric
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for n := 1; sc.Scan(); n++ {
		if len(sc.Bytes()) == 0 {
			continue
		}
		var m Metric
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			return nil, fmt.Errorf("%s line %d: %w", path, n, err)
		}
		out = append(out, m)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return out, nil
}

// WriteEvents writes a run's logged metrics as a TensorBoard event file in
// dir: every metrics line becomes the scalars of its step (the peak GPU
// memory only where a device was used, the eval loss where it was
// computed), and settings, Markdown, the text shown under TagSettings.
// Events are stamped start + elapsed_sec, never going back in time (a run
// resumed from a checkpoint that kept no elapsed time, an older build's,
// counts from the resume).
func WriteEvents(dir string, history []Metric, settings string, start time.Time) error {
	w, err := tfevents.Create(dir, start)
	if err != nil {
		return err
	}
	if settings != "" {
		w.Add(0, start, tfevents.Text(TagSettings, settings))
	}
	gpu := false
	for _, m := range history {
		gpu = gpu || m.PeakGPUGiB > 0
	}
	wall := start
	for _, m := range history {
		if t := start.Add(time.Duration(m.ElapsedSec * float64(time.Second))); t.After(wall) {
			wall = t
		}
		vals := []tfevents.Value{
			tfevents.Scalar(TagLoss, m.Loss),
			tfevents.Scalar(TagLearningRate, m.LR),
			tfevents.Scalar(TagGradNorm, m.GradNorm),
			tfevents.Scalar(TagEpoch, m.Epoch),
			tfevents.Scalar(TagTokens, float64(m.Tokens)),
			tfevents.Scalar(TagTokensPerSec, m.TokensPerSec),
		}
		if gpu {
			vals = append(vals, tfevents.Scalar(TagPeakGPU, m.PeakGPUGiB))
		}
		if m.EvalLoss != nil && !math.IsNaN(*m.EvalLoss) {
			vals = append(vals, tfevents.Scalar(TagEvalLoss, *m.EvalLoss))
		}
		w.Add(int64(m.Step), wall, vals...)
	}
	return w.Close()
}
