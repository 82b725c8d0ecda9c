package gpu

import (
	"fmt"
	"math"
	"os"
	"slices"
	"strings"

	"gemmaft/cuda"
	"gemmaft/trainer"
	"gemmaft/trainer/gpu/kernels"
)

// MemoryPlan is the device memory a session will hold, by what it holds,
// in bytes as the allocator reserves them. It is computed from the shapes
// alone, before anything is loaded, so a run that cannot fit is refused
// with what to change.
type MemoryPlan struct {
	Weights     int64 // NF4 (or dense) projections, the embedding, norms
	Adapter     int64 // LoRA weights, gradients and their bf16 copy
	Optimizer   int64 // moments
	Saved       int64 // layer inputs kept through the forward pass
	Activations int64 // one block's activations (every block's without checkpointing)
	Work        int64 // backward temporaries, the loss chunk, batch tables
	Runtime     int64 // CUDA context, cuBLASLt workspace, kernel modules
	// Offload is the low-memory layout: the saved inputs in pinned host
	// memory, three slots of them on the device, and the loss chunk and
	// the blocks' temporaries sharing one region. GradsOnHost: the LoRA
	// gradients in pinned host memory too, three layers' on the device
	// (hostGrads). Host is the pinned host memory of both.
	Offload     bool
	GradsOnHost bool
	Host        int64
	// KeptWeights: a block's recomputation dequantises its q, k, v, gate
	// and up weights into buffers of their own (workspace.kept), where its
	// backward pass reads them again instead of dequantising them once
	// more (a quarter of the dequantisation a step, ~300 MB at 12B).
	KeptWeights bool
}

// keepHeadroom is what a plan must leave free before it keeps the
// recomputation's weights, an optional speed-up that must never take a
// run over the memory it was given: more than a plan has been seen to
// miss the measured peak by (±0.02 GiB over the four training presets on
// an H200).
const keepHeadroom = 64 << 20

// layout is how a plan places what it may take off the device or keep.
type layout struct {
	offload   bool // the saved inputs in host memory (MemoryPlan.Offload)
	hostGrads bool // the LoRA gradients too, where the session may (gradsOnHost)
	keep      bool // the recomputation's weights kept (MemoryPlan.KeptWeights), where it has them
}

// KeepWeightsEnv names the switch of MemoryPlan.KeptWeights: "auto" (the
// default) keeps them where the run still fits, "off" never.
const KeepWeightsEnv = "PIPELINE_KEEP_WEIGHTS"

func keepWeightsMode() (string, error) { return envSwitch(KeepWeightsEnv, "auto", "off") }

// envSwitch reads the switch name, one of modes; unset, it is the first.
func envSwitch(name string, modes ...string) (string, error) {
	m := os.Getenv(name)
	if m == "" {
		return modes[0], nil
	}
	if slices.Contains(modes, m) {
		return m, nil
	}
	return "", fmt.Errorf("%s=%q: use %s or %s", name, m, strings.Join(modes[:len(modes)-1], ", "), modes[len(modes)-1])
}

// LoRAFoldEnv names the switch of the gate and up pair's folded GEMM
// (foldedPair): "auto" (the default) folds where foldsGateUp allows, "off"
// never.
const LoRAFoldEnv = "PIPELINE_LORA_FOLD"

// foldsGateUp reports whether a session of sc folds gate's and up's LoRA B
// products into their frozen GEMM: a training one over an NF4 base, both
// adapted with their updates first (LoRAFirstEnv), at a LoRA scale that is
// a power of two (s·B then exact in bfloat16).
func foldsGateUp(sc trainer.SessionConfig) bool {
	if sc.Inference || sc.Quantize != "nf4" || os.Getenv(LoRAFoldEnv) == "off" {
		return false
	}
	if frac, _ := math.Frexp(float64(sc.LoRA.Scale())); frac != 0.5 {
		return false
	}
	first, err := loraFirstModules()
	if err != nil || !first[moduleIndex(trainer.GateProj)] || !first[moduleIndex(trainer.UpProj)] {
		return false
	}
	var gate, up bool
	for _, m := range sc.LoRA.Targets {
		gate, up = gate || m == trainer.GateProj, up || m == trainer.UpProj
	}
	return gate && up
}

// keepsWeights reports whether a session of sc has weights to keep: a
// training one with gradient checkpointing (a recomputation before each
// block's backward pass) over an NF4 base.
func keepsWeights(sc trainer.SessionConfig) bool {
	return sc.GradientCheckpointing && !sc.Inference && sc.Quantize == "nf4"
}

// runtimeBytes is what the CUDA context, the cuBLASLt workspace and the
// loaded kernels take beside the session's buffers: measured at about
// 0.5 GiB on H100/H200 with CUDA 13, and 0.55–0.59 GiB as what the
// training presets' peaks hold beyond their buffers' pages on an H200.
const runtimeBytes = 576 << 20

// Total is the plan's sum.
func (p MemoryPlan) Total() int64 {
	return p.Weights + p.Adapter + p.Optimizer + p.Saved + p.Activations + p.Work + p.Runtime
}

func (p MemoryPlan) String() string {
	parts := []struct {
		name string
		b    int64
	}{{"weights", p.Weights}, {"adapter", p.Adapter}, {"optimizer", p.Optimizer}, {"saved inputs", p.Saved},
		{"activations", p.Activations}, {"work", p.Work}, {"runtime", p.Runtime}}
	var out []string
	for _, x := range parts {
		out = append(out, fmt.Sprintf("%s %.2f", x.name, gib(x.b)))
	}
	s := strings.Join(out, ", ") + " GiB"
	switch {
	case p.GradsOnHost:
		s += fmt.Sprintf("; saved inputs and LoRA gradients offloaded to %.2f GiB of pinned host memory", gib(p.Host))
	case p.Offload:
		s += fmt.Sprintf("; saved inputs offloaded to %.2f GiB of pinned host memory", gib(p.Host))
	}
	if p.KeptWeights {
		s += "; the recomputation's weights kept"
	}
	return s
}

// choosePlan plans the session in the first layout that fits in free
// bytes, fastest first: everything on the device; the saved layer inputs
// offloaded (the low-memory layout); the LoRA gradients offloaded as
// well, which costs a read of them across the bus each step (1.4% of a
// 27B step on an H200). OffloadEnv "auto" chooses so; "off", "inputs"
// and "on" take the first, second and last. Offloading needs gradient
// checkpointing and more than three saved inputs. The layout chosen then
// keeps the recomputation's weights if it still fits with them and
// keepHeadroom to spare (KeepWeightsEnv): they save less time than
// offloading costs, and the same layout without them is never slower.
func choosePlan(cfg *trainer.Config, sc trainer.SessionConfig, prec kernels.Precision, free int64) (MemoryPlan, error) {
	p, l, err := chooseLayout(cfg, sc, prec, free)
	if err != nil {
		return p, err
	}
	keep, err := keepWeightsMode()
	if err != nil {
		return p, err
	}
	if keep == "auto" && keepsWeights(sc) {
		l.keep = true
		if k := plan(cfg, sc, prec, l); k.Total()+keepHeadroom <= free {
			return k, nil
		}
	}
	return p, nil
}

// chooseLayout is choosePlan's choice of what to offload.
func chooseLayout(cfg *trainer.Config, sc trainer.SessionConfig, prec kernels.Precision, free int64) (MemoryPlan, layout, error) {
	mode, err := offloadMode()
	if err != nil {
		return MemoryPlan{}, layout{}, err
	}
	plainL, inputsL, offL := layout{}, layout{offload: true}, layout{offload: true, hostGrads: true}
	plain := plan(cfg, sc, prec, plainL)
	can := sc.GradientCheckpointing && cfg.Layers+1 > offloadSlots
	inputs := plan(cfg, sc, prec, inputsL)
	switch {
	case (mode == "on" || mode == "inputs") && !can:
		return plain, plainL, fmt.Errorf("%s=%s: offloading the saved layer inputs needs gradient_checkpointing (and more than %d layers)", OffloadEnv, mode, offloadSlots-1)
	case mode == "on":
		return plan(cfg, sc, prec, offL), offL, nil
	case mode == "inputs":
		return inputs, inputsL, nil
	case mode == "auto" && can && plain.Total() > free:
		if inputs.Total() <= free {
			return inputs, inputsL, nil
		}
		return plan(cfg, sc, prec, offL), offL, nil
	}
	return plain, plainL, nil
}

// Plan computes the memory plan of a session of sc over a model of cfg,
// everything on the device and no weights kept.
func Plan(cfg *trainer.Config, sc trainer.SessionConfig, prec kernels.Precision) MemoryPlan {
	return plan(cfg, sc, prec, layout{})
}

// PlanOffloaded is Plan with the saved layer inputs in host memory, and
// the LoRA gradients too where the session has them to itself (see
// gradsOnHost).
func PlanOffloaded(cfg *trainer.Config, sc trainer.SessionConfig, prec kernels.Precision) MemoryPlan {
	return plan(cfg, sc, prec, layout{offload: true, hostGrads: true})
}

func plan(cfg *trainer.Config, sc trainer.SessionConfig, prec kernels.Precision, l layout) MemoryPlan {
	act := prec.Size()
	var p MemoryPlan
	sz := cuda.WholeBytes // session.alloc's blocks
	p.Weights = sz(int64(cfg.VocabSize)*int64(cfg.Hidden)*act) + sz(4*int64(cfg.Hidden))
	for l := 0; l < cfg.Layers; l++ {
		p.Weights += 4*sz(4*int64(cfg.Hidden)) + 2*sz(4*int64(cfg.HeadDim))
		for _, m := range trainer.AllModules {
			out, in := cfg.ProjShape(m)
			n := int64(out) * int64(in)
			if sc.Quantize == "nf4" {
				blocks := (n + trainer.NF4BlockSize - 1) / trainer.NF4BlockSize
				p.Weights += sz((n+1)/2) + sz(blocks) + sz(4*((blocks+trainer.AbsmaxBlockSize-1)/trainer.AbsmaxBlockSize))
			} else {
				p.Weights += sz(n * act)
			}
		}
	}
	p.Offload = l.offload
	p.GradsOnHost = l.hostGrads && gradsOnHost(sc, l.offload)
	p.KeptWeights = l.keep && keepsWeights(sc)
	if st, err := layoutLoRA(cfg, sc.LoRA, sc.Optimizer); err == nil {
		p.Adapter = 2 * sz(4*st.total)
		if p.GradsOnHost {
			p.Adapter = sz(4*st.total) + gradSlots*sz(4*max(st.widestLayer(), 1))
			p.Host += 4 * st.total
		}
		if act != 4 {
			p.Adapter += sz(act * st.widestLayer()) // one layer's copy: loraState.stage
		}
		if sc.Optimizer.Name == "adamw" || st.hasSmall {
			p.Optimizer += 2 * sz(4*st.total)
		}
		if st.nblocks > 0 {
			p.Optimizer += 2*sz(st.total) + 2*sz(4*int64(st.nblocks)) + sz(8*int64(st.nblocks)) + sz(4*int64(st.nblocks))
		}
		p.Optimizer += sz(8 * (kernels.NormPartials + 1) * int64(cfg.Layers))
	}
	_, specs := layoutWorkspace(cfg, sc, act, max(sc.MaxTokens, 1), l.offload, p.KeptWeights)
	var input int64 // one saved input's bytes
	for _, b := range specs {
		switch b.group {
		case groupSaved:
			p.Saved += sz(b.bytes)
			input = b.bytes
		case groupLayer:
			p.Activations += sz(b.bytes)
		case groupWork:
			p.Work += sz(b.bytes)
		}
	}
	if l.offload {
		p.Host += int64(cfg.Layers) * input // each block's on the host
	}
	_, shared := sharedRegion(specs)
	p.Work += sz(shared)
	p.Runtime = runtimeBytes
	return p
}
