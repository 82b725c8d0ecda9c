package trainer

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"gemmaft/trainer/safetensors"

	"gemmaft/internal/atomicfile"
)

// ErrNoGPUBackend says that this build trains on the CPU reference backend
// only; the stage asking for backend cuda and `pipeline doctor` both say so.
var ErrNoGPUBackend = errors.New("the GPU trainer is not in this build yet; training runs on the CPU reference backend")

// Dataset is a random-access source of packed rows.
type Dataset interface {
	Len() int
	Row(i int) (PackedRow, error)
}

// Rows is an in-memory Dataset.
type Rows []PackedRow

func (r Rows) Len() int                     { return len(r) }
func (r Rows) Row(i int) (PackedRow, error) { return r[i], nil }

// TrainOptions configures Train. Zero values take the defaults noted.
type TrainOptions struct {
	LoRA LoRAConfig
	// LR is the peak learning rate; Schedule shapes it over the run after
	// WarmupSteps of linear warmup.
	LR          float64
	Schedule    Schedule
	WarmupSteps int
	// AdamW settings; defaults 0.9, 0.999, 1e-8, weight decay 0.
	Beta1, Beta2, Eps, WeightDecay float64
	// MaxGradNorm clips the global gradient norm; 0 disables clipping.
	MaxGradNorm float64
	// BatchSize rows per micro-batch (default 1), GradAccum micro-batches
	// per optimizer step (default 1), Epochs passes over the data
	// (default 1). MaxSteps, when set, stops earlier.
	BatchSize, GradAccum, Epochs, MaxSteps int
	// Seed fixes the LoRA initialisation, the data order, the held-out
	// split and dropout.
	Seed uint64
	// EvalFraction of the rows (at least one when positive) is held out;
	// its loss is computed every EvalEvery steps and at the end.
	EvalFraction float64
	EvalEvery    int
	// LogEvery writes a metrics line every so many steps (default 1) and
	// at the last step.
	LogEvery int
	// CheckpointEvery writes a resumable checkpoint every so many steps; 0
	// writes none.
	CheckpointEvery int
	// OutDir receives adapter/, metrics.jsonl and loss.svg.
	OutDir string
	// CheckpointDir holds the checkpoints (default OutDir/checkpoints). It
	// may lie outside OutDir, so a run can resume into a fresh OutDir: each
	// checkpoint carries the metrics written so far.
	CheckpointDir string
	// BaseModel is recorded in the adapter's base_model_name_or_path.
	BaseModel string
	// Progress, when set, is called after every optimizer step.
	Progress func(Progress)
}

// Progress reports one optimizer step.
type Progress struct {
	Step, TotalSteps int
	Loss             float64
	EvalLoss         float64 // NaN when not evaluated at this step
	LR, GradNorm     float64
	TokensPerSec     float64
	Elapsed, ETA     time.Duration
}

// Metric is one line of metrics.jsonl. Loss is the mean of the step losses
// since the previous line; the timing fields are the only ones that vary
// between identical runs.
type Metric struct {
	Step         int      `json:"step"`
	Epoch        float64  `json:"epoch"`
	Loss         float64  `json:"loss"`
	EvalLoss     *float64 `json:"eval_loss,omitempty"`
	LR           float64  `json:"lr"`
	GradNorm     float64  `json:"grad_norm"`
	Tokens       int64    `json:"tokens"`
	TokensPerSec float64  `json:"tokens_per_sec"`
	ElapsedSec   float64  `json:"elapsed_sec"`
}

// Result summarises a finished run.
type Result struct {
	Steps         int
	FinalLoss     float64 // last logged training loss
	EvalLoss      float64 // NaN without a held-out split
	AdapterDir    string
	MetricsPath   string
	LossCurvePath string
}

// Output names inside TrainOptions.OutDir.
const (
	AdapterDirName     = "adapter"
	MetricsFile        = "metrics.jsonl"
	LossCurveFile      = "loss.svg"
	CheckpointsDirName = "checkpoints"
)

func (o *TrainOptions) defaults() error {
	if o.BatchSize == 0 {
		o.BatchSize = 1
	}
	if o.GradAccum == 0 {
		o.GradAccum = 1
	}
	if o.Epochs == 0 {
		o.Epochs = 1
	}
	if o.LogEvery == 0 {
		o.LogEvery = 1
	}
	if o.Beta1 == 0 {
		o.Beta1 = 0.9
	}
	if o.Beta2 == 0 {
		o.Beta2 = 0.999
	}
	if o.Eps == 0 {
		o.Eps = 1e-8
	}
	if o.Schedule == "" {
		o.Schedule = ScheduleConstant
	}
	switch {
	case o.LR <= 0:
		return fmt.Errorf("train: learning rate %v must be positive", o.LR)
	case o.BatchSize < 0 || o.GradAccum < 0 || o.Epochs < 0 || o.MaxSteps < 0 || o.WarmupSteps < 0:
		return errors.New("train: batch size, grad accumulation, epochs, max steps and warmup must not be negative")
	case o.EvalFraction < 0 || o.EvalFraction >= 1:
		return fmt.Errorf("train: eval fraction %v must be in [0, 1)", o.EvalFraction)
	case o.OutDir == "":
		return errors.New("train: no output directory")
	}
	if _, err := LRFactor(o.Schedule, 0, 0, 1); err != nil {
		return fmt.Errorf("train: %v", err)
	}
	return o.LoRA.Validate()
}

// fingerprint identifies what a checkpoint may be resumed into: every
// option that changes the numbers, and the data's size.
func (o *TrainOptions) fingerprint(m *Model, rows int) string {
	b, _ := json.Marshal(struct {
		LoRA                           LoRAConfig
		LR                             float64
		Schedule                       Schedule
		Warmup                         int
		B1, B2, Eps, WD, Clip          float64
		Batch, Accum, Epochs, MaxSteps int
		Seed                           uint64
		EvalFraction                   float64
		EvalEvery, LogEvery            int
		Rows                           int
		Config                         *Config
	}{o.LoRA, o.LR, o.Schedule, o.WarmupSteps, o.Beta1, o.Beta2, o.Eps, o.WeightDecay, o.MaxGradNorm,
		o.BatchSize, o.GradAccum, o.Epochs, o.MaxSteps, o.Seed, o.EvalFraction, o.EvalEvery, o.LogEvery, rows, m.Config})
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])
}

// plan is the deterministic schedule of a run: which rows are held out and
// which rows each micro-batch of each epoch holds.
type plan struct {
	train, eval   []int
	microPerEpoch int
	stepsPerEpoch int
	total         int
}

func makePlan(n int, o *TrainOptions) (*plan, error) {
	if n == 0 {
		return nil, errors.New("train: no rows")
	}
	perm := rand.New(rand.NewPCG(o.Seed, 0x5eed)).Perm(n)
	nEval := 0
	if o.EvalFraction > 0 {
		nEval = max(1, int(math.Round(o.EvalFraction*float64(n))))
	}
	if nEval >= n {
		return nil, fmt.Errorf("train: holding out %d of %d rows leaves none to train on", nEval, n)
	}
	p := &plan{eval: append([]int(nil), perm[:nEval]...), train: append([]int(nil), perm[nEval:]...)}
	sort.Ints(p.eval)
	sort.Ints(p.train)
	p.microPerEpoch = (len(p.train) + o.BatchSize - 1) / o.BatchSize
	p.stepsPerEpoch = (p.microPerEpoch + o.GradAccum - 1) / o.GradAccum
	p.total = p.stepsPerEpoch * o.Epochs
	if o.MaxSteps > 0 && o.MaxSteps < p.total {
		p.total = o.MaxSteps
	}
	return p, nil
}

// epochOrder is the shuffled order of training rows in an epoch.
func (p *plan) epochOrder(seed uint64, epoch int) []int {
	order := append([]int(nil), p.train...)
	rand.New(rand.NewPCG(seed, uint64(epoch)+1)).Shuffle(len(order), func(i, j int) { order[i], order[j] = order[j], order[i] })
	return order
}

// stepRows returns the micro-batches (as row indices) of optimizer step s
// (counted from 0): its epoch's micro-batches s·accum ... up to the epoch's end.
func (p *plan) stepRows(seed uint64, s int, o *TrainOptions) [][]int {
	epoch, within := s/p.stepsPerEpoch, s%p.stepsPerEpoch
	order := p.epochOrder(seed, epoch)
	var micro [][]int
	for mb := within * o.GradAccum; mb < min((within+1)*o.GradAccum, p.microPerEpoch); mb++ {
		micro = append(micro, order[mb*o.BatchSize:min((mb+1)*o.BatchSize, len(order))])
	}
	return micro
}

// trainState is what a checkpoint records beside the adapter and the
// optimizer moments. Every random choice derives from the seed and the step,
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

// Train fine-tunes a LoRA adapter on m with rows from data and writes the
// adapter (PEFT format), metrics.jsonl and loss.svg into opts.OutDir. With
// CheckpointEvery set it writes resumable checkpoints, and a later call
// with the same options resumes from the newest one and continues the same
// run: on the CPU backend the losses, metrics (timings aside) and adapter
// are bit for bit those of an uninterrupted run.
func Train(ctx context.Context, m *Model, data Dataset, opts TrainOptions) (*Result, error) {
	if err := opts.defaults(); err != nil {
		return nil, err
	}
	p, err := makePlan(data.Len(), &opts)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(opts.OutDir, 0o755); err != nil {
		return nil, err
	}
	fp := opts.fingerprint(m, data.Len())
	adapter, err := NewAdapter(m.Config, opts.LoRA, opts.Seed)
	if err != nil {
		return nil, err
	}
	params := adapter.Params()
	opt := NewAdamW(params, opts.Beta1, opts.Beta2, opts.Eps, opts.WeightDecay)
	st := trainState{Fingerprint: fp}
	ckDir := opts.CheckpointDir
	if ckDir == "" {
		ckDir = filepath.Join(opts.OutDir, CheckpointsDirName)
	}
	var logged []byte
	if resumed, lines, err := loadCheckpoint(ckDir, m, fp, adapter, opt); err != nil {
		return nil, err
	} else if resumed != nil {
		st, logged = *resumed, lines
	}
	metricsPath := filepath.Join(opts.OutDir, MetricsFile)
	metrics, history, err := openMetrics(metricsPath, logged)
	if err != nil {
		return nil, err
	}
	defer metrics.Close()

	// batchOf builds the batch of rows idx and counts its real (non-padding)
	// tokens.
	batchOf := func(idx []int) (*Batch, int64, error) {
		rows := make([]PackedRow, len(idx))
		var tokens int64
		for i, r := range idx {
			row, err := data.Row(r)
			if err != nil {
				return nil, 0, err
			}
			rows[i] = row
			for _, l := range row.SeqLengths {
				tokens += int64(l)
			}
		}
		b, err := NewBatch(rows)
		return b, tokens, err
	}
	evalLoss := func() (float64, error) {
		var sum float64
		var n int
		for i := 0; i < len(p.eval); i += opts.BatchSize {
			b, _, err := batchOf(p.eval[i:min(i+opts.BatchSize, len(p.eval))])
			if err != nil {
				return 0, err
			}
			s, c, err := m.Loss(adapter, b)
			if err != nil {
				return 0, err
			}
			sum, n = sum+s, n+c
		}
		if n == 0 {
			return math.NaN(), nil
		}
		return sum / float64(n), nil
	}

	start := time.Now()
	startStep := st.Step
	var sinceLogTokens int64
	sinceLog := time.Now()
	for st.Step < p.total {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		step := st.Step
		micro := p.stepRows(opts.Seed, step, &opts)
		batches := make([]*Batch, len(micro))
		normalizer := 0
		var stepTokens int64
		for i, idx := range micro {
			b, tokens, err := batchOf(idx)
			if err != nil {
				return nil, fmt.Errorf("step %d: %v", step+1, err)
			}
			batches[i] = b
			normalizer += b.Trained()
			stepTokens += tokens
		}
		adapter.ZeroGrad()
		var lossSum float64
		for i, b := range batches {
			if normalizer == 0 {
				break // nothing to train in this step: a zero update
			}
			if err := ctx.Err(); err != nil {
				return nil, err
			}
			s, _, err := m.LossAndGrad(adapter, b, float64(normalizer), opts.Seed^uint64(step)<<20^uint64(i))
			if err != nil {
				return nil, fmt.Errorf("step %d: %v", step+1, err)
			}
			lossSum += s
		}
		loss := 0.0
		if normalizer > 0 {
			loss = lossSum / float64(normalizer)
		}
		if math.IsNaN(loss) || math.IsInf(loss, 0) {
			return nil, fmt.Errorf("step %d: loss is %v", step+1, loss)
		}
		gradNorm := ClipGradNorm(params, opts.MaxGradNorm)
		factor, _ := LRFactor(opts.Schedule, step, opts.WarmupSteps, p.total)
		lr := opts.LR * factor
		if err := opt.Update(params, lr); err != nil {
			return nil, err
		}
		st.Step++
		st.Tokens += stepTokens
		sinceLogTokens += stepTokens
		st.LogLossSum += loss
		st.LogSteps++

		evalNow := len(p.eval) > 0 && ((opts.EvalEvery > 0 && st.Step%opts.EvalEvery == 0) || st.Step == p.total)
		ev := math.NaN()
		if evalNow {
			if ev, err = evalLoss(); err != nil {
				return nil, err
			}
			st.LastEval, st.HasEval = ev, true
		}
		elapsed := time.Since(start)
		if st.Step%opts.LogEvery == 0 || st.Step == p.total || evalNow {
			rate := float64(sinceLogTokens) / max(time.Since(sinceLog).Seconds(), 1e-9)
			line := Metric{Step: st.Step, Epoch: float64(st.Step) / float64(p.stepsPerEpoch),
				Loss: st.LogLossSum / float64(st.LogSteps), LR: lr, GradNorm: gradNorm, Tokens: st.Tokens,
				TokensPerSec: rate, ElapsedSec: elapsed.Seconds()}
			if evalNow {
				line.EvalLoss = &ev
			}
			b, _ := json.Marshal(line)
			b = append(b, '\n')
			if _, err := metrics.Write(b); err != nil {
				return nil, err
			}
			st.MetricsBytes += int64(len(b))
			history = append(history, line)
			st.LogLossSum, st.LogSteps = 0, 0
			sinceLogTokens, sinceLog = 0, time.Now()
		}
		if opts.Progress != nil {
			done := st.Step - startStep
			eta := time.Duration(float64(elapsed) / float64(done) * float64(p.total-st.Step))
			opts.Progress(Progress{Step: st.Step, TotalSteps: p.total, Loss: loss, EvalLoss: ev, LR: lr,
				GradNorm: gradNorm, TokensPerSec: float64(st.Tokens) / max(elapsed.Seconds(), 1e-9), Elapsed: elapsed, ETA: eta})
		}
		if opts.CheckpointEvery > 0 && (st.Step%opts.CheckpointEvery == 0 || st.Step == p.total) {
			logged, err := readPrefix(metrics, st.MetricsBytes)
			if err != nil {
				return nil, err
			}
			if err := saveCheckpoint(ckDir, m, st, adapter, opt, logged); err != nil {
				return nil, err
			}
		}
	}

	adapterDir := filepath.Join(opts.OutDir, AdapterDirName)
	if err := m.SaveAdapter(adapterDir, adapter, opts.BaseModel); err != nil {
		return nil, err
	}
	svgPath := filepath.Join(opts.OutDir, LossCurveFile)
	if err := atomicfile.WriteFile(svgPath, LossCurveSVG(history)); err != nil {
		return nil, err
	}
	res := &Result{Steps: st.Step, EvalLoss: math.NaN(), AdapterDir: adapterDir, MetricsPath: metricsPath, LossCurvePath: svgPath}
	if len(history) > 0 {
		res.FinalLoss = history[len(history)-1].Loss
	}
	if st.HasEval {
		res.EvalLoss = st.LastEval
	}
	return res, nil
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
			return nil, nil, fmt.Errorf("checkpoint metrics: %v", err)
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

const latestFile = "latest"

func saveCheckpoint(dir string, m *Model, st trainState, a *Adapter, opt *AdamW, metrics []byte) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	name := fmt.Sprintf("step-%08d", st.Step)
	tmp, err := os.MkdirTemp(dir, "."+name+".tmp")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	if err := m.SaveAdapter(tmp, a, ""); err != nil {
		return err
	}
	var ts []safetensors.Tensor
	for i, p := range a.Params() {
		mb, _ := safetensors.EncodeFloat32(safetensors.F32, opt.M[i])
		vb, _ := safetensors.EncodeFloat32(safetensors.F32, opt.V[i])
		ts = append(ts, safetensors.Tensor{Name: p.Name + ".exp_avg", DType: safetensors.F32, Shape: []int{len(opt.M[i])}, Data: mb},
			safetensors.Tensor{Name: p.Name + ".exp_avg_sq", DType: safetensors.F32, Shape: []int{len(opt.V[i])}, Data: vb})
	}
	if err := safetensors.WriteFile(filepath.Join(tmp, "optimizer.safetensors"), ts,
		map[string]string{"step": fmt.Sprint(opt.Step)}); err != nil {
		return err
	}
	if err := atomicfile.WriteFile(filepath.Join(tmp, MetricsFile), metrics); err != nil {
		return err
	}
	sb, _ := json.MarshalIndent(st, "", "  ")
	if err := atomicfile.WriteFile(filepath.Join(tmp, "state.json"), sb); err != nil {
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

// loadCheckpoint restores the newest checkpoint into a and opt and returns
// its state and the metrics lines logged up to it, or nil when there is none.
func loadCheckpoint(dir string, m *Model, fingerprint string, a *Adapter, opt *AdamW) (*trainState, []byte, error) {
	b, err := os.ReadFile(filepath.Join(dir, latestFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil, nil
	} else if err != nil {
		return nil, nil, err
	}
	name := strings.TrimSpace(string(b))
	if strings.ContainsAny(name, `/\`) || name == "" || name == ".." {
		return nil, nil, fmt.Errorf("%s: bad checkpoint name %q", dir, name)
	}
	ck := filepath.Join(dir, name)
	var st trainState
	sb, err := os.ReadFile(filepath.Join(ck, "state.json"))
	if err != nil {
		return nil, nil, err
	}
	if err := json.Unmarshal(sb, &st); err != nil {
		return nil, nil, fmt.Errorf("%s: %v", ck, err)
	}
	if st.Fingerprint != fingerprint {
		return nil, nil, fmt.Errorf("%s: the checkpoint belongs to a run with other options, model or data; remove %s to start over", ck, dir)
	}
	saved, err := m.LoadAdapter(ck)
	if err != nil {
		return nil, nil, err
	}
	dst, src := a.Params(), saved.Params()
	if len(dst) != len(src) {
		return nil, nil, fmt.Errorf("%s: adapter has %d tensors, want %d", ck, len(src), len(dst))
	}
	for i := range dst {
		copy(dst[i].Data, src[i].Data)
	}
	f, err := safetensors.Open(filepath.Join(ck, "optimizer.safetensors"))
	if err != nil {
		return nil, nil, err
	}
	defer f.Close()
	for i, p := range dst {
		for _, part := range []struct {
			suffix string
			dst    []float32
		}{{".exp_avg", opt.M[i]}, {".exp_avg_sq", opt.V[i]}} {
			_, v, err := f.Float32(p.Name + part.suffix)
			if err != nil {
				return nil, nil, err
			}
			if len(v) != len(part.dst) {
				return nil, nil, fmt.Errorf("%s: %s%s has %d elements, want %d", ck, p.Name, part.suffix, len(v), len(part.dst))
			}
			copy(part.dst, v)
		}
	}
	fmt.Sscan(f.Header.Metadata["step"], &opt.Step)
	if opt.Step != st.Step {
		return nil, nil, fmt.Errorf("%s: optimizer at step %d, state at %d", ck, opt.Step, st.Step)
	}
	metrics, err := os.ReadFile(filepath.Join(ck, MetricsFile))
	if err != nil {
		return nil, nil, err
	}
	if int64(len(metrics)) != st.MetricsBytes {
		return nil, nil, fmt.Errorf("%s: metrics hold %d bytes, the state says %d", ck, len(metrics), st.MetricsBytes)
	}
	return &st, metrics, nil
}
