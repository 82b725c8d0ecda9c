package gpu

// Tests of the whole GPU backend. Each skips without a usable GPU
// (cudatest.Device); the runs that need inputs from outside the repository
// (the demo's packed rows) or a large card also skip unless their
// environment variable names them. scripts/gpu-build.sh builds this
// package's test binary and bin/gpu/run.sh runs it on a GPU machine.

import (
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"gemmaft/cuda/cudatest"
	"gemmaft/trainer"
	"gemmaft/trainer/backendtest"
	"gemmaft/trainer/gpu/kernels"
)

const refDir = "../testdata/reference"

func openGPU(precision string) backendtest.Opener {
	return func(t *testing.T, cfg trainer.SessionConfig) trainer.Session {
		t.Helper()
		cudatest.Device(t)
		cfg.Precision = precision
		s, err := trainer.OpenSession(context.Background(), "cuda", cfg)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
}

// TestConformanceFP32: with every kernel in float32, the GPU backend
// follows the float64 goldens within 1e-4 and the CPU reference within
// float32 rounding (8-bit AdamW's code steps magnify the last bits of a
// run: 5e-3).
func TestConformanceFP32(t *testing.T) {
	backendtest.Run(t, refDir, openGPU("fp32"), backendtest.Tolerance{Loss: 1e-4, Grad: 1e-4, StepLoss: 5e-3})
}

// TestConformanceBF16: in training precision (bfloat16 activations) the
// loss stays within 1e-2 of the goldens, the adapter's gradient points the
// golden way (cosine ≥ 0.999 over all LoRA tensors, ≥ 0.99 for each), and
// training follows the CPU within 2% a step. transformers + PEFT in bf16
// (LoRA in float32) reach 0.9879 to 0.9975 for their worst tensor on the
// same cases (scripts/reference/bf16_grads.py, NOTES.md).
func TestConformanceBF16(t *testing.T) {
	// rslora_gqa's update is scaled by alpha / √r ≈ 5.66, which bf16
	// follows less closely: transformers + PEFT themselves in bf16 reach a
	// whole-gradient cosine of 0.994828 and a worst tensor of 0.990294 on
	// it (scripts/reference/bf16_grads.py, H200), under the bounds the
	// other cases meet, so the case is held to what that stack reaches.
	backendtest.Run(t, refDir, openGPU("bf16"), backendtest.Tolerance{Loss: 1e-2, Cosine: 0.999, TensorCosine: 0.99, StepLoss: 0.02,
		CaseCosine: map[string][2]float64{"rslora_gqa": {0.994828, 0.990294}}})
}

// TestMemoryPlanRefusesWhatCannotFit: a run far beyond the card, or beyond
// the session's MemoryLimit, is refused before anything is loaded, with
// what to change.
func TestMemoryPlanRefusesWhatCannotFit(t *testing.T) {
	cudatest.Device(t)
	c := backendtest.TinyConfig(32)
	dir := t.TempDir()
	if err := trainer.WriteRandomCheckpoint(dir, c, trainer.InitOptions{Seed: 1}); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	_, err := trainer.OpenSession(context.Background(), "cuda", trainer.SessionConfig{Model: dir,
		LoRA: trainer.LoRAConfig{R: 8, Alpha: 16, Targets: trainer.AllModules}, MaxTokens: 1 << 30})
	if err == nil || !strings.Contains(err.Error(), "needs about") || !strings.Contains(err.Error(), "batch_size") {
		t.Fatalf("an impossible run: %v", err)
	}
	t.Logf("refused in %v: %v", time.Since(start), err)
	// A run the card holds, under a limit it does not fit.
	_, err = trainer.OpenSession(context.Background(), "cuda", trainer.SessionConfig{Model: dir,
		LoRA: trainer.LoRAConfig{R: 8, Alpha: 16, Targets: trainer.AllModules}, MaxTokens: 64, MemoryLimit: 64 << 20})
	if err == nil || !strings.Contains(err.Error(), "the limit is 0.1 GiB") {
		t.Fatalf("a run over MemoryLimit: %v", err)
	}
}

// demoOptions are the demo DAG's qlora settings run for 200 steps.
func demoOptions() (trainer.SessionConfig, trainer.TrainOptions) {
	sc := trainer.SessionConfig{Quantize: "nf4",
		LoRA:                  trainer.LoRAConfig{R: 32, Alpha: 64, Dropout: 0.05, Targets: trainer.AllModules},
		Optimizer:             trainer.OptimizerConfig{Name: "adamw"},
		GradientCheckpointing: true}
	opts := trainer.TrainOptions{LR: 1e-2, Schedule: trainer.ScheduleLinear, MaxGradNorm: 1, BatchSize: 2, GradAccum: 4,
		Epochs: 1000, MaxSteps: 200, Seed: 42, LogEvery: 1}
	return sc, opts
}

// demoModel writes the demo DAG's model stage checkpoint: the tiny preset
// (real 262k vocabulary), seed 1, std 0.125.
func demoModel(t *testing.T) string {
	c, _ := trainer.Preset("tiny")
	dir := filepath.Join(t.TempDir(), "model")
	if err := trainer.WriteRandomCheckpoint(dir, c, trainer.InitOptions{Seed: 1, Std: 0.125}); err != nil {
		t.Fatal(err)
	}
	return dir
}

// TestDemoCurve trains 200 optimizer steps of the demo's settings on the
// demo's packed rows (GEMMAFT_DEMO_ROWS, JSON lines from `pipeline export
// dags/demo.yaml pack --format jsonl`) on the GPU and on the CPU reference
// (or reads the CPU's metrics from GEMMAFT_DEMO_CPU_METRICS), and checks
// that every step's loss is within 2% of the CPU's. The adapter goes to
// GEMMAFT_DEMO_OUT when set, for PEFT to load. Without a GPU and with
// GEMMAFT_DEMO_CPU_METRICS naming a file that does not exist yet, it runs
// the CPU side only and writes that file.
func TestDemoCurve(t *testing.T) {
	rowsPath := os.Getenv("GEMMAFT_DEMO_ROWS")
	if rowsPath == "" {
		t.Skip("GEMMAFT_DEMO_ROWS not set")
	}
	rows, err := trainer.ReadPackedRows(rowsPath)
	if err != nil {
		t.Fatal(err)
	}
	model := demoModel(t)
	sc, opts := demoOptions()
	sc.Model = model
	sc.MaxTokens = opts.BatchSize * len(rows[0].InputIDs)
	cpuMetrics := os.Getenv("GEMMAFT_DEMO_CPU_METRICS")
	if _, err := os.Stat(cpuMetrics); cpuMetrics == "" || err != nil {
		cpu, err := trainer.OpenSession(context.Background(), "cpu", sc)
		if err != nil {
			t.Fatal(err)
		}
		o := opts
		o.OutDir = filepath.Join(t.TempDir(), "cpu")
		res, err := trainer.Train(context.Background(), cpu, trainer.Rows(rows), o)
		if err != nil {
			t.Fatal(err)
		}
		if cpuMetrics != "" {
			b, _ := os.ReadFile(res.MetricsPath)
			if err := os.WriteFile(cpuMetrics, b, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		cpuMetrics = res.MetricsPath
	}
	want := backendtest.ReadMetrics(t, cpuMetrics)
	s := openGPU("bf16")(t, sc)
	defer s.Close()
	o := opts
	o.OutDir = os.Getenv("GEMMAFT_DEMO_OUT")
	if o.OutDir == "" {
		o.OutDir = t.TempDir()
	}
	start := time.Now()
	res, err := trainer.Train(context.Background(), s, trainer.Rows(rows), o)
	if err != nil {
		t.Fatal(err)
	}
	got := backendtest.ReadMetrics(t, res.MetricsPath)
	if len(got) != len(want) || len(got) != 200 {
		t.Fatalf("%d GPU steps, %d CPU steps, want 200", len(got), len(want))
	}
	worst, worstStep := 0.0, 0
	for i := range got {
		e := math.Abs(got[i].Loss-want[i].Loss) / math.Abs(want[i].Loss)
		if e > worst {
			worst, worstStep = e, got[i].Step
		}
		if e > 0.02 {
			t.Errorf("step %d: GPU loss %.5f, CPU %.5f (relative %.3g)", got[i].Step, got[i].Loss, want[i].Loss, e)
		}
	}
	t.Logf("200 steps in %v: GPU loss %.4f -> %.4f, CPU %.4f -> %.4f; worst step %d at %.3g; peak %.2f GiB",
		time.Since(start), got[0].Loss, got[199].Loss, want[0].Loss, want[199].Loss, worstStep, worst, float64(res.PeakMemory)/(1<<30))
	if out := os.Getenv("GEMMAFT_DEMO_OUT"); out != "" {
		lines := make([]string, len(got))
		for i := range got {
			lines[i] = fmt.Sprintf("%d %.6f %.6f", got[i].Step, got[i].Loss, want[i].Loss)
		}
		os.WriteFile(filepath.Join(out, "curve.txt"), []byte("step gpu cpu\n"+strings.Join(lines, "\n")+"\n"), 0o644)
		os.Link(model+"/config.json", filepath.Join(out, "model-config.json"))
	}
}

// syntheticRows makes rows of seqLen tokens packed with examples of 100 to
// 1000 tokens, like instruction data.
func syntheticRows(vocab, n, seqLen int, seed uint64) trainer.Rows {
	rng := rand.New(rand.NewPCG(seed, 9))
	var rows trainer.Rows
	for i := 0; i < n; i++ {
		var r trainer.PackedRow
		used := 0
		for used < seqLen {
			l := min(100+rng.IntN(900), seqLen-used)
			r.SeqLengths = append(r.SeqLengths, int32(l))
			for j := 0; j < l; j++ {
				r.InputIDs = append(r.InputIDs, int32(rng.IntN(vocab)))
				lab := int32(rng.IntN(vocab))
				if j < l/3 {
					lab = trainer.IgnoreIndex
				}
				r.Labels = append(r.Labels, lab)
				r.PositionIDs = append(r.PositionIDs, int32(j))
			}
			used += l
		}
		rows = append(rows, r)
	}
	return rows
}

// TestPresetShapes trains a few steps of each preset named in
// GEMMAFT_PRESETS (e.g. "1b,12b") at seq 4096, batch 2 (27b: batch 1), on
// random weights made on the GPU, and reports tokens/s, the memory plan and
// the peak memory.
func TestPresetShapes(t *testing.T) {
	list := os.Getenv("GEMMAFT_PRESETS")
	if list == "" {
		t.Skip("GEMMAFT_PRESETS not set")
	}
	cudatest.Device(t)
	for _, name := range strings.Split(list, ",") {
		t.Run(name, func(t *testing.T) {
			mc, err := trainer.Preset(name)
			if err != nil {
				t.Fatal(err)
			}
			batch := 2
			if name == "27b" {
				batch = 1
			}
			const seqLen = 4096
			sc := trainer.SessionConfig{Quantize: "nf4",
				LoRA:                  trainer.LoRAConfig{R: 32, Alpha: 64, Dropout: 0.05, Targets: trainer.AllModules},
				Optimizer:             trainer.OptimizerConfig{Name: "adamw_8bit"},
				GradientCheckpointing: true, MaxTokens: batch * seqLen}
			plan := Plan(mc, sc, kernels.BF16)
			start := time.Now()
			s, err := OpenRandom(context.Background(), mc, 1, 0.02, sc)
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			t.Logf("%s: opened in %v; plan %.2f GiB (%s)", name, time.Since(start), gib(plan.Total()), plan)
			a, _ := trainer.NewAdapter(mc, sc.LoRA, 1)
			if err := s.SetState(a, nil); err != nil {
				t.Fatal(err)
			}
			rows := syntheticRows(mc.VocabSize, 4*batch, seqLen, 1)
			var times []time.Duration
			for step := 0; step < 4; step++ {
				if step == 3 {
					// The last step runs profiled: device time by kernel group.
					if err := StartProfile(s); err != nil {
						t.Fatal(err)
					}
				}
				b, err := trainer.NewBatch(rows[step*batch : (step+1)*batch])
				if err != nil {
					t.Fatal(err)
				}
				st := time.Now()
				sum, n, err := s.LossAndGrad(b, float64(b.Trained()), uint64(step))
				if err != nil {
					t.Fatal(err)
				}
				if _, err := s.Step(2e-4, 1); err != nil {
					t.Fatal(err)
				}
				times = append(times, time.Since(st))
				t.Logf("%s step %d: loss %.4f over %d tokens in %v", name, step+1, sum/float64(n), n, times[step])
			}
			prof, err := ReadProfile(s)
			if err != nil {
				t.Fatal(err)
			}
			wall := times[3]
			for _, g := range prof.Groups {
				t.Logf("PROFILE %s step 4: %-28s %8.1f ms %5.1f%%  (%d launches)", name, g.Name, float64(g.Time)/1e6, 100*float64(g.Time)/float64(wall), g.Launches)
			}
			t.Logf("PROFILE %s step 4: %-28s %8.1f ms %5.1f%%  (wall %.1f ms, profiled)", name, "host gaps and idle",
				float64(wall-prof.Device)/1e6, 100*float64(wall-prof.Device)/float64(wall), float64(wall)/1e6)
			best := times[1]
			for _, d := range times[1:3] {
				best = min(best, d)
			}
			tokens := float64(batch * seqLen)
			t.Logf("RESULT %s seq %d batch %d: %.0f tokens/s (best of steps 2-3), peak %.2f GiB, planned %.2f GiB",
				name, seqLen, batch, tokens/best.Seconds(), gib(s.PeakMemory()), gib(plan.Total()))
		})
	}
}
