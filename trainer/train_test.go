package trainer

import (
	"bytes"
	"context"
	"encoding/json"
	"encoding/xml"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"gemmaft/internal/killtest"
)

func trainRows(vocab, n, seqLen int, seed uint64) Rows {
	rng := rand.New(rand.NewPCG(seed, 3))
	var rows Rows
	for i := 0; i < n; i++ {
		var r PackedRow
		used := 0
		for used < seqLen-3 {
			l := min(3+rng.IntN(6), seqLen-used)
			r.SeqLengths = append(r.SeqLengths, int32(l))
			for j := 0; j < l; j++ {
				// A learnable pattern: each token is followed by its successor.
				id := int32((i*7 + used + j) % vocab)
				r.InputIDs = append(r.InputIDs, id)
				lab := id
				if j == 0 {
					lab = IgnoreIndex
				}
				r.Labels = append(r.Labels, lab)
				r.PositionIDs = append(r.PositionIDs, int32(j))
			}
			used += l
		}
		for ; used < seqLen; used++ {
			r.InputIDs = append(r.InputIDs, 0)
			r.Labels = append(r.Labels, IgnoreIndex)
			r.PositionIDs = append(r.PositionIDs, 0)
		}
		rows = append(rows, r)
	}
	return rows
}

func trainOptions(out string) TrainOptions {
	return TrainOptions{
		LR: 2e-2, Schedule: ScheduleCosine, WarmupSteps: 2, MaxGradNorm: 1,
		BatchSize: 2, GradAccum: 2, Epochs: 2, Seed: 42,
		EvalFraction: 0.1, EvalEvery: 4, LogEvery: 1, CheckpointEvery: 1, OutDir: out, BaseModel: BaseModel{NameOrPath: "tiny"},
	}
}

// sessionConfig is the adapter and optimizer the training tests use.
func sessionConfig() SessionConfig {
	return SessionConfig{
		LoRA:                  LoRAConfig{R: 4, Alpha: 8, Dropout: 0.05, Targets: AllModules},
		Optimizer:             OptimizerConfig{Name: "adamw", WeightDecay: 0.01},
		GradientCheckpointing: true,
	}
}

// openCPU opens a CPU session on m.
func openCPU(t testing.TB, m *Model, cfg SessionConfig) Session {
	t.Helper()
	s, err := NewCPUSession(m, cfg)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func readMetrics(t *testing.T, path string) []Metric {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var out []Metric
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		var m Metric
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		out = append(out, m)
	}
	return out
}

func TestTrainLossFalls(t *testing.T) {
	c := tinyConfig()
	m := tinyModel(t, c)
	out := t.TempDir()
	opts := trainOptions(out)
	var steps []Progress
	opts.Progress = func(p Progress) { steps = append(steps, p) }
	res, err := Train(context.Background(), openCPU(t, m, sessionConfig()), trainRows(c.VocabSize, 24, 16, 1), opts)
	if err != nil {
		t.Fatal(err)
	}
	ms := readMetrics(t, res.MetricsPath)
	if len(ms) != res.Steps || res.Steps != 12 || len(steps) != 12 {
		t.Fatalf("%d metric lines, %d progress calls for %d steps, want 12", len(ms), len(steps), res.Steps)
	}
	first, last := ms[0].Loss, ms[len(ms)-1].Loss
	if !(last < first-0.5) {
		t.Errorf("loss went from %.4f to %.4f", first, last)
	}
	evals := 0
	for _, mt := range ms {
		if mt.EvalLoss != nil {
			evals++
		}
	}
	if evals != 3 {
		t.Errorf("%d eval losses, want 3 (steps 4, 8, 12)", evals)
	}
	if res.EvalRows != 2 { // a tenth of 24, rounded
		t.Errorf("%d eval rows, want 2", res.EvalRows)
	}
	if ms[0].LR != 0 || ms[2].LR != opts.LR {
		t.Errorf("warmup learning rates %v, %v", ms[0].LR, ms[2].LR)
	}
	svg, err := os.ReadFile(res.LossCurvePath)
	if err != nil {
		t.Fatal(err)
	}
	if err := xml.Unmarshal(svg, new(struct{})); err != nil || !bytes.Contains(svg, []byte("polyline")) {
		t.Errorf("loss curve is not a usable SVG: %v", err)
	}
	a, err := m.LoadAdapter(res.AdapterDir)
	if err != nil {
		t.Fatal(err)
	}
	if a.Config.R != 4 || len(a.Layers) != c.Layers {
		t.Errorf("adapter config %+v", a.Config)
	}
	t.Logf("loss %.4f -> %.4f, eval %.4f, last ETA %v", first, last, res.EvalLoss, steps[len(steps)-1].ETA)

	// Recomputing the layers or not gives the same numbers: a run that
	// flips it (memory ran short) resumes from these checkpoints.
	flipped := sessionConfig()
	flipped.GradientCheckpointing = !flipped.GradientCheckpointing
	if again, err := Train(context.Background(), openCPU(t, m, flipped), trainRows(c.VocabSize, 24, 16, 1), opts); err != nil || again.Steps != res.Steps {
		t.Errorf("resuming with gradient checkpointing flipped: %v", err)
	}

	// A run with other options must not resume from these checkpoints.
	opts.LR = 1e-3
	if _, err := Train(context.Background(), openCPU(t, m, sessionConfig()), trainRows(c.VocabSize, 24, 16, 1), opts); err == nil || !strings.Contains(err.Error(), "other options") {
		t.Errorf("resuming with other options: %v", err)
	}
}

// TestGradAccumulationMatchesLargerBatch: two micro-batches of one row
// accumulate to the step of one batch of two rows.
func TestGradAccumulationMatchesLargerBatch(t *testing.T) {
	c := tinyConfig()
	m := tinyModel(t, c)
	rows := trainRows(c.VocabSize, 8, 16, 2)
	run := func(batch, accum int) []Param {
		o := trainOptions(t.TempDir())
		o.BatchSize, o.GradAccum, o.EvalFraction, o.CheckpointEvery, o.Epochs = batch, accum, 0, 0, 1
		cfg := sessionConfig()
		cfg.LoRA.Dropout = 0
		res, err := Train(context.Background(), openCPU(t, m, cfg), rows, o)
		if err != nil {
			t.Fatal(err)
		}
		a, err := m.LoadAdapter(res.AdapterDir)
		if err != nil {
			t.Fatal(err)
		}
		return a.Params()
	}
	p1, p2 := run(4, 1), run(2, 2)
	for i := range p1 {
		for j := range p1[i].Data {
			if d := p1[i].Data[j] - p2[i].Data[j]; d > 1e-5 || d < -1e-5 {
				t.Fatalf("%s[%d]: %v with batch 4, %v with 2×2 accumulation", p1[i].Name, j, p1[i].Data[j], p2[i].Data[j])
			}
		}
	}
}

// TestTrainChild is the process the SIGKILL test starts and kills.
func TestTrainChild(t *testing.T) {
	dir := os.Getenv("GEMMAFT_TRAIN_CHILD")
	if dir == "" {
		t.Skip("run by TestResumeAfterSIGKILL")
	}
	m, err := LoadModel(filepath.Join(dir, "model"))
	if err != nil {
		t.Fatal(err)
	}
	opts := trainOptions(filepath.Join(dir, "run"))
	opts.CheckpointDir = filepath.Join(dir, "checkpoints")
	opts.Progress = func(p Progress) { fmt.Printf("step %d\n", p.Step) }
	if _, err := Train(context.Background(), openCPU(t, m, sessionConfig()), trainRows(m.Config.VocabSize, 24, 16, 1), opts); err != nil {
		t.Fatal(err)
	}
}

// TestResumeAfterSIGKILL kills a training process at random points, resumes
// it (into an empty output directory, from the checkpoint directory) until
// it finishes, and compares its metrics and adapter with an uninterrupted
// run: identical except for timings.
func TestResumeAfterSIGKILL(t *testing.T) {
	c := tinyConfig()
	dir := t.TempDir()
	if err := WriteRandomCheckpoint(filepath.Join(dir, "model"), c, InitOptions{Seed: 7, Std: 0.2, NormStd: 0.5}); err != nil {
		t.Fatal(err)
	}
	// Each start of the child gets an empty output directory: what carries
	// over is the checkpoint directory alone. Kills come a random moment
	// after a reported step: mid-step or mid-checkpoint.
	kills := killtest.Run(t, killtest.Options{
		Child: "TestTrainChild", Env: []string{"GEMMAFT_TRAIN_CHILD=" + dir},
		Kills: 6, MaxLinesBeforeKill: 3, MaxDelay: 3 * time.Millisecond,
		BeforeAttempt: func() { os.RemoveAll(filepath.Join(dir, "run")) },
	})
	m, err := LoadModel(filepath.Join(dir, "model"))
	if err != nil {
		t.Fatal(err)
	}
	ref := filepath.Join(dir, "reference")
	if _, err := Train(context.Background(), openCPU(t, m, sessionConfig()), trainRows(c.VocabSize, 24, 16, 1), trainOptions(ref)); err != nil {
		t.Fatal(err)
	}
	got, want := readMetrics(t, filepath.Join(dir, "run", MetricsFile)), readMetrics(t, filepath.Join(ref, MetricsFile))
	if len(got) != len(want) {
		t.Fatalf("%d metric lines after %d kills, uninterrupted run %d", len(got), kills, len(want))
	}
	for i := range got {
		g, w := got[i], want[i]
		g.TokensPerSec, g.ElapsedSec, w.TokensPerSec, w.ElapsedSec = 0, 0, 0, 0
		gb, _ := json.Marshal(g)
		wb, _ := json.Marshal(w)
		if !bytes.Equal(gb, wb) {
			t.Errorf("metrics line %d after %d kills:\n%s\nuninterrupted:\n%s", i, kills, gb, wb)
		}
	}
	ga, _ := os.ReadFile(filepath.Join(dir, "run", AdapterDirName, AdapterWeightsFile))
	wa, _ := os.ReadFile(filepath.Join(ref, AdapterDirName, AdapterWeightsFile))
	if !bytes.Equal(ga, wa) {
		t.Error("adapter differs from the uninterrupted run's")
	}
	t.Logf("%d kills, %d metric lines identical", kills, len(got))
}

// TestWarnUnused: settings the plan leaves without effect are said, where
// transformers' Trainer would act on them; those that take effect are not.
func TestWarnUnused(t *testing.T) {
	said := func(rows int, o TrainOptions, ranks ...int) string {
		t.Helper()
		if err := o.defaults(); err != nil {
			t.Fatal(err)
		}
		p, err := makeRowPlan(rows, &o)
		if err != nil {
			t.Fatal(err)
		}
		var logs bytes.Buffer
		size := 1
		if len(ranks) > 0 {
			size = ranks[0]
		}
		warnUnused(slog.New(slog.NewTextHandler(&logs, nil)), p, o, size)
		return logs.String()
	}
	// 45 rows, batches of 2, 4 a step: 6 steps an epoch.
	base := TrainOptions{BatchSize: 2, GradAccum: 4, Epochs: 1, LR: 1e-3, OutDir: t.TempDir()}
	o := base
	o.MaxSteps = 10
	if got := said(45, o); !strings.Contains(got, "max_steps is more than the epochs give") || !strings.Contains(got, "steps=6") || !strings.Contains(got, `fix="raise epochs to 2 to train 10 steps"`) {
		t.Errorf("max_steps 10 of 6: %s", got)
	}
	o = base
	o.EvalEvery = 2
	if got := said(45, o); !strings.Contains(got, "eval_every has nothing to evaluate") {
		t.Errorf("eval_every without held-out rows: %s", got)
	}
	o.EvalFraction, o.MaxSteps = 0.1, 3
	if got := said(45, o); got != "" {
		t.Errorf("settings that take effect: %s", got)
	}
	if got := said(45, o, 8); !strings.Contains(got, "more ranks than micro-batches a step") || !strings.Contains(got, "a multiple of 8") {
		t.Errorf("8 ranks, grad_accum 4: %s", got)
	}
	if got := said(45, o, 4); got != "" {
		t.Errorf("4 ranks, grad_accum 4: %s", got)
	}
	o = base
	o.WarmupSteps = 6
	if got := said(45, o); !strings.Contains(got, "the learning rate never reaches lr") || !strings.Contains(got, "set warmup_steps below 6") {
		t.Errorf("a warmup of the whole run: %s", got)
	}
	o.WarmupSteps = 5
	if got := said(45, o); got != "" {
		t.Errorf("a warmup of 5 steps of 6: %s", got)
	}
}

// TestWarmupRatio: a warmup ratio is that share of the run's steps,
// rounded up as transformers rounds it (0.2 of 12 steps: 3), and trains as
// that many warmup steps do.
func TestWarmupRatio(t *testing.T) {
	c := tinyConfig()
	m := tinyModel(t, c)
	run := func(steps int, ratio float64) []Metric {
		opts := trainOptions(t.TempDir())
		opts.WarmupSteps, opts.WarmupRatio, opts.EvalFraction, opts.EvalEvery, opts.CheckpointEvery = steps, ratio, 0, 0, 0
		res, err := Train(context.Background(), openCPU(t, m, sessionConfig()), trainRows(c.VocabSize, 24, 16, 1), opts)
		if err != nil {
			t.Fatal(err)
		}
		return readMetrics(t, res.MetricsPath)
	}
	byRatio, bySteps := run(0, 0.2), run(3, 0)
	numbers := func(ms []Metric) string {
		var b strings.Builder
		for _, m := range ms {
			fmt.Fprintf(&b, "%d %v %v; ", m.Step, m.LR, m.Loss)
		}
		return b.String()
	}
	if len(byRatio) != 12 || numbers(byRatio) != numbers(bySteps) {
		t.Errorf("warmup_ratio 0.2: %s\nwarmup_steps 3: %s", numbers(byRatio), numbers(bySteps))
	}
	if byRatio[2].LR >= byRatio[3].LR {
		t.Errorf("learning rates %v, %v: warmup should end at step 4", byRatio[2].LR, byRatio[3].LR)
	}
	opts := trainOptions(t.TempDir())
	opts.WarmupRatio = 0.1
	if _, err := Train(context.Background(), openCPU(t, m, sessionConfig()), trainRows(c.VocabSize, 24, 16, 1), opts); err == nil || !strings.Contains(err.Error(), "not both") {
		t.Errorf("steps and ratio both: %v", err)
	}
}

// scriptedEval is a session whose held-out loss after its n-th step is
// losses[n-1] (its training is the CPU session's), so that a test chooses
// where the best evaluation falls; from is the step it resumes after.
type scriptedEval struct {
	Session
	losses []float64
	step   int
}

func (s *scriptedEval) Step(lr, maxNorm float64) (float64, error) {
	s.step++
	return s.Session.Step(lr, maxNorm)
}

func (s *scriptedEval) Loss(b *Batch) (float64, int, error) {
	_, n, err := s.Session.Loss(b)
	return s.losses[s.step-1] * float64(n), n, err
}

// TestEarlyStopping: with early stopping the run ends once the held-out
// loss has not improved by more than the threshold for patience
// evaluations, and the adapter written is the best evaluation's, as
// transformers' EarlyStoppingCallback with load_best_model_at_end leaves
// it: a better loss that does not beat the threshold is the new best all
// the same, without resetting the count. A run interrupted after its best
// step resumes from its checkpoint to the same adapter.
func TestEarlyStopping(t *testing.T) {
	c := tinyConfig()
	rows := trainRows(c.VocabSize, 24, 16, 1)
	opts := func(out string) TrainOptions {
		o := trainOptions(out)
		o.Schedule, o.WarmupSteps, o.EvalEvery = ScheduleConstant, 0, 1
		o.EarlyStoppingPatience, o.EarlyStoppingThreshold = 3, 0.1
		return o
	}
	losses := []float64{5.0, 4.95, 4.99, 5.01, 5.02, 5.03}
	session := func(from int) Session {
		return &scriptedEval{Session: openCPU(t, tinyModel(t, c), sessionConfig()), losses: losses, step: from}
	}
	// The adapter after two steps, the best evaluation's.
	two := opts(t.TempDir())
	two.MaxSteps, two.EarlyStoppingPatience, two.EarlyStoppingThreshold = 2, 0, 0
	first, err := Train(context.Background(), openCPU(t, tinyModel(t, c), sessionConfig()), rows, two)
	if err != nil {
		t.Fatal(err)
	}
	want, _ := os.ReadFile(filepath.Join(first.AdapterDir, AdapterWeightsFile))

	whole := opts(t.TempDir())
	tokensAt := map[int]float64{} // the tokens trained by a step, as the progress's rate gives them
	whole.Progress = func(p Progress) { tokensAt[p.Step] = p.TokensPerSec * p.Elapsed.Seconds() }
	res, err := Train(context.Background(), session(0), rows, whole)
	if err != nil {
		t.Fatal(err)
	}
	stepTokens := tokensAt[4] - tokensAt[3]
	got, _ := os.ReadFile(filepath.Join(res.AdapterDir, AdapterWeightsFile))
	if res.Steps != 4 || !res.StoppedEarly || res.BestStep != 2 || res.EvalLoss != 4.95 || !bytes.Equal(got, want) {
		t.Errorf("early stopping: %d steps, stopped %v, best step %d (eval loss %v), the step-2 adapter written: %v",
			res.Steps, res.StoppedEarly, res.BestStep, res.EvalLoss, bytes.Equal(got, want))
	}

	// Interrupted at step 3 (its checkpoint holds step 2's adapter as the
	// best), then resumed from that checkpoint: the same end.
	resumed := opts(t.TempDir())
	ctx, cancel := context.WithCancel(context.Background())
	resumed.Progress = func(p Progress) {
		if p.Step == 3 {
			cancel()
		}
	}
	if _, err := Train(ctx, session(0), rows, resumed); !errors.Is(err, context.Canceled) {
		t.Fatalf("interrupted run: %v", err)
	}
	var logs bytes.Buffer
	var resumedTokens float64
	resumed.Progress = func(p Progress) {
		if p.Step == 4 {
			resumedTokens = p.TokensPerSec * p.Elapsed.Seconds()
		}
	}
	resumed.Log = slog.New(slog.NewTextHandler(&logs, nil))
	res, err = Train(context.Background(), session(3), rows, resumed)
	if err != nil {
		t.Fatal(err)
	}
	// The resumed run's rate counts its own tokens (step 4's by step 4),
	// not the checkpoint's too over its own time.
	if math.Abs(resumedTokens-stepTokens) > 1e-6*stepTokens || stepTokens <= 0 {
		t.Errorf("the resumed run's rate × time is %g tokens at its first step, want step 4's %g", resumedTokens, stepTokens)
	}
	got, _ = os.ReadFile(filepath.Join(res.AdapterDir, AdapterWeightsFile))
	if !strings.Contains(logs.String(), "resuming from a checkpoint") || strings.Contains(logs.String(), "set aside") {
		t.Errorf("the run did not resume from its checkpoint:\n%s", logs.String())
	}
	if res.Steps != 4 || res.BestStep != 2 || !bytes.Equal(got, want) {
		t.Errorf("resumed: %d steps, best step %d, the step-2 adapter written: %v", res.Steps, res.BestStep, bytes.Equal(got, want))
	}

	// The last step's evaluation ending the count is no early stop.
	last := opts(t.TempDir())
	last.MaxSteps = 4
	if res, err := Train(context.Background(), session(0), rows, last); err != nil || res.StoppedEarly || res.BestStep != 2 {
		t.Errorf("patience spent at the last step: stopped early %v, best step %d (%v)", res.StoppedEarly, res.BestStep, err)
	}

	bad := opts(t.TempDir())
	bad.EvalEvery = 0
	if _, err := Train(context.Background(), openCPU(t, tinyModel(t, c), sessionConfig()), rows, bad); err == nil || !strings.Contains(err.Error(), "early stopping needs evaluations") {
		t.Errorf("early stopping without evaluations: %v", err)
	}
}

// TestInterruptKeepsSteps: a run stopped between checkpoints (Ctrl-C at
// step 3 of checkpoints every 10) saves the steps done, and the next run
// resumes from them to the adapter an uninterrupted run writes.
func TestInterruptKeepsSteps(t *testing.T) {
	c := tinyConfig()
	rows := trainRows(c.VocabSize, 24, 16, 1)
	opts := func(out string) TrainOptions {
		o := trainOptions(out)
		o.MaxSteps, o.CheckpointEvery, o.EvalFraction, o.EvalEvery = 5, 10, 0, 0
		return o
	}
	whole, err := Train(context.Background(), openCPU(t, tinyModel(t, c), sessionConfig()), rows, opts(t.TempDir()))
	if err != nil {
		t.Fatal(err)
	}
	want, _ := os.ReadFile(filepath.Join(whole.AdapterDir, AdapterWeightsFile))

	o := opts(t.TempDir())
	ctx, cancel := context.WithCancel(context.Background())
	o.Progress = func(p Progress) {
		if p.Step == 3 {
			cancel()
		}
	}
	if _, err := Train(ctx, openCPU(t, tinyModel(t, c), sessionConfig()), rows, o); !errors.Is(err, context.Canceled) {
		t.Fatalf("interrupted run: %v", err)
	}
	var logs bytes.Buffer
	o.Progress, o.Log = nil, slog.New(slog.NewTextHandler(&logs, nil))
	res, err := Train(context.Background(), openCPU(t, tinyModel(t, c), sessionConfig()), rows, o)
	if err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(filepath.Join(res.AdapterDir, AdapterWeightsFile))
	if !strings.Contains(logs.String(), "resuming from a checkpoint") || !strings.Contains(logs.String(), "step=3") {
		t.Errorf("the run did not resume from step 3:\n%s", logs.String())
	}
	if res.Steps != 5 || !bytes.Equal(got, want) {
		t.Errorf("resumed: %d steps, the uninterrupted run's adapter: %v", res.Steps, bytes.Equal(got, want))
	}
	// The metrics' elapsed time goes on across the resume.
	data, _ := os.ReadFile(res.MetricsPath)
	prev := -1.0
	for _, line := range strings.Split(strings.TrimSpace(string(data)), "\n") {
		var m Metric
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			t.Fatal(err)
		}
		if m.ElapsedSec < prev {
			t.Errorf("step %d: elapsed_sec %v, before it %v: the time started over at the resume", m.Step, m.ElapsedSec, prev)
		}
		prev = m.ElapsedSec
	}

	// Without checkpoints the steps are lost, and the log says so.
	o = opts(t.TempDir())
	o.CheckpointEvery, o.Log = 0, slog.New(slog.NewTextHandler(&logs, nil))
	logs.Reset()
	ctx, cancel = context.WithCancel(context.Background())
	o.Progress = func(p Progress) {
		if p.Step == 3 {
			cancel()
		}
	}
	if _, err := Train(ctx, openCPU(t, tinyModel(t, c), sessionConfig()), rows, o); !errors.Is(err, context.Canceled) {
		t.Fatalf("interrupted run without checkpoints: %v", err)
	}
	if !strings.Contains(logs.String(), "stopped after 3 steps, which the next run computes again: checkpoint_every is 0") {
		t.Errorf("an interrupt without checkpoints is not told of:\n%s", logs.String())
	}
}
