package trainer

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"gemmaft/internal/atomicfile"
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
}

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
// in PEFT format, optimizer.safetensors and state.json. Each is written under
// a temporary name and renamed into place; the file "latest" then names it
// (replaced atomically), and older checkpoints are removed. A crash at any
// point leaves "latest" naming a complete checkpoint.

const (
	latestFile    = "latest"
	optimizerFile = "optimizer.safetensors"
	stateFile     = "state.json"
)

func saveCheckpoint(dir string, info *ModelInfo, st trainState, a *Adapter, opt *OptimizerState, metrics []byte) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	name := fmt.Sprintf("step-%08d", st.Step)
	tmp, err := os.MkdirTemp(dir, "."+name+".tmp")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	if err := info.SaveAdapter(tmp, a, ""); err != nil {
		return err
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
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if e.IsDir() && e.Name() != name && !strings.HasPrefix(e.Name(), ".") {
			os.RemoveAll(filepath.Join(dir, e.Name()))
		}
	}
	return nil
}

// savedRun is a checkpoint read back: where to resume from.
type savedRun struct {
	dir       string
	state     trainState
	adapter   *Adapter
	optimizer *OptimizerState
	metrics   []byte
}

// loadCheckpoint reads the newest checkpoint in dir, or returns nil when
// there is none. A checkpoint of another run (other options, model, data
// or backend) is an error.
func loadCheckpoint(dir string, info *ModelInfo, fingerprint string) (*savedRun, error) {
	b, err := os.ReadFile(filepath.Join(dir, latestFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	} else if err != nil {
		return nil, err
	}
	name := strings.TrimSpace(string(b))
	if strings.ContainsAny(name, `/\`) || name == "" || name == ".." {
		return nil, fmt.Errorf("%s: bad checkpoint name %q", dir, name)
	}
	ck := filepath.Join(dir, name)
	run := &savedRun{dir: ck}
	sb, err := os.ReadFile(filepath.Join(ck, stateFile))
	if err != nil {
		return nil, err
	}
	if err := json.Unmarshal(sb, &run.state); err != nil {
		return nil, fmt.Errorf("%s: %w", ck, err)
	}
	if run.state.Fingerprint != fingerprint {
		return nil, fmt.Errorf("%s: the checkpoint belongs to a run with other options, model, data or backend; remove %s to start over", ck, dir)
	}
	if run.adapter, err = info.LoadAdapter(ck); err != nil {
		return nil, err
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
		opt.Tensors = append(opt.Tensors, safetensors.Tensor{Name: t.Name, DType: t.DType, Shape: t.Shape, Data: raw})
	}
	if opt.Step != run.state.Step {
		return nil, fmt.Errorf("%s: optimizer at step %d, state at %d", ck, opt.Step, run.state.Step)
	}
	run.optimizer = opt
	if run.metrics, err = os.ReadFile(filepath.Join(ck, MetricsFile)); err != nil {
		return nil, err
	}
	if int64(len(run.metrics)) != run.state.MetricsBytes {
		return nil, fmt.Errorf("%s: metrics hold %d bytes, the state says %d", ck, len(run.metrics), run.state.MetricsBytes)
	}
	return run, nil
}
