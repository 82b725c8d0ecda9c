package trainer

import "strings"

// FLOPs counts the floating-point operations of one micro-batch, for model
// and hardware FLOP utilisation (MFU, HFU). A multiply-add is two.
//
// With T tokens, N of them trained, the seven projections' P parameters,
// hidden size d, vocabulary V, H query heads of size h, and "pairs" the
// (query, key) pairs a layer's attention computes (Σ over tokens of the
// keys each may see: its example's earlier tokens, within the window on
// sliding layers):
//
//	forward  = 2·T·P                      the frozen projections
//	         + 2·N·V·d                    the tied lm_head at the trained positions
//	         + Σ_layers 4·h·H·pairs       QKᵀ and P·V
//	         + Σ_adapted 2·T·r·(in + out) the LoRA products
//	backward = 2·T·P + 2·N·V·d            input gradients only: the base is frozen
//	         + Σ_layers 8·h·H·pairs       dV, dP, dQ and dK
//	         + Σ_adapted 4·T·r·(in + out) LoRA input and weight gradients
//	recompute = 2·T·(P − P_o − P_down)    gradient checkpointing runs each block again
//	          + Σ_layers 4·h·H·pairs      up to its down projection, without the o
//	          + Σ_adapted 2·T·r·out       projection: the forward pass saves both
//	            (o and down aside)        outputs, as it saves x·Aᵀ
//
// The recomputation is the GPU backend's (bench train's); the CPU
// reference recomputes whole blocks. MFU counts forward and backward; HFU
// adds the recomputation. The lm_head is counted at the trained positions
// only, the ones the loss needs, so the figures are conservative against
// tools that compute every logit.
type FLOPs struct {
	Forward, Backward, Recompute float64
}

// Model is forward plus backward, the work the model needs.
func (f FLOPs) Model() float64 { return f.Forward + f.Backward }

// Hardware adds what gradient checkpointing recomputes.
func (f FLOPs) Hardware() float64 { return f.Forward + f.Backward + f.Recompute }

// StepFLOPs counts one micro-batch b of a model of shape c with an adapter
// of shape lora; checkpointing says whether blocks are recomputed.
func StepFLOPs(c *Config, lora LoRAConfig, b *Batch, checkpointing bool) FLOPs {
	T := float64(len(b.IDs))
	N := float64(b.Trained())
	// saved: the projections whose outputs the forward pass keeps, which
	// the recomputation therefore skips.
	saved := func(m Module) bool { return m == OProj || m == DownProj }
	var proj, recomputed, adapted, adaptedB float64
	for _, m := range AllModules {
		out, in := c.ProjShape(m)
		proj += float64(out) * float64(in)
		if !saved(m) {
			recomputed += float64(out) * float64(in)
		}
	}
	for _, m := range lora.Targets {
		out, in := c.ProjShape(m)
		adapted += float64(lora.R) * float64(in+out)
		if !saved(m) {
			adaptedB += float64(lora.R) * float64(out)
		}
	}
	pairs := map[LayerType]float64{}
	for _, lt := range []LayerType{SlidingAttention, FullAttention} {
		w := 0
		if lt == SlidingAttention {
			w = c.SlidingWindow
		}
		for i, lo := range AttentionSpans(b.SegStart, w) {
			pairs[lt] += float64(i - int(lo) + 1)
		}
	}
	L := float64(c.Layers)
	var attn float64
	for _, lt := range c.LayerTypes {
		attn += float64(c.HeadDim) * float64(c.Heads) * pairs[lt]
	}
	head := 2 * N * float64(c.VocabSize) * float64(c.Hidden)
	f := FLOPs{
		Forward:  2*T*proj*L + head + 4*attn + 2*T*adapted*L,
		Backward: 2*T*proj*L + head + 8*attn + 4*T*adapted*L,
	}
	if checkpointing {
		f.Recompute = 2*T*recomputed*L + 4*attn + 2*T*adaptedB*L
	}
	return f
}

// PeakBF16 returns the dense bfloat16 tensor rate (FLOP/s, float32
// accumulation) of a GPU by its name, and false for a GPU not in the table.
func PeakBF16(device string) (float64, bool) {
	return byGPUName(device, []gpuFigure{
		{"H200", 989e12}, {"H100 PCIe", 756e12}, {"H100 NVL", 835e12}, {"H100", 989e12}, {"H800", 989e12},
		{"GH200", 989e12}, {"A100", 312e12}, {"A800", 312e12}, {"L40S", 362e12}, {"L40", 181e12},
		{"RTX 4090", 165e12}, {"RTX 4080", 97.5e12}, {"RTX 3090", 71e12}, {"A6000", 155e12}, {"A10", 125e12},
	})
}

// gpuFigure is one row of a table of GPU figures by name.
type gpuFigure struct {
	name  string
	value float64
}

// byGPUName returns the value of the first row whose name the device's
// name contains (case aside): more specific names come first.
func byGPUName(device string, table []gpuFigure) (float64, bool) {
	for _, e := range table {
		if strings.Contains(strings.ToUpper(device), strings.ToUpper(e.name)) {
			return e.value, true
		}
	}
	return 0, false
}

// DecodeStepBytes is the weight memory one decoding step reads: every
// projection once (whatever the batch size, since a step multiplies all
// its sequences' vectors by the same weights), in bfloat16 or, with nf4,
// as 4-bit codes with one 8-bit absmax per 64 weights and one float32
// per 256 absmaxes, plus the tied embedding as the lm_head in bfloat16.
// The key/value cache and the norms are left out: at the prompt lengths
// decoding benchmarks use they are well under 1% of it. Over a card's
// memory bandwidth it bounds decoding steps per second.
func DecodeStepBytes(c *Config, nf4 bool) float64 {
	var proj float64
	for _, m := range AllModules {
		out, in := c.ProjShape(m)
		proj += float64(out) * float64(in)
	}
	perWeight := 2.0
	if nf4 {
		perWeight = 0.5 + 1.0/64 + 4.0/(64*256)
	}
	return proj*float64(c.Layers)*perWeight + 2*float64(c.VocabSize)*float64(c.Hidden)
}

// PeakBandwidth returns a GPU's memory bandwidth (bytes/s) by its name,
// and false for a GPU not in the table.
func PeakBandwidth(device string) (float64, bool) {
	return byGPUName(device, []gpuFigure{
		{"GH200", 4.0e12}, {"H200", 4.8e12}, {"H100 PCIe", 2.0e12}, {"H100 NVL", 3.9e12}, {"H100", 3.35e12},
		{"H800", 3.35e12}, {"A100-SXM4-80GB", 2.04e12}, {"A100 80GB", 1.94e12}, {"A100", 1.555e12},
		{"L40S", 864e9}, {"L40", 864e9}, {"RTX 4090", 1.008e12}, {"RTX 4080", 717e9}, {"RTX 3090", 936e9},
		{"A6000", 768e9}, {"A10", 600e9},
	})
}
