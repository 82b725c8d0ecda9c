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
// (with what their blocks save beside them) but three off the device and
// puts them in pinned host memory, shares one region between the loss
// chunk and the block temporaries, and may keep the LoRA gradients in
// host memory too; auto offloads only what does not fit otherwise, and
// only with gradient checkpointing.
func TestOffloadPlan(t *testing.T) {
	mc, _ := trainer.Preset("12b")
	sc := trainer.SessionConfig{Quantize: "nf4", LoRA: trainer.LoRAConfig{R: 32, Alpha: 64, Targets: trainer.AllModules},
		Optimizer: trainer.OptimizerConfig{Name: "adamw_8bit"}, GradientCheckpointing: true, MaxTokens: 2 * 4096}
	if err := sc.Validate(); err != nil {
		t.Fatal(err)
	}
	plain, off := Plan(mc, sc, kernels.BF16), PlanOffloaded(mc, sc, kernels.BF16)
	// A saved input: the block's input, its o and down projections'
	// outputs, the down projection's norm's rstd, its seven x·Aᵀ products.
	T := int64(2 * 4096)
	input := 3*T*int64(mc.Hidden)*2 + 4*T + 7*T*32*2
	// The gradients: 4 bytes a LoRA parameter, r 32 on every projection
	// of every layer; on the device, three layers' of them.
	var params, widest int64
	for l := 0; l < mc.Layers; l++ {
		var n int64
		for _, m := range trainer.AllModules {
			out, in := mc.ProjShape(m)
			n += 32 * int64(out+in)
		}
		params, widest = params+n, max(widest, n)
	}
	if plain.Saved < int64(mc.Layers+1)*input || off.Saved > 3*cuda.WholeBytes(input) || off.Host != int64(mc.Layers)*input+4*params {
		t.Errorf("saved %d → %d bytes, host %d; one input is %d bytes, %d layers, %d LoRA parameters", plain.Saved, off.Saved, off.Host, input, mc.Layers, params)
	}
	if got, want := plain.Adapter-off.Adapter, cuda.WholeBytes(4*params)-3*cuda.WholeBytes(4*widest); !off.GradsOnHost || got != want {
		t.Errorf("the low-memory layout keeps %d fewer adapter bytes on the device (gradients on the host: %v), want %d", got, off.GradsOnHost, want)
	}
	if plain.Weights != off.Weights || plain.Optimizer != off.Optimizer || plain.Activations != off.Activations || off.Work >= plain.Work {
		t.Errorf("the low-memory layout should change the saved inputs, the gradients and the shared work buffers only:\n%s\n%s", plain, off)
	}
	t.Logf("12B seq 4096 batch 2: %.2f GiB, offloaded %.2f GiB (%s)", gib(plain.Total()), gib(off.Total()), off)

	inputs := plan(mc, sc, kernels.BF16, layout{offload: true})
	if inputs.GradsOnHost || off.Total() >= inputs.Total() || inputs.Total() >= plain.Total() {
		t.Errorf("offloading the inputs alone should plan between the default layout and offloading the gradients too: %.2f, %.2f, %.2f GiB", gib(plain.Total()), gib(inputs.Total()), gib(off.Total()))
	}
	for _, c := range []struct {
		env       string
		ckpt      bool
		free      int64
		offload   bool
		hostGrads bool
		errorHas  string
	}{
		{"", true, plain.Total() + 1, false, false, ""},
		{"auto", true, plain.Total() - 1, true, false, ""},
		{"auto", true, inputs.Total() - 1, true, true, ""},
		{"off", true, plain.Total() - 1, false, false, ""},
		{"on", true, plain.Total() + 1, true, true, ""},
		{"inputs", true, plain.Total() + 1, true, false, ""},
		{"inputs", false, plain.Total() + 1, false, false, "gradient_checkpointing"},
		{"on", false, plain.Total() + 1, false, false, "gradient_checkpointing"},
		{"auto", false, 1, false, false, ""},
		{"yes", true, 1, false, false, "use auto, on, inputs or off"},
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
		if err != nil || p.Offload != c.offload || p.GradsOnHost != c.hostGrads {
			t.Errorf("%s=%q, checkpointing %v, %d bytes free: offload %v, gradients on the host %v (%v), want %v, %v",
				OffloadEnv, c.env, c.ckpt, c.free, p.Offload, p.GradsOnHost, err, c.offload, c.hostGrads)
		}
	}
}

// TestKeptWeightsPlan: keeping the recomputation's weights costs their
// dequantised bytes (q, k, v, gate and up in bf16), is chosen after the
// offloading, only where the run still fits with them, and only for a
// training session with gradient checkpointing over an NF4 base, with
// keepHeadroom to spare; at 12B, seq 4096, batch 2, on a 13 GiB budget
// they fit beside the offloaded inputs, and at 27B, batch 1, on a 20 GiB
// one they do not (their 0.5 GiB took its peak to 20.24 GiB on an H200).
func TestKeptWeightsPlan(t *testing.T) {
	mc, _ := trainer.Preset("12b")
	sc := trainer.SessionConfig{Quantize: "nf4", LoRA: trainer.LoRAConfig{R: 32, Alpha: 64, Dropout: 0.05, Targets: trainer.AllModules},
		Optimizer: trainer.OptimizerConfig{Name: "adamw_8bit"}, GradientCheckpointing: true, MaxTokens: 2 * 4096}
	if err := sc.Validate(); err != nil {
		t.Fatal(err)
	}
	// Gate's and up's widened where their LoRA products fold into the GEMM.
	var weights int64
	for _, m := range []trainer.Module{trainer.QProj, trainer.KProj, trainer.VProj, trainer.GateProj, trainer.UpProj} {
		out, in := mc.ProjShape(m)
		if foldsGateUp(sc) && (m == trainer.GateProj || m == trainer.UpProj) {
			in += 2 * sc.LoRA.R
		}
		weights += 2 * int64(out) * int64(in)
	}
	plain, kept := Plan(mc, sc, kernels.BF16), plan(mc, sc, kernels.BF16, layout{keep: true})
	if !kept.KeptWeights || kept.Work-plain.Work != cuda.WholeBytes(weights) || kept.Total()-plain.Total() != kept.Work-plain.Work {
		t.Errorf("kept weights: %d more work bytes (kept %v), want %d", kept.Work-plain.Work, kept.KeptWeights, cuda.WholeBytes(weights))
	}
	inputs, inputsKept := plan(mc, sc, kernels.BF16, layout{offload: true}), plan(mc, sc, kernels.BF16, layout{offload: true, keep: true})
	// In the shared region, laid out at Alloc's steps.
	if grow := inputsKept.Total() - inputs.Total(); grow <= 0 || grow > cuda.DeviceBytes(weights) {
		t.Errorf("kept weights beside the offloaded inputs: %d bytes more, want (0, %d]", grow, cuda.DeviceBytes(weights))
	}
	t.Setenv(OffloadEnv, "auto")
	for _, c := range []struct {
		what    string
		env     string
		edit    func(*trainer.SessionConfig)
		free    int64
		offload bool
		kept    bool
	}{
		{"room for them", "", nil, kept.Total() + keepHeadroom, false, true},
		{"a byte short", "auto", nil, kept.Total() + keepHeadroom - 1, false, false},
		{"switched off", "off", nil, kept.Total() + keepHeadroom, false, false},
		{"no checkpointing", "", func(s *trainer.SessionConfig) { s.GradientCheckpointing = false }, 1 << 40, false, false},
		{"a bf16 base", "", func(s *trainer.SessionConfig) { s.Quantize = "none" }, 1 << 40, false, false},
		{"inference", "", func(s *trainer.SessionConfig) { s.Inference = true }, 1 << 40, false, false},
		{"13 GiB", "", nil, 13 << 30, true, true},
	} {
		t.Setenv(KeepWeightsEnv, c.env)
		s := sc
		if c.edit != nil {
			c.edit(&s)
		}
		p, err := choosePlan(mc, s, kernels.BF16, c.free)
		if err != nil || p.KeptWeights != c.kept || p.Offload != c.offload {
			t.Errorf("%s: weights kept %v, offload %v (%v), want %v, %v", c.what, p.KeptWeights, p.Offload, err, c.kept, c.offload)
		}
		if c.what == "13 GiB" {
			t.Logf("12B seq 4096 batch 2 in 13 GiB: %.2f GiB (%s)", gib(p.Total()), p)
		}
	}
	mc27, _ := trainer.Preset("27b")
	sc27 := sc
	sc27.MaxTokens = 4096
	if p, err := choosePlan(mc27, sc27, kernels.BF16, 20<<30); err != nil || p.KeptWeights || !p.GradsOnHost {
		t.Errorf("27B in 20 GiB: weights kept %v, gradients on the host %v (%v), want neither kept and the gradients offloaded", p.KeptWeights, p.GradsOnHost, err)
	}
	t.Setenv(KeepWeightsEnv, "yes")
	if _, err := choosePlan(mc, sc, kernels.BF16, 1<<40); err == nil || !strings.Contains(err.Error(), "use auto or off") {
		t.Errorf("%s=yes: %v, want an error saying what to use", KeepWeightsEnv, err)
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
	if want := int64(mc.Layers+1) * cuda.WholeBytes(input); eval.Saved != want {
		t.Errorf("inference: saved inputs %d bytes, want %d (the inputs alone)", eval.Saved, want)
	}
	if train.Saved <= eval.Saved {
		t.Errorf("training: saved inputs %d bytes, no more than inference's %d", train.Saved, eval.Saved)
	}
	var masks int64
	for _, m := range trainer.AllModules {
		_, in := mc.ProjShape(m)
		masks += cuda.WholeBytes(kernels.MaskBytes(T * int64(in)))
	}
	// Training keeps the masks but not the block's own o, d, rstd4 and x·Aᵀ
	// buffers (they live with the saved input); inference the other way.
	own := 2*cuda.WholeBytes(input) + cuda.WholeBytes(4*T) + 7*cuda.WholeBytes(T*32*2)
	if got, want := train.Activations-eval.Activations, masks-own; got != want {
		t.Errorf("activations: training %d bytes more than inference, want %d", got, want)
	}
}

// TestOffloadIsExact: with the saved inputs and the gradients offloaded,
// with the recomputation's weights kept for the backward pass, and with
// both, losses, gradients (accumulated over two micro-batches, and started
// afresh after a step), the gradient norm and the updated weights (also
// of a step whose update is still pending, pendingUpdate, when the state
// is read) are those of the same session with neither, bit for bit; a
// step before any backward pass sees zero gradients in all.
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
		grads  [][]trainer.Param
		norm   float64
		// lastNorm: the norm of a step taken just before State.
		lastNorm float64
		state    []trainer.Param
	}
	run := func(mode, keep, optimizer string) outcome {
		t.Setenv(OffloadEnv, mode)
		t.Setenv(KeepWeightsEnv, keep)
		sc := sc
		sc.Optimizer.Name = optimizer
		s, err := trainer.OpenSession(context.Background(), "cuda", sc)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		if p := s.(*session).plan; p.Offload != (mode == "on") || p.GradsOnHost != (mode == "on") || p.KeptWeights != (keep == "auto") {
			t.Fatalf("%s=%s, %s=%s: offload %v, gradients on the host %v, weights kept %v", OffloadEnv, mode, KeepWeightsEnv, keep, p.Offload, p.GradsOnHost, p.KeptWeights)
		}
		if err := s.SetState(a, nil); err != nil {
			t.Fatal(err)
		}
		// A step before any backward pass sees zero gradients.
		if norm, err := s.Step(1e-3, 1); err != nil || norm != 0 {
			t.Fatalf("%s=%s: a step before any gradient: norm %v, %v", OffloadEnv, mode, norm, err)
		}
		var o outcome
		grads := func() {
			g, err := s.Grads()
			if err != nil {
				t.Fatal(err)
			}
			o.grads = append(o.grads, g.Params())
		}
		for i := 0; i < 3; i++ {
			b, err := trainer.NewBatch(rows[2*(i%2) : 2*(i%2)+2])
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
			if i == 1 {
				grads()
				if o.norm, err = s.Step(1e-3, 1); err != nil {
					t.Fatal(err)
				}
			}
		}
		grads()
		// A step whose update is still pending when the state is read
		// (with the gradients on the host, the next forward pass applies
		// it; State must first).
		if o.lastNorm, err = s.Step(1e-3, 1); err != nil {
			t.Fatal(err)
		}
		st, _, err := s.State()
		if err != nil {
			t.Fatal(err)
		}
		o.state = st.Params()
		return o
	}
	for _, optimizer := range []string{"adamw", "adamw_8bit"} {
		plain := run("off", "off", optimizer)
		for _, c := range []struct{ offload, keep, with string }{
			{"on", "off", "the inputs and gradients offloaded"},
			{"off", "auto", "the weights kept"},
			{"on", "auto", "both"},
		} {
			off := run(c.offload, c.keep, optimizer)
			for i := range plain.losses {
				if plain.losses[i] != off.losses[i] {
					t.Errorf("loss %d: %v with neither, %v with %s", i, plain.losses[i], off.losses[i], c.with)
				}
			}
			same := func(what string, a, b []trainer.Param) {
				t.Helper()
				for i := range a {
					for j := range a[i].Data {
						if a[i].Data[j] != b[i].Data[j] {
							t.Fatalf("%s %s[%d]: %v with neither, %v with %s", what, a[i].Name, j, a[i].Data[j], b[i].Data[j], c.with)
						}
					}
				}
			}
			same("accumulated gradient", plain.grads[0], off.grads[0])
			same("gradient after the step", plain.grads[1], off.grads[1])
			same("weight after the step", plain.state, off.state)
			if plain.norm != off.norm || plain.norm == 0 {
				t.Errorf("gradient norm %v with neither, %v with %s", plain.norm, off.norm, c.with)
			}
			if plain.lastNorm != off.lastNorm || plain.lastNorm == 0 {
				t.Errorf("last step's gradient norm %v with neither, %v with %s", plain.lastNorm, off.lastNorm, c.with)
			}
		}
		t.Logf("%s: losses %v, norm %v, identical with the inputs and gradients offloaded, the weights kept, and both", optimizer, plain.losses, plain.norm)
	}
}

func mustConfig(t *testing.T, dir string) *trainer.Config {
	t.Helper()
	ck, err := trainer.OpenCheckpoint(dir)
	if err != nil {
		t.Fatal(err)
	}
	return ck.Config
}
