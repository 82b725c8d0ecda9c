// Package backendtest is the conformance suite every trainer backend
// passes: the Hugging Face parity cases (loss, LoRA gradients, one clipped
// AdamW step), agreement with the CPU reference over a training run (both
// optimizers, dropout on), bit-for-bit determinism, resuming an interrupted
// run (after a checkpoint, and between checkpoints as Ctrl-C stops one),
// early stopping writing the best evaluation's adapter, gradient
// checkpointing changing nothing, and a state round trip.
// The CPU reference runs it in trainer's tests, the GPU backend in
// trainer/gpu's, each with tolerances that fit its arithmetic.
package backendtest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"gemmaft/trainer"
	"gemmaft/trainer/internal/golden"
)

// Tolerance bounds a backend's differences from its references.
type Tolerance struct {
	// Loss: relative error of a loss against the float64 golden value.
	Loss float64
	// Grad: relative L2 error of each LoRA gradient against the golden one;
	// when 0, the cosine bounds apply instead.
	Grad float64
	// Cosine: the least cosine similarity of the whole adapter's gradient
	// (every LoRA tensor's, as one vector) with the golden one;
	// TensorCosine: the least of each tensor's on its own.
	Cosine, TensorCosine float64
	// CaseCosine, for a parity case whose golden gradient even the
	// reference stack cannot reach at this precision, holds the bounds
	// that stack reaches ({whole, tensor}), in place of Cosine and
	// TensorCosine.
	CaseCosine map[string][2]float64
	// StepLoss: difference of each training step's loss from the CPU
	// reference's over the same run, relative to the loss (absolute below a
	// loss of 1, where a model that memorises its rows has little left to
	// compare).
	StepLoss float64
}

// Opener opens a session of cfg on the backend under test.
type Opener func(t *testing.T, cfg trainer.SessionConfig) trainer.Session

// Run runs the suite. refDir is trainer/testdata/reference.
func Run(t *testing.T, refDir string, open Opener, tol Tolerance) {
	t.Run("ReferenceCases", func(t *testing.T) { referenceCases(t, refDir, open, tol) })
	t.Run("MatchesCPU", func(t *testing.T) {
		for _, opt := range []string{"adamw", "adamw_8bit"} {
			t.Run(opt, func(t *testing.T) { matchesCPU(t, open, opt, tol) })
		}
	})
	t.Run("Deterministic", func(t *testing.T) { deterministic(t, open) })
	t.Run("Resume", func(t *testing.T) { resume(t, open, 1) })
	// Stopped between checkpoints (Ctrl-C): the stop's own checkpoint.
	t.Run("ResumeBetweenCheckpoints", func(t *testing.T) { resume(t, open, 1000) })
	t.Run("EarlyStoppingKeepsBest", func(t *testing.T) { earlyStopping(t, open) })
	t.Run("CheckpointingChangesNothing", func(t *testing.T) { checkpointing(t, open) })
	t.Run("StateRoundTrip", func(t *testing.T) { stateRoundTrip(t, open) })
}

// relL2 is ‖got − want‖ / ‖want‖ and cosine their cosine similarity.
func relL2(got []float32, want []float64) (rel, cosine float64) {
	var num, den, dot, gg float64
	for i, w := range want {
		g := float64(got[i])
		num += (g - w) * (g - w)
		den += w * w
		dot += g * w
		gg += g * g
	}
	return math.Sqrt(num / den), dot / math.Sqrt(den*gg)
}

func relErr(got, want float64) float64 { return math.Abs(got-want) / math.Abs(want) }

func referenceCases(t *testing.T, refDir string, open Opener, tol Tolerance) {
	cases, err := golden.Cases(refDir)
	if err != nil {
		t.Fatal(err)
	}
	if len(cases) < 4 {
		t.Fatalf("found %d golden cases in %s, want at least 4", len(cases), refDir)
	}
	for _, rc := range cases {
		t.Run(rc.Name, func(t *testing.T) {
			tol := tol
			if c, ok := tol.CaseCosine[rc.Name]; ok {
				tol.Cosine, tol.TensorCosine = c[0], c[1]
			}
			ck, err := trainer.OpenCheckpoint(rc.Model())
			if err != nil {
				t.Fatal(err)
			}
			a, err := ck.LoadAdapter(rc.AdapterDir())
			if err != nil {
				t.Fatal(err)
			}
			a.Config.Dropout = 0 // the reference runs PEFT in eval mode
			rows, err := trainer.ReadPackedRows(rc.RowsFile())
			if err != nil {
				t.Fatal(err)
			}
			batch, err := trainer.NewBatch(rows)
			if err != nil {
				t.Fatal(err)
			}
			o := rc.Optimizer
			s := open(t, trainer.SessionConfig{Model: rc.Model(), Quantize: "none", LoRA: a.Config, MaxTokens: len(batch.IDs),
				GradientCheckpointing: true,
				Optimizer:             trainer.OptimizerConfig{Name: "adamw", Beta1: o.Beta1, Beta2: o.Beta2, Eps: o.Eps, WeightDecay: o.WeightDecay}})
			defer s.Close()
			if err := s.SetState(a, nil); err != nil {
				t.Fatal(err)
			}
			sum, count, err := s.LossAndGrad(batch, float64(batch.Trained()), 0)
			if err != nil {
				t.Fatal(err)
			}
			if count != rc.Golden.Tokens {
				t.Fatalf("%d trained tokens, reference %d", count, rc.Golden.Tokens)
			}
			loss := sum / float64(count)
			if e := relErr(loss, rc.Golden.Loss); e > tol.Loss {
				t.Errorf("loss %.9g, reference %.9g: relative error %.3g over %.3g", loss, rc.Golden.Loss, e, tol.Loss)
			}
			g, err := s.Grads()
			if err != nil {
				t.Fatal(err)
			}
			worstRel, worstCos := 0.0, 1.0
			var all []float32
			var allWant []float64
			for _, p := range g.Params() {
				want, err := rc.Tensor(golden.GradKey(ck.PEFTPrefix(), p.Name))
				if err != nil {
					t.Fatal(err)
				}
				all, allWant = append(all, p.Data...), append(allWant, want...)
				rel, cos := relL2(p.Data, want)
				worstRel, worstCos = max(worstRel, rel), min(worstCos, cos)
				if tol.Grad > 0 && rel > tol.Grad {
					t.Errorf("%s: gradient relative error %.3g over %.3g", p.Name, rel, tol.Grad)
				}
				if tol.Grad == 0 && cos < tol.TensorCosine {
					t.Errorf("%s: gradient cosine similarity %.6f under %.6f", p.Name, cos, tol.TensorCosine)
				}
			}
			_, whole := relL2(all, allWant)
			if tol.Grad == 0 && whole < tol.Cosine {
				t.Errorf("the adapter's gradient has cosine similarity %.6f with the reference, under %.6f", whole, tol.Cosine)
			}
			norm, err := s.Step(o.LR, rc.Golden.MaxNorm)
			if err != nil {
				t.Fatal(err)
			}
			// A gradient within cosine c of the reference may differ in norm
			// by about sqrt(2(1 - c)).
			normTol := tol.Grad
			if normTol == 0 {
				normTol = math.Sqrt(2 * (1 - tol.Cosine))
			}
			if e := relErr(norm, rc.Golden.GradNorm); e > normTol {
				t.Errorf("gradient norm %.9g, reference %.9g: relative error %.3g over %.3g", norm, rc.Golden.GradNorm, e, normTol)
			}
			post, n2, err := s.Loss(batch)
			if err != nil {
				t.Fatal(err)
			}
			if e := relErr(post/float64(n2), rc.Golden.PostStepLoss); e > tol.Loss {
				t.Errorf("post-step loss %.9g, reference %.9g: relative error %.3g", post/float64(n2), rc.Golden.PostStepLoss, e)
			}
			t.Logf("loss %.9g (reference %.9g), gradient cosine %.6f (worst tensor %.6f, worst relative error %.3g), post-step %.9g (%.9g)",
				loss, rc.Golden.Loss, whole, worstCos, worstRel, post/float64(n2), rc.Golden.PostStepLoss)
		})
	}
}

// TinyConfig is a small shape with every feature: a global layer (7
// layers), GQA, a window shorter than the examples, linear rope scaling
// and query_pre_attn_scalar different from head_dim. hidden and lora rank
// choose whether LoRA tensors reach 8-bit AdamW's minimum size.
func TinyConfig(hidden int) *trainer.Config {
	c, _ := trainer.Preset("tiny")
	c.VocabSize, c.Hidden, c.Intermediate, c.Layers = 97, hidden, 2*hidden, 7
	c.Heads, c.KVHeads, c.HeadDim, c.QueryPreAttnScalar, c.SlidingWindow = 4, 2, 16, 12, 3
	c.DType = "bfloat16"
	c.Rope[trainer.FullAttention] = trainer.Rope{Theta: 1e6, Type: "linear", Factor: 2}
	c.LayerTypes = nil
	for i := 0; i < c.Layers; i++ {
		lt := trainer.SlidingAttention
		if (i+1)%6 == 0 {
			lt = trainer.FullAttention
		}
		c.LayerTypes = append(c.LayerTypes, lt)
	}
	return c
}

// tinyModel writes a random checkpoint of c and returns its folder. The
// weights' spread shrinks with the width, so wider test models start from
// the same loss.
func tinyModel(t *testing.T, c *trainer.Config) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "model")
	std := 0.2 * math.Sqrt(32/float64(c.Hidden))
	if err := trainer.WriteRandomCheckpoint(dir, c, trainer.InitOptions{Seed: 7, Std: std, NormStd: 0.5}); err != nil {
		t.Fatal(err)
	}
	return dir
}

// Rows makes n packed rows of seqLen tokens with a learnable pattern (each
// token followed by its successor), examples of 3 to 8 tokens and padding.
func Rows(vocab, n, seqLen int, seed uint64) trainer.Rows {
	rng := rand.New(rand.NewPCG(seed, 3))
	var rows trainer.Rows
	for i := 0; i < n; i++ {
		var r trainer.PackedRow
		used := 0
		for used < seqLen-3 {
			l := min(3+rng.IntN(6), seqLen-used)
			r.SeqLengths = append(r.SeqLengths, int32(l))
			for j := 0; j < l; j++ {
				id := int32((i*7 + used + j) % vocab)
				r.InputIDs = append(r.InputIDs, id)
				lab := id
				if j == 0 {
					lab = trainer.IgnoreIndex
				}
				r.Labels = append(r.Labels, lab)
				r.PositionIDs = append(r.PositionIDs, int32(j))
			}
			used += l
		}
		for ; used < seqLen; used++ {
			r.InputIDs = append(r.InputIDs, 0)
			r.Labels = append(r.Labels, trainer.IgnoreIndex)
			r.PositionIDs = append(r.PositionIDs, 0)
		}
		rows = append(rows, r)
	}
	return rows
}

// runConfig is the training the run-level checks share.
func runConfig(model, optimizer string, r int) (trainer.SessionConfig, trainer.TrainOptions) {
	sc := trainer.SessionConfig{Model: model, Quantize: "nf4",
		LoRA:                  trainer.LoRAConfig{R: r, Alpha: float64(2 * r), Dropout: 0.05, Targets: trainer.AllModules},
		Optimizer:             trainer.OptimizerConfig{Name: optimizer, WeightDecay: 0.01},
		GradientCheckpointing: true, MaxTokens: 2 * 16}
	opts := trainer.TrainOptions{LR: 2e-2, Schedule: trainer.ScheduleCosine, WarmupSteps: 2, MaxGradNorm: 1,
		BatchSize: 2, GradAccum: 2, Epochs: 2, Seed: 42, EvalFraction: 0.1, EvalEvery: 4, LogEvery: 1, CheckpointEvery: 1}
	return sc, opts
}

// ReadMetrics reads a run's metrics.jsonl with the fields that vary between
// identical runs (timings, peak memory) zeroed.
func ReadMetrics(t *testing.T, path string) []trainer.Metric {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var out []trainer.Metric
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		var m trainer.Metric
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		m.TokensPerSec, m.ElapsedSec, m.PeakGPUGiB = 0, 0, 0
		out = append(out, m)
	}
	return out
}

func train(t *testing.T, s trainer.Session, rows trainer.Rows, opts trainer.TrainOptions, out string) *trainer.Result {
	t.Helper()
	opts.OutDir = out
	res, err := trainer.Train(context.Background(), s, rows, opts)
	if err != nil {
		t.Fatal(err)
	}
	return res
}

func matchesCPU(t *testing.T, open Opener, optimizer string, tol Tolerance) {
	hidden, r := 32, 4
	if optimizer == "adamw_8bit" {
		// LoRA tensors of 8192 elements and more: 8-bit blocks, one partial.
		hidden, r = 256, 36
	}
	c := TinyConfig(hidden)
	model := tinyModel(t, c)
	rows := Rows(c.VocabSize, 24, 16, 1)
	sc, opts := runConfig(model, optimizer, r)
	if optimizer == "adamw_8bit" {
		// A gentler rate: a run that bounces between steps makes any two
		// backends' losses part ways whatever their precision.
		opts.LR = 5e-3
	}
	s := open(t, sc)
	defer s.Close()
	got := train(t, s, rows, opts, filepath.Join(t.TempDir(), "backend"))
	ref, err := trainer.OpenSession(context.Background(), "cpu", sc)
	if err != nil {
		t.Fatal(err)
	}
	want := train(t, ref, rows, opts, filepath.Join(t.TempDir(), "cpu"))
	gm, wm := ReadMetrics(t, got.MetricsPath), ReadMetrics(t, want.MetricsPath)
	if len(gm) != len(wm) {
		t.Fatalf("%d metric lines, CPU %d", len(gm), len(wm))
	}
	worst := 0.0
	for i := range gm {
		e := math.Abs(gm[i].Loss-wm[i].Loss) / max(1, math.Abs(wm[i].Loss))
		worst = max(worst, e)
		if e > tol.StepLoss {
			t.Errorf("step %d: loss %.6f, CPU %.6f (relative %.3g over %.3g)", gm[i].Step, gm[i].Loss, wm[i].Loss, e, tol.StepLoss)
		}
	}
	t.Logf("%s: %d steps, loss %.4f -> %.4f (CPU %.4f -> %.4f), worst step difference %.3g",
		optimizer, len(gm), gm[0].Loss, gm[len(gm)-1].Loss, wm[0].Loss, wm[len(wm)-1].Loss, worst)
}

func deterministic(t *testing.T, open Opener) {
	c := TinyConfig(32)
	model := tinyModel(t, c)
	rows := Rows(c.VocabSize, 24, 16, 2)
	sc, opts := runConfig(model, "adamw_8bit", 4)
	var adapters [2][]byte
	var metrics [2][]trainer.Metric
	for i := range adapters {
		s := open(t, sc)
		res := train(t, s, rows, opts, filepath.Join(t.TempDir(), "run"))
		s.Close()
		adapters[i], _ = os.ReadFile(filepath.Join(res.AdapterDir, trainer.AdapterWeightsFile))
		metrics[i] = ReadMetrics(t, res.MetricsPath)
	}
	if !bytes.Equal(adapters[0], adapters[1]) {
		t.Error("two identical runs wrote different adapters")
	}
	a, _ := json.Marshal(metrics[0])
	b, _ := json.Marshal(metrics[1])
	if !bytes.Equal(a, b) {
		t.Errorf("two identical runs logged different metrics:\n%s\n%s", a, b)
	}
}

// resume stops a run after a few steps, resumes it into a fresh output
// folder, and compares with an uninterrupted run. With a checkpoint every
// step the stop is a kill right after a checkpoint; with checkpoints
// further apart than the run, only the checkpoint a stopped run saves
// carries the steps over.
func resume(t *testing.T, open Opener, checkpointEvery int) {
	c := TinyConfig(32)
	model := tinyModel(t, c)
	rows := Rows(c.VocabSize, 24, 16, 3)
	sc, opts := runConfig(model, "adamw", 4)
	opts.CheckpointEvery = checkpointEvery
	s := open(t, sc)
	defer s.Close()
	want := train(t, s, rows, opts, filepath.Join(t.TempDir(), "whole"))

	ckDir := filepath.Join(t.TempDir(), "checkpoints")
	for _, stopAt := range []int{3, 7} {
		ctx, cancel := context.WithCancel(context.Background())
		o := opts
		o.OutDir, o.CheckpointDir = filepath.Join(t.TempDir(), "part"), ckDir
		o.Progress = func(p trainer.Progress) {
			if p.Step == stopAt {
				cancel()
			}
		}
		_, err := trainer.Train(ctx, s, rows, o)
		cancel()
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("stopping at step %d: %v", stopAt, err)
		}
	}
	o := opts
	o.CheckpointDir = ckDir
	firstStep := 0
	o.Progress = func(p trainer.Progress) {
		if firstStep == 0 {
			firstStep = p.Step
		}
	}
	got := train(t, s, rows, o, filepath.Join(t.TempDir(), "resumed"))
	if firstStep != 8 {
		t.Errorf("the last run's first step is %d, want 8: it did not resume after step 7", firstStep)
	}
	ga, _ := os.ReadFile(filepath.Join(got.AdapterDir, trainer.AdapterWeightsFile))
	wa, _ := os.ReadFile(filepath.Join(want.AdapterDir, trainer.AdapterWeightsFile))
	if !bytes.Equal(ga, wa) {
		t.Error("the resumed run's adapter differs from the uninterrupted run's")
	}
	gm, _ := json.Marshal(ReadMetrics(t, got.MetricsPath))
	wm, _ := json.Marshal(ReadMetrics(t, want.MetricsPath))
	if !bytes.Equal(gm, wm) {
		t.Errorf("metrics differ after resuming:\n%s\nuninterrupted:\n%s", gm, wm)
	}
}

// scriptedEval is a session whose held-out loss after its n-th step is
// losses[n-1], so that a test chooses where the best evaluation falls; its
// training is the backend's own.
type scriptedEval struct {
	trainer.Session
	losses []float64
	step   int
}

func (s *scriptedEval) Step(lr, maxNorm float64) (float64, error) {
	s.step++
	return s.Session.Step(lr, maxNorm)
}

func (s *scriptedEval) Loss(b *trainer.Batch) (float64, int, error) {
	_, n, err := s.Session.Loss(b)
	return s.losses[s.step-1] * float64(n), n, err
}

// earlyStopping: held-out losses 5.0, 4.95, 4.99 with a patience of 2 and
// a threshold of 0.1 stop the run after step 3 with step 2's adapter
// written (the best loss, though not better by the threshold), which must
// be the same bytes as a run that ends at step 2: the backend's state
// taken at the best step is not changed by the step after it. The
// schedule is constant, so that the two runs' rates agree.
func earlyStopping(t *testing.T, open Opener) {
	c := TinyConfig(32)
	model := tinyModel(t, c)
	rows := Rows(c.VocabSize, 24, 16, 6)
	sc, opts := runConfig(model, "adamw", 4)
	opts.Schedule, opts.WarmupSteps, opts.EvalEvery, opts.CheckpointEvery = trainer.ScheduleConstant, 0, 1, 0
	stopping := opts
	stopping.EarlyStoppingPatience, stopping.EarlyStoppingThreshold = 2, 0.1
	s := open(t, sc)
	defer s.Close()
	scripted := &scriptedEval{Session: s, losses: []float64{5.0, 4.95, 4.99, 5.01}}
	res := train(t, scripted, rows, stopping, filepath.Join(t.TempDir(), "stopped"))
	if !res.StoppedEarly || res.Steps != 3 || res.BestStep != 2 {
		t.Fatalf("stopped early %v after %d steps, best step %d; want a stop after 3, best step 2", res.StoppedEarly, res.Steps, res.BestStep)
	}
	plain := opts
	plain.MaxSteps = 2
	s2 := open(t, sc)
	defer s2.Close()
	want := train(t, s2, rows, plain, filepath.Join(t.TempDir(), "plain"))
	ga, _ := os.ReadFile(filepath.Join(res.AdapterDir, trainer.AdapterWeightsFile))
	wa, _ := os.ReadFile(filepath.Join(want.AdapterDir, trainer.AdapterWeightsFile))
	if len(ga) == 0 || !bytes.Equal(ga, wa) {
		t.Error("the early-stopped run's adapter is not step 2's (its best evaluation's)")
	}
}

func checkpointing(t *testing.T, open Opener) {
	c := TinyConfig(32)
	model := tinyModel(t, c)
	rows := Rows(c.VocabSize, 2, 16, 4)
	batch, err := trainer.NewBatch(rows)
	if err != nil {
		t.Fatal(err)
	}
	var sums [2]float64
	var grads [2]*trainer.Adapter
	for i, on := range []bool{true, false} {
		sc, _ := runConfig(model, "adamw", 4)
		sc.GradientCheckpointing = on
		s := open(t, sc)
		a, _ := trainer.NewAdapter(c, sc.LoRA, 5)
		for _, p := range a.Params() {
			if strings.HasSuffix(p.Name, "lora_B") {
				for j := range p.Data {
					p.Data[j] = float32(j%7-3) * 0.01
				}
			}
		}
		if err := s.SetState(a, nil); err != nil {
			t.Fatal(err)
		}
		if sums[i], _, err = s.LossAndGrad(batch, float64(batch.Trained()), 9); err != nil {
			t.Fatal(err)
		}
		if grads[i], err = s.Grads(); err != nil {
			t.Fatal(err)
		}
		s.Close()
	}
	if sums[0] != sums[1] {
		t.Errorf("loss %v with gradient checkpointing, %v without", sums[0], sums[1])
	}
	p0, p1 := grads[0].Params(), grads[1].Params()
	for i := range p0 {
		for j := range p0[i].Data {
			if p0[i].Data[j] != p1[i].Data[j] {
				t.Fatalf("%s[%d]: gradient %v with checkpointing, %v without", p0[i].Name, j, p0[i].Data[j], p1[i].Data[j])
			}
		}
	}
}

func stateRoundTrip(t *testing.T, open Opener) {
	c := TinyConfig(256)
	model := tinyModel(t, c)
	rows := Rows(c.VocabSize, 8, 16, 5)
	sc, opts := runConfig(model, "adamw_8bit", 36)
	opts.Epochs, opts.EvalFraction, opts.CheckpointEvery = 1, 0, 0
	s := open(t, sc)
	defer s.Close()
	train(t, s, rows, opts, filepath.Join(t.TempDir(), "run"))
	a, opt, err := s.State()
	if err != nil {
		t.Fatal(err)
	}
	s2 := open(t, sc)
	defer s2.Close()
	if err := s2.SetState(a, opt); err != nil {
		t.Fatal(err)
	}
	a2, opt2, err := s2.State()
	if err != nil {
		t.Fatal(err)
	}
	p, p2 := a.Params(), a2.Params()
	for i := range p {
		for j := range p[i].Data {
			if p[i].Data[j] != p2[i].Data[j] {
				t.Fatalf("%s[%d] changed in a round trip", p[i].Name, j)
			}
		}
	}
	if opt.Step != opt2.Step || len(opt.Tensors) != len(opt2.Tensors) {
		t.Fatalf("optimizer step %d/%d, %d/%d tensors after a round trip", opt.Step, opt2.Step, len(opt.Tensors), len(opt2.Tensors))
	}
	quantized := 0
	for i := range opt.Tensors {
		if opt.Tensors[i].Name != opt2.Tensors[i].Name || !bytes.Equal(opt.Tensors[i].Data, opt2.Tensors[i].Data) {
			t.Errorf("optimizer tensor %s changed in a round trip", opt.Tensors[i].Name)
		}
		if strings.HasSuffix(opt.Tensors[i].Name, ".state1") {
			quantized++
		}
	}
	if quantized == 0 {
		t.Error("no 8-bit optimizer state: the test shape is too small")
	}
}
