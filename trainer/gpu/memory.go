package gpu

import (
	"fmt"
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
}

// runtimeBytes is what the CUDA context, the cuBLASLt workspace and the
// loaded kernels take beside the session's buffers (measured at about
// 0.5 GiB on H100/H200 with CUDA 13).
const runtimeBytes = 512 << 20

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
	return strings.Join(out, ", ") + " GiB"
}

// Plan computes the memory plan of a session of sc over a model of cfg.
func Plan(cfg *trainer.Config, sc trainer.SessionConfig, prec kernels.Precision) MemoryPlan {
	act := prec.Size()
	var p MemoryPlan
	sz := cuda.AllocSize
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
	if st, err := layoutLoRA(cfg, sc.LoRA, sc.Optimizer); err == nil {
		p.Adapter = 2 * sz(4*st.total)
		if act != 4 {
			p.Adapter += sz(act * st.total)
		}
		if sc.Optimizer.Name == "adamw" || st.hasSmall {
			p.Optimizer += 2 * sz(4*st.total)
		}
		if st.nblocks > 0 {
			p.Optimizer += 2*sz(st.total) + 2*sz(4*int64(st.nblocks)) + sz(8*int64(st.nblocks)) + sz(4*int64(st.nblocks))
		}
		p.Optimizer += sz(8 * (kernels.NormPartials + 1))
	}
	_, specs := layoutWorkspace(cfg, sc, act, max(sc.MaxTokens, 1))
	for _, b := range specs {
		switch b.group {
		case groupSaved:
			p.Saved += sz(b.bytes)
		case groupLayer:
			p.Activations += sz(b.bytes)
		default:
			p.Work += sz(b.bytes)
		}
	}
	p.Runtime = runtimeBytes
	return p
}
