package gpu

import (
	"context"
	"strings"
	"testing"

	"gemmaft/cuda"
	"gemmaft/cuda/cudatest"
	"gemmaft/trainer"
	"gemmaft/trainer/gpu/kernels"
)

// TestOffloadPlan: the low-memory layout takes the saved layer inputs
// (with what their blocks save beside them) but three off the device and puts them in pinned host memory, and shares one
// region between the loss chunk and the block temporaries; auto uses it
// only for a run that would not fit otherwise, and only with gradient
// checkpointing.
func TestOffloadPlan(t *testing.T) {
	mc, _ := trainer.Preset("12b")
	sc := trainer.SessionConfig{Quantize: "nf4", LoRA: trainer.LoRAConfig{R: 32, Alpha: 64, Targets: trainer.AllModules},
		Optimizer: trainer.OptimizerConfig{Name: "adamw_8bit"}, GradientCheckpointing: true, MaxTokens: 2 * 4096}
	if err := sc.Validate(); err != nil {
		t.Fatal(err)
	}
	plain, off := Plan(mc, sc, kernels.BF16), PlanOffloaded(mc, sc, kernels.BF16)
	// A saved input: the block's input, its down projection's output and
	// that norm's rstd, its seven x·Aᵀ products.
	T := int64(2 * 4096)
	input := 2*T*int64(mc.Hidden)*2 + 4*T + 7*T*32*2
	if plain.Saved < int64(mc.Layers+1)*input || off.Saved > 3*cuda.AllocSize(input) || off.Host != int64(mc.Layers)*input {
		t.Errorf("saved %d → %d bytes, host %d; one input is %d bytes, %d layers", plain.Saved, off.Saved, off.Host, input, mc.Layers)
	}
	if plain.Weights != off.Weights || plain.Adapter != off.Adapter || plain.Optimizer != off.Optimizer ||
		plain.Activations != off.Activations || off.Work >= plain.Work {
		t.Errorf("the low-memory layout should change the saved inputs and the shared work buffers only:\n%s\n%s", plain, off)
	}
	t.Logf("12B seq 4096 batch 2: %.2f GiB, offloaded %.2f GiB (%s)", gib(plain.Total()), gib(off.Total()), off)

	for _, c := range []struct {
		env      string
		ckpt     bool
		free     int64
		offload  bool
		errorHas string
	}{
		{"", true, plain.Total() + 1, false, ""},
		{"auto", true, plain.Total() - 1, true, ""},
		{"off", true, plain.Total() - 1, false, ""},
		{"on", true, plain.Total() + 1, true, ""},
		{"on", false, plain.Total() + 1, false, "gradient_checkpointing"},
		{"auto", false, 1, false, ""},
		{"yes", true, 1, false, "use auto, on or off"},
	} {
		t.Setenv(OffloadEnv, c.env)
		s := sc
		s.GradientCheckpointing = c.ckpt
		p, err := choosePlan(mc, s, kernels.BF16, c.free)
		if c.errorHas != "" {
			if err == nil || !strings.Contains(err.Error(), c.errorHas) {
				t.Errorf("%s=%q, checkpointing %v: %v, want an error saying %q", OffloadEnv, c.env, c.ckpt, err, c.errorHas)
			}
			continue
		}
		if err != nil || p.Offload != c.offload {
			t.Errorf("%s=%q, checkpointing %v, %d bytes free: offload %v (%v), want %v", OffloadEnv, c.env, c.ckpt, c.free, p.Offload, err, c.offload)
		}
	}
}

// TestInferencePlan: a session opened for inference (decoding, scoring)
// keeps nothing for a backward pass: its saved inputs are the inputs alone,
// and it has no dropout masks.
func TestInferencePlan(t *testing.T) {
	mc, _ := trainer.Preset("4b")
	sc := trainer.SessionConfig{Quantize: "nf4", LoRA: trainer.LoRAConfig{R: 32, Alpha: 64, Dropout: 0.05, Targets: trainer.AllModules},
		GradientCheckpointing: true, MaxTokens: 4096}
	if err := sc.Validate(); err != nil {
		t.Fatal(err)
	}
	inf := sc
	inf.Inference = true
	train, eval := Plan(mc, sc, kernels.BF16), Plan(mc, inf, kernels.BF16)
	T := int64(sc.MaxTokens)
	input := T * int64(mc.Hidden) * 2
	if want := int64(mc.Layers+1) * cuda.AllocSize(input); eval.Saved != want {
		t.Errorf("inference: saved inputs %d bytes, want %d (the inputs alone)", eval.Saved, want)
	}
	if train.Saved <= eval.Saved {
		t.Errorf("training: saved inputs %d bytes, no more than inference's %d", train.Saved, eval.Saved)
	}
	var masks int64
	for _, m := range trainer.AllModules {
		_, in := mc.ProjShape(m)
		masks += cuda.AllocSize(kernels.MaskBytes(T * int64(in)))
	}
	// Training keeps the masks but not the block's own d, rstd4 and x·Aᵀ
	// buffers (they live with the saved input); inference the other way.
	own := cuda.AllocSize(input) + cuda.AllocSize(4*T) + 7*cuda.AllocSize(T*32*2)
	if got, want := train.Activations-eval.Activations, masks-own; got != want {
		t.Errorf("activations: training %d bytes more than inference, want %d", got, want)
	}
}

// TestOffloadIsExact: with the saved inputs offloaded, losses and
// gradients are those of the same session without, bit for bit.
func TestOffloadIsExact(t *testing.T) {
	cudatest.Device(t)
	sc, _ := demoOptions()
	sc.Model = demoModel(t)
	sc.MaxTokens = 2 * 512
	rows := syntheticRows(262144, 4, 512, 5)
	a, err := trainer.NewAdapter(mustConfig(t, sc.Model), sc.LoRA, 3)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range a.Layers {
		for _, w := range l {
			for i := range w.B {
				w.B[i] = 0.01 * float32(i%7-3)
			}
		}
	}
	type outcome struct {
		losses []float64
		grads  []trainer.Param
	}
	run := func(mode string) outcome {
		t.Setenv(OffloadEnv, mode)
		s, err := trainer.OpenSession(context.Background(), "cuda", sc)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		if got := s.(*session).plan.Offload; got != (mode == "on") {
			t.Fatalf("%s=%s: offload %v", OffloadEnv, mode, got)
		}
		if err := s.SetState(a, nil); err != nil {
			t.Fatal(err)
		}
		var o outcome
		for i := 0; i < 2; i++ {
			b, err := trainer.NewBatch(rows[2*i : 2*i+2])
			if err != nil {
				t.Fatal(err)
			}
			l, _, err := s.LossAndGrad(b, 1000, uint64(i))
			if err != nil {
				t.Fatal(err)
			}
			e, _, err := s.Loss(b)
			if err != nil {
				t.Fatal(err)
			}
			o.losses = append(o.losses, l, e)
		}
		g, err := s.Grads()
		if err != nil {
			t.Fatal(err)
		}
		o.grads = g.Params()
		return o
	}
	plain, off := run("off"), run("on")
	for i := range plain.losses {
		if plain.losses[i] != off.losses[i] {
			t.Errorf("loss %d: %v without offloading, %v with", i, plain.losses[i], off.losses[i])
		}
	}
	for i := range plain.grads {
		for j := range plain.grads[i].Data {
			if plain.grads[i].Data[j] != off.grads[i].Data[j] {
				t.Fatalf("%s[%d]: gradient %v without offloading, %v with", plain.grads[i].Name, j, plain.grads[i].Data[j], off.grads[i].Data[j])
			}
		}
	}
	t.Logf("losses %v, identical with the inputs offloaded", plain.losses)
}

func mustConfig(t *testing.T, dir string) *trainer.Config {
	t.Helper()
	ck, err := trainer.OpenCheckpoint(dir)
	if err != nil {
		t.Fatal(err)
	}
	return ck.Config
}
