package trainer

import (
	"fmt"
	"math"
)

// AdamW is torch.optim.AdamW: Adam with decoupled weight decay, applied to
// float32 parameters with float32 moments in torch's order of operations.
type AdamW struct {
	Beta1, Beta2, Eps, WeightDecay float64
	Step                           int         // optimizer steps taken
	M, V                           [][]float32 // first and second moments per parameter
}

// NewAdamW creates the optimizer state for params.
func NewAdamW(params []Param, beta1, beta2, eps, weightDecay float64) *AdamW {
	o := &AdamW{Beta1: beta1, Beta2: beta2, Eps: eps, WeightDecay: weightDecay}
	for _, p := range params {
		o.M = append(o.M, make([]float32, len(p.Data)))
		o.V = append(o.V, make([]float32, len(p.Data)))
	}
	return o
}

// Update applies one step with learning rate lr to params (in the order the
// state was created with) from their gradients.
func (o *AdamW) Update(params []Param, lr float64) error {
	if len(params) != len(o.M) {
		return fmt.Errorf("adamw: %d parameters, state for %d", len(params), len(o.M))
	}
	o.Step++
	// Coefficients are formed in float64 and rounded once, as torch turns
	// its Python-float arguments into float32 scalars.
	c1, b2, c2 := float32(1-o.Beta1), float32(o.Beta2), float32(1-o.Beta2)
	decay := float32(1 - lr*o.WeightDecay)
	bc1 := 1 - math.Pow(o.Beta1, float64(o.Step))
	bc2sqrt := float32(math.Sqrt(1 - math.Pow(o.Beta2, float64(o.Step))))
	stepSize := float32(lr / bc1)
	eps := float32(o.Eps)
	for i, p := range params {
		m, v := o.M[i], o.V[i]
		if len(m) != len(p.Data) {
			return fmt.Errorf("adamw: parameter %s has %d elements, state %d", p.Name, len(p.Data), len(m))
		}
		for j, g := range p.Grad {
			p.Data[j] *= decay
			m[j] += c1 * (g - m[j])
			v[j] = v[j]*b2 + c2*(g*g)
			denom := float32(math.Sqrt(float64(v[j])))/bc2sqrt + eps
			p.Data[j] -= stepSize * (m[j] / denom)
		}
	}
	return nil
}

// GradNorm is the global L2 norm of all gradients.
func GradNorm(params []Param) float64 {
	var ss float64
	for _, p := range params {
		for _, g := range p.Grad {
			ss += float64(g) * float64(g)
		}
	}
	return math.Sqrt(ss)
}

// ClipGradNorm scales all gradients by max/(norm + 1e-6) when that is below
// one, as torch.nn.utils.clip_grad_norm_ does, and returns the norm before
// clipping. A non-finite norm is returned unchanged and nothing is scaled.
func ClipGradNorm(params []Param, maxNorm float64) float64 {
	norm := GradNorm(params)
	if maxNorm <= 0 || math.IsNaN(norm) || math.IsInf(norm, 0) {
		return norm
	}
	coef := maxNorm / (norm + 1e-6)
	if coef >= 1 {
		return norm
	}
	c := float32(coef)
	for _, p := range params {
		for j := range p.Grad {
			p.Grad[j] *= c
		}
	}
	return norm
}

// Schedule names a learning-rate schedule.
type Schedule string

const (
	ScheduleConstant Schedule = "constant"
	ScheduleLinear   Schedule = "linear"
	ScheduleCosine   Schedule = "cosine"
)

// LRFactor is the multiplier of the base learning rate at optimizer step
// `step` (counted from 0) of `total`, following transformers'
// get_constant_schedule_with_warmup, get_linear_schedule_with_warmup and
// get_cosine_schedule_with_warmup (half a cycle): a linear warmup from 0
// over `warmup` steps, then constant, linear decay to 0, or cosine decay.
func LRFactor(s Schedule, step, warmup, total int) (float64, error) {
	if step < warmup {
		return float64(step) / float64(max(1, warmup)), nil
	}
	switch s {
	case ScheduleConstant, "":
		return 1, nil
	case ScheduleLinear:
		return max(0, float64(total-step)/float64(max(1, total-warmup))), nil
	case ScheduleCosine:
		progress := float64(step-warmup) / float64(max(1, total-warmup))
		return max(0, 0.5*(1+math.Cos(math.Pi*progress))), nil
	}
	return 0, fmt.Errorf("unknown schedule %q (constant, linear, cosine)", s)
}

// ResolveOptimizer maps an optimizer name as transformers' TrainingArguments
// spells it to the one this backend runs. Every AdamW variant runs as
// 32-bit AdamW: the 8-bit and paged variants of bitsandbytes only save
// memory, and on the CPU backend 32-bit state is both exact and small. note
// says so when the mapping changes what was asked for.
func ResolveOptimizer(name string) (resolved, note string, err error) {
	switch name {
	case "", "adamw", "adamw_torch", "adamw_torch_fused", "adamw_hf":
		return "adamw", "", nil
	case "paged_adamw_8bit", "adamw_8bit", "adamw_bnb_8bit", "paged_adamw_32bit", "paged_adamw":
		return "adamw", name + " runs as 32-bit AdamW (same update rule, full-precision state)", nil
	}
	return "", "", fmt.Errorf("optimizer %q is not supported (adamw, adamw_torch, paged_adamw_8bit, adamw_8bit, paged_adamw_32bit)", name)
}
