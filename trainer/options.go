package trainer

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"math/rand/v2"
	"sort"
	"time"
)

// Dataset is a random-access source of packed rows.
type Dataset interface {
	Len() int
	Row(i int) (PackedRow, error)
}

// Rows is an in-memory Dataset.
type Rows []PackedRow

func (r Rows) Len() int                     { return len(r) }
func (r Rows) Row(i int) (PackedRow, error) { return r[i], nil }

// TrainOptions configures Train: the schedule, the data order and what is
// written where. The adapter's shape and the optimizer belong to the
// session (SessionConfig). Zero values take the defaults noted.
type TrainOptions struct {
	// LR is the peak learning rate; Schedule shapes it over the run after
	// WarmupSteps of linear warmup.
	LR          float64
	Schedule    Schedule
	WarmupSteps int
	// WarmupRatio, when set, gives the warmup as that share of the run's
	// steps, rounded up, as transformers' warmup_ratio does (WarmupSteps
	// is then 0).
	WarmupRatio float64
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
	// EarlyStoppingPatience, when positive, ends training once the
	// held-out loss has not improved by more than EarlyStoppingThreshold
	// for that many evaluations in a row, and the adapter written is the
	// one of the best evaluation: transformers' EarlyStoppingCallback with
	// load_best_model_at_end. It needs EvalEvery and held-out rows.
	EarlyStoppingPatience  int
	EarlyStoppingThreshold float64
	// EvalData, when set, are held-out rows of their own (examples held out
	// before packing, so that no training row holds any of them), whose
	// loss is computed instead; EvalFraction must then be 0.
	EvalData Dataset
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
	// BaseModel is recorded in the adapter's adapter_config.json.
	BaseModel BaseModel
	// Progress, when set, is called after every optimizer step.
	Progress func(Progress)
	// Log, when set, receives what a person should know: a resume, and a
	// checkpoint set aside (damaged, or its resume diverged).
	Log *slog.Logger
}

// Progress reports one optimizer step.
type Progress struct {
	Step, TotalSteps int
	Loss             float64
	EvalLoss         float64 // NaN when not evaluated at this step
	LR, GradNorm     float64
	TokensPerSec     float64
	// PeakMemory is the session's peak device memory in bytes (0 on CPU).
	PeakMemory   int64
	Elapsed, ETA time.Duration
}

// Metric is one line of metrics.jsonl. Loss is the mean of the step losses
// since the previous line; the timing fields (and the peak memory, which
// depends on the allocator's history) are the only ones that vary between
// identical runs.
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
	PeakGPUGiB   float64  `json:"peak_gpu_gib,omitempty"`
}

// Result summarises a finished run.
type Result struct {
	Steps     int
	FinalLoss float64 // last logged training loss
	// EvalLoss is the held-out loss of the adapter written: the last
	// evaluation's, or with early stopping the best's; NaN without a
	// held-out split.
	EvalLoss float64
	// BestStep is the step whose adapter was written, with early
	// stopping; StoppedEarly says that it ended the run.
	BestStep     int
	StoppedEarly bool
	// EvalRows is how many rows the eval loss is computed on: those
	// eval_fraction held out of the training data, or EvalData's.
	EvalRows      int
	AdapterDir    string
	MetricsPath   string
	LossCurvePath string
	// PeakMemory is the session's peak device memory in bytes (0 on CPU).
	PeakMemory int64
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
	if o.Schedule == "" {
		o.Schedule = ScheduleConstant
	}
	switch {
	case o.LR <= 0:
		return fmt.Errorf("train: learning rate %v must be positive", o.LR)
	case o.BatchSize < 0 || o.GradAccum < 0 || o.Epochs < 0 || o.MaxSteps < 0 || o.WarmupSteps < 0:
		return errors.New("train: batch size, grad accumulation, epochs, max steps and warmup must not be negative")
	case !(o.WarmupRatio >= 0 && o.WarmupRatio <= 1):
		return fmt.Errorf("train: warmup ratio %v must be in [0, 1]", o.WarmupRatio)
	case o.WarmupRatio > 0 && o.WarmupSteps > 0:
		return errors.New("train: give warmup steps or a warmup ratio, not both")
	case o.EvalFraction < 0 || o.EvalFraction >= 1:
		return fmt.Errorf("train: eval fraction %v must be in [0, 1)", o.EvalFraction)
	case o.EvalData != nil && o.EvalFraction > 0:
		return errors.New("train: held-out rows are given, and an eval fraction would hold out training rows too; give one of them")
	case o.EvalData != nil && o.EvalData.Len() == 0:
		return errors.New("train: the held-out rows are empty")
	case o.EarlyStoppingPatience < 0 || o.EarlyStoppingThreshold < 0:
		return errors.New("train: early stopping's patience and threshold must not be negative")
	case o.EarlyStoppingPatience > 0 && (o.EvalEvery == 0 || o.EvalFraction == 0 && o.EvalData == nil):
		return errors.New("train: early stopping needs evaluations: held-out rows and an eval interval")
	case o.OutDir == "":
		return errors.New("train: no output directory")
	}
	if _, err := LRFactor(o.Schedule, 0, 0, 1); err != nil {
		return fmt.Errorf("train: %w", err)
	}
	return nil
}

// fingerprint identifies what a checkpoint may be resumed into: every
// option that changes the numbers, the session (backend, precision,
// adapter shape, optimizer, model shape) and the data's size.
func (o *TrainOptions) fingerprint(s Session, rows int) string {
	session := s.Config()
	// Recomputing the layers gives the same numbers, and it is what one
	// turns off or on between attempts when memory runs short: either
	// resumes the other's checkpoints (true is the default the checkpoints
	// of earlier versions were written with).
	session.GradientCheckpointing = true
	b, _ := json.Marshal(struct {
		LR                             float64
		Schedule                       Schedule
		Warmup                         int
		Clip                           float64
		Batch, Accum, Epochs, MaxSteps int
		Seed                           uint64
		EvalFraction                   float64
		EvalEvery, LogEvery            int
		Rows                           int
		Backend                        string
		Session                        SessionConfig
		Config                         *Config
		EvalRows                       int     `json:",omitempty"`
		Patience                       int     `json:",omitempty"`
		Threshold                      float64 `json:",omitempty"`
	}{o.LR, o.Schedule, o.WarmupSteps, o.MaxGradNorm,
		o.BatchSize, o.GradAccum, o.Epochs, o.MaxSteps, o.Seed, o.EvalFraction, o.EvalEvery, o.LogEvery, rows,
		s.Backend(), session, s.Model().Config, o.evalRows(), o.EarlyStoppingPatience, o.EarlyStoppingThreshold})
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])
}

func (o *TrainOptions) evalRows() int {
	if o.EvalData == nil {
		return 0
	}
	return o.EvalData.Len()
}

// rowPlan is the deterministic schedule of a run: which rows are held out
// and which rows each micro-batch of each epoch holds.
type rowPlan struct {
	train, eval   []int
	microPerEpoch int
	stepsPerEpoch int
	total         int
}

func makeRowPlan(n int, o *TrainOptions) (*rowPlan, error) {
	if n == 0 {
		return nil, errors.New("train: no rows")
	}
	perm := rand.New(rand.NewPCG(o.Seed, 0x5eed)).Perm(n)
	nEval := 0
	if o.EvalFraction > 0 {
		nEval = max(1, int(math.Round(o.EvalFraction*float64(n))))
	}
	if nEval >= n {
		return nil, fmt.Errorf("train: holding out %d of %d rows (eval_fraction %v) leaves none to train on; lower eval_fraction, or pack more rows", nEval, n, o.EvalFraction)
	}
	p := &rowPlan{eval: append([]int(nil), perm[:nEval]...), train: append([]int(nil), perm[nEval:]...)}
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
func (p *rowPlan) epochOrder(seed uint64, epoch int) []int {
	order := append([]int(nil), p.train...)
	rand.New(rand.NewPCG(seed, uint64(epoch)+1)).Shuffle(len(order), func(i, j int) { order[i], order[j] = order[j], order[i] })
	return order
}

// stepRows returns the micro-batches (as row indices) of optimizer step s
// (counted from 0): its epoch's micro-batches s·accum ... up to the epoch's end.
func (p *rowPlan) stepRows(seed uint64, s int, o *TrainOptions) [][]int {
	epoch, within := s/p.stepsPerEpoch, s%p.stepsPerEpoch
	order := p.epochOrder(seed, epoch)
	var micro [][]int
	for mb := within * o.GradAccum; mb < min((within+1)*o.GradAccum, p.microPerEpoch); mb++ {
		micro = append(micro, order[mb*o.BatchSize:min((mb+1)*o.BatchSize, len(order))])
	}
	return micro
}
