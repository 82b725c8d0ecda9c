package gpu

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"gemmaft/cuda/cudatest"
	"gemmaft/internal/killtest"
	"gemmaft/trainer"
	"gemmaft/trainer/backendtest"
)

// resumeRun is the training the SIGKILL test interrupts.
func resumeRun(model string) (trainer.SessionConfig, trainer.TrainOptions, trainer.Rows) {
	sc := trainer.SessionConfig{Model: model, Quantize: "nf4",
		LoRA:                  trainer.LoRAConfig{R: 8, Alpha: 16, Dropout: 0.05, Targets: trainer.AllModules},
		Optimizer:             trainer.OptimizerConfig{Name: "adamw_8bit", WeightDecay: 0.01},
		GradientCheckpointing: true, MaxTokens: 2 * 64}
	opts := trainer.TrainOptions{LR: 5e-3, Schedule: trainer.ScheduleLinear, MaxGradNorm: 1, BatchSize: 2, GradAccum: 2,
		Epochs: 3, Seed: 11, EvalFraction: 0.1, EvalEvery: 3, LogEvery: 1, CheckpointEvery: 1}
	return sc, opts, backendtest.Rows(97, 24, 64, 8)
}

// TestGPUTrainChild is the process TestResumeAfterSIGKILL starts and kills.
func TestGPUTrainChild(t *testing.T) {
	dir := os.Getenv("GEMMAFT_GPU_TRAIN_CHILD")
	if dir == "" {
		t.Skip("run by TestResumeAfterSIGKILL")
	}
	sc, opts, rows := resumeRun(filepath.Join(dir, "model"))
	s := openGPU("bf16")(t, sc)
	defer s.Close()
	opts.OutDir, opts.CheckpointDir = filepath.Join(dir, "run"), filepath.Join(dir, "checkpoints")
	opts.Progress = func(p trainer.Progress) { fmt.Printf("step %d\n", p.Step) }
	if _, err := trainer.Train(context.Background(), s, rows, opts); err != nil {
		t.Fatal(err)
	}
}

// TestResumeAfterSIGKILL kills a GPU training process at random moments
// (mid-step or mid-checkpoint), resumes it into an empty output folder
// until it finishes, and compares its adapter and metrics with an
// uninterrupted run's: the same bytes.
func TestResumeAfterSIGKILL(t *testing.T) {
	cudatest.Device(t)
	dir := t.TempDir()
	c := backendtest.TinyConfig(32)
	if err := trainer.WriteRandomCheckpoint(filepath.Join(dir, "model"), c, trainer.InitOptions{Seed: 7, Std: 0.2, NormStd: 0.5}); err != nil {
		t.Fatal(err)
	}
	kills := killtest.Run(t, killtest.Options{Child: "TestGPUTrainChild", Env: []string{"GEMMAFT_GPU_TRAIN_CHILD=" + dir},
		Kills: 4, MaxLinesBeforeKill: 4, MaxDelay: 20 * time.Millisecond,
		// Each start writes into an empty output folder: only the
		// checkpoints carry over.
		BeforeAttempt: func() { os.RemoveAll(filepath.Join(dir, "run")) }})
	sc, opts, rows := resumeRun(filepath.Join(dir, "model"))
	s := openGPU("bf16")(t, sc)
	defer s.Close()
	opts.OutDir = filepath.Join(dir, "reference")
	if _, err := trainer.Train(context.Background(), s, rows, opts); err != nil {
		t.Fatal(err)
	}
	ga, _ := os.ReadFile(filepath.Join(dir, "run", trainer.AdapterDirName, trainer.AdapterWeightsFile))
	wa, _ := os.ReadFile(filepath.Join(dir, "reference", trainer.AdapterDirName, trainer.AdapterWeightsFile))
	if len(ga) == 0 || !bytes.Equal(ga, wa) {
		t.Fatalf("after %d kills the adapter differs from the uninterrupted run's", kills)
	}
	got := backendtest.ReadMetrics(t, filepath.Join(dir, "run", trainer.MetricsFile))
	want := backendtest.ReadMetrics(t, filepath.Join(dir, "reference", trainer.MetricsFile))
	if len(got) != len(want) {
		t.Fatalf("%d metric lines, uninterrupted %d", len(got), len(want))
	}
	for i := range got {
		if got[i].Loss != want[i].Loss || got[i].GradNorm != want[i].GradNorm {
			t.Errorf("step %d: loss %v grad norm %v, uninterrupted %v %v", got[i].Step, got[i].Loss, got[i].GradNorm, want[i].Loss, want[i].GradNorm)
		}
	}
	t.Logf("%d kills; adapter and %d metric lines identical to the uninterrupted run", kills, len(got))
}

// TestAdapterForPEFT trains an adapter on the GPU over a random Gemma 3 1B
// (real shapes) for transformers + PEFT to load: it writes the checkpoint,
// the adapter and the rows into GEMMAFT_PEFT_OUT, where
// scripts/reference/hf_loss.py compares PEFT's loss with `pipeline loss
// --backend cuda`.
func TestAdapterForPEFT(t *testing.T) {
	out := os.Getenv("GEMMAFT_PEFT_OUT")
	rowsPath := os.Getenv("GEMMAFT_DEMO_ROWS")
	if out == "" || rowsPath == "" {
		t.Skip("GEMMAFT_PEFT_OUT and GEMMAFT_DEMO_ROWS not set")
	}
	cudatest.Device(t)
	rows, err := trainer.ReadPackedRows(rowsPath)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := trainer.Preset("1b")
	model := filepath.Join(out, "model")
	start := time.Now()
	if err := trainer.WriteRandomCheckpoint(model, c, trainer.InitOptions{Seed: 3}); err != nil {
		t.Fatal(err)
	}
	t.Logf("1B checkpoint written in %v", time.Since(start))
	sc := trainer.SessionConfig{Model: model, Quantize: "nf4",
		LoRA:                  trainer.LoRAConfig{R: 32, Alpha: 64, Dropout: 0.05, Targets: trainer.AllModules},
		Optimizer:             trainer.OptimizerConfig{Name: "adamw_8bit"},
		GradientCheckpointing: true, MaxTokens: 2 * len(rows[0].InputIDs)}
	s := openGPU("bf16")(t, sc)
	defer s.Close()
	res, err := trainer.Train(context.Background(), s, trainer.Rows(rows), trainer.TrainOptions{LR: 2e-3, BatchSize: 2, GradAccum: 1,
		Epochs: 1, MaxSteps: 20, Seed: 5, LogEvery: 5, OutDir: filepath.Join(out, "train"), BaseModel: trainer.BaseModel{NameOrPath: model}})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(res.AdapterDir, filepath.Join(out, "adapter")); err != nil {
		t.Fatal(err)
	}
	t.Logf("adapter trained: %d steps, loss %.4f", res.Steps, res.FinalLoss)
}
