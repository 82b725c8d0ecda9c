package trainer

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"gemmaft/internal/atomicfile"
	"gemmaft/internal/dirsum"
	"gemmaft/trainer/safetensors"
)

// trainState is what a checkpoint records beside the adapter and the
// optimizer state. Every random choice derives from the seed and the step,
// so the step is the whole RNG state.
type trainState struct {
	Fingerprint  string  `json:"fingerprint"`
	Step         int     `json:"step"`
	MetricsBytes int64   `json:"metrics_bytes"`
	LogLossSum   float64 `json:"log_loss_sum"`
	LogSteps     int     `json:"log_steps"`
	Tokens       int64   `json:"tokens"`
	LastEval     float64 `json:"last_eval"`
	HasEval      bool    `json:"has_eval"`
	// Early stopping: the best held-out loss so far, its step, and the
	// evaluations since without an improvement. The best step's adapter
	// is kept in the checkpoint's best/ when it is not the checkpoint's own.
	BestEval float64 `json:"best_eval,omitempty"`
	BestStep int     `json:"best_step,omitempty"`
	BadEvals int     `json:"bad_evals,omitempty"`
	// ElapsedSec is the training's time up to the checkpoint, over every
	// attempt, from which a resumed run's metrics count on.
	ElapsedSec float64 `json:"elapsed_sec,omitempty"`
}

// bestDir holds, in a checkpoint, the adapter of the best evaluation.
const bestDir = "best"

// openMetrics (re)creates metrics.jsonl holding the lines a resumed
// checkpoint had logged (lines written after it by the interrupted run are
// dropped) and returns it open for appending, with those lines parsed.
func openMetrics(path string, logged []byte) (*os.File, []Metric, error) {
	var history []Metric
	for _, line := range bytes.Split(bytes.TrimSpace(logged), []byte("\n")) {
		if len(line) == 0 {
			continue
		}
		var mt Metric
		if err := json.Unmarshal(line, &mt); err != nil {
			return nil, nil, fmt.Errorf("checkpoint metrics: %w", err)
		}
		history = append(history, mt)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return nil, nil, err
	}
	if _, err := f.Write(logged); err != nil {
		f.Close()
		return nil, nil, err
	}
	return f, history, nil
}

// readPrefix returns the first n bytes of f.
func readPrefix(f *os.File, n int64) ([]byte, error) {
	buf := make([]byte, n)
	if _, err := f.ReadAt(buf, 0); err != nil && n > 0 {
		return nil, err
	}
	return buf, nil
}

// Checkpoints are directories checkpoints/step-NNNNNNNN holding the adapter
// in PEFT format, optimizer.safetensors, metrics.jsonl, state.json and
// SHA256SUMS, the digests of the others. Each is written under a temporary
// name and renamed into place; the file "latest" then names it (replaced
// atomically), and checkpoints older than the one before it are removed.
// A crash at any point leaves complete checkpoints only.
//
// A resume takes the newest checkpoint that passes its checks (digests,
// the run's fingerprint, finite values). One that fails is set aside:
// renamed damaged-step-NNNNNNNN-<time>, with a SET_ASIDE file saying why,
// kept for inspection and named in the log; the run then resumes from the
// checkpoint before it, or from scratch. The same happens to a checkpoint
// whose resume gives a non-finite loss before the next checkpoint.

const (
	latestFile    = "latest"
	optimizerFile = "optimizer.safetensors"
	stateFile     = "state.json"
	// keepCheckpoints is how many complete checkpoints are kept: the newest,
	// and the one to fall back to should the newest prove bad.
	keepCheckpoints = 2
	stepPrefix      = "step-"
	setAsidePrefix  = "damaged-"
)

func saveCheckpoint(dir string, info *ModelInfo, st trainState, a, best *Adapter, opt *OptimizerState, metrics []byte) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	name := fmt.Sprintf(stepPrefix+"%08d", st.Step)
	tmp, err := os.MkdirTemp(dir, "."+name+".tmp")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	// Checkpoints name no base model: they never leave the checkpoint
	// folder, and a path would tie them to where the run happened.
	if err := info.SaveAdapter(tmp, a, BaseModel{}); err != nil {
		return err
	}
	if best != nil && st.BestStep != st.Step {
		if err := info.SaveAdapter(filepath.Join(tmp, bestDir), best, BaseModel{}); err != nil {
			return err
		}
	}
	if err := safetensors.WriteFile(filepath.Join(tmp, optimizerFile), opt.Tensors,
		map[string]string{"step": fmt.Sprint(opt.Step), "optimizer": opt.Name}); err != nil {
		return err
	}
	if err := atomicfile.WriteFile(filepath.Join(tmp, MetricsFile), metrics); err != nil {
		return err
	}
	sb, _ := json.MarshalIndent(st, "", "  ")
	if err := atomicfile.WriteFile(filepath.Join(tmp, stateFile), sb); err != nil {
		return err
	}
	// The digests are written last, from the files as they are on disk.
	if err := dirsum.Write(tmp); err != nil {
		return err
	}
	if err := atomicfile.SyncDir(tmp); err != nil {
		return err
	}
	final := filepath.Join(dir, name)
	os.RemoveAll(final)
	if err := os.Rename(tmp, final); err != nil {
		return err
	}
	if err := atomicfile.SyncDir(dir); err != nil {
		return err
	}
	if err := atomicfile.WriteFile(filepath.Join(dir, latestFile), []byte(name+"\n")); err != nil {
		return err
	}
	steps := checkpointNames(dir)
	for i := 0; i < len(steps)-keepCheckpoints; i++ {
		os.RemoveAll(filepath.Join(dir, steps[i]))
	}
	return nil
}

// checkpointNames lists the complete checkpoints in dir, oldest first.
func checkpointNames(dir string) []string {
	entries, _ := os.ReadDir(dir)
	var names []string
	for _, e := range entries {
		if e.IsDir() && strings.HasPrefix(e.Name(), stepPrefix) {
			names = append(names, e.Name())
		}
	}
	sort.Strings(names) // fixed-width step numbers
	return names
}

// NewestCheckpointStep is the step of the newest complete checkpoint in
// dir (a run's CheckpointDir), 0 when it holds none. It reads names only:
// the run checks the checkpoint before it resumes from it.
func NewestCheckpointStep(dir string) int {
	names := checkpointNames(dir)
	if len(names) == 0 {
		return 0
	}
	step, _ := strconv.Atoi(strings.TrimPrefix(names[len(names)-1], stepPrefix))
	return step
}

// savedRun is a checkpoint read back: where to resume from.
type savedRun struct {
	dir       string
	state     trainState
	adapter   *Adapter
	best      *Adapter // the best evaluation's adapter (early stopping), or nil
	optimizer *OptimizerState
	metrics   []byte
}

// loadCheckpoint reads the newest good checkpoint in dir, setting aside
// every newer one that fails its checks, or returns nil when none is left.
// A checkpoint of another run (other options, model, data or backend) is an
// error: it is no damage, and the caller decides whether to start over.
func loadCheckpoint(dir string, info *ModelInfo, fingerprint string, log *slog.Logger) (*savedRun, error) {
	names := checkpointNames(dir)
	for i := len(names) - 1; i >= 0; i-- {
		ck := filepath.Join(dir, names[i])
		run, err := readCheckpoint(ck, info, fingerprint)
		if err == nil {
			return run, nil
		}
		var other *otherRunError
		if errors.As(err, &other) {
			return nil, err
		}
		next := "starting from scratch"
		if i > 0 {
			next = "trying " + names[i-1]
		}
		if err := setAside(ck, fmt.Sprintf("failed its check before a resume: %v", err), next, log); err != nil {
			return nil, err
		}
	}
	return nil, nil
}

// setAside renames a bad checkpoint out of the way, keeping it for
// inspection with a note of why, and logs where it went.
func setAside(ck, why, next string, log *slog.Logger) error {
	dst := filepath.Join(filepath.Dir(ck), setAsidePrefix+filepath.Base(ck)+"-"+time.Now().UTC().Format("20060102T150405.000000000Z"))
	if err := os.Rename(ck, dst); err != nil {
		return fmt.Errorf("setting aside checkpoint %s: %w", ck, err)
	}
	if err := dirsum.SetAside(dst, why); err != nil {
		return err
	}
	if log != nil {
		log.Warn("checkpoint set aside: "+why+"; "+next, "checkpoint", ck, "kept_as", dst)
	}
	return nil
}

// otherRunError: a checkpoint written by a run with other settings.
type otherRunError struct{ ck, dir string }

func (e *otherRunError) Error() string {
	return fmt.Sprintf("%s: the checkpoint belongs to a run with other options, model, data or backend; remove %s to start over", e.ck, e.dir)
}

// readCheckpoint reads and checks one checkpoint folder.
func readCheckpoint(ck string, info *ModelInfo, fingerprint string) (*savedRun, error) {
	if err := dirsum.Verify(ck); err != nil {
		return nil, err
	}
	run := &savedRun{dir: ck}
	sb, err := os.ReadFile(filepath.Join(ck, stateFile))
	if err != nil {
		return nil, err
	}
	if err := json.Unmarshal(sb, &run.state); err != nil {
		return nil, fmt.Errorf("%s: %w", stateFile, err)
	}
	if run.state.Fingerprint != fingerprint {
		return nil, &otherRunError{ck: ck, dir: filepath.Dir(ck)}
	}
	if run.adapter, err = info.LoadAdapter(ck); err != nil {
		return nil, err
	}
	switch {
	case run.state.BestStep == run.state.Step:
		run.best = run.adapter
	case run.state.BestStep > 0:
		if run.best, err = info.LoadAdapter(filepath.Join(ck, bestDir)); err != nil {
			return nil, fmt.Errorf("the best evaluation's adapter: %w", err)
		}
	}
	f, err := safetensors.Open(filepath.Join(ck, optimizerFile))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	opt := &OptimizerState{Name: f.Header.Metadata["optimizer"]}
	if opt.Name == "" {
		opt.Name = "adamw" // checkpoints written before 8-bit AdamW existed
	}
	fmt.Sscan(f.Header.Metadata["step"], &opt.Step)
	for _, t := range f.Header.Tensors {
		_, raw, err := f.Raw(t.Name)
		if err != nil {
			return nil, err
		}
		if i := safetensors.FirstNonFinite(t.DType, raw); i >= 0 {
			return nil, fmt.Errorf("%s: optimizer tensor %s holds a non-finite value at element %d", optimizerFile, t.Name, i)
		}
		opt.Tensors = append(opt.Tensors, safetensors.Tensor{Name: t.Name, DType: t.DType, Shape: t.Shape, Data: raw})
	}
	if opt.Step != run.state.Step {
		return nil, fmt.Errorf("optimizer at step %d, state at %d", opt.Step, run.state.Step)
	}
	run.optimizer = opt
	if run.metrics, err = os.ReadFile(filepath.Join(ck, MetricsFile)); err != nil {
		return nil, err
	}
	if int64(len(run.metrics)) != run.state.MetricsBytes {
		return nil, fmt.Errorf("metrics hold %d bytes, the state says %d", len(run.metrics), run.state.MetricsBytes)
	}
	return run, nil
}
