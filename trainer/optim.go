package trainer

import (
	"fmt"
	"math"
	"strings"

	"gemmaft/trainer/safetensors"
)

// optimizer is an update rule over the adapter's parameters with state it
// can hand to a checkpoint and take back.
type optimizer interface {
	// Update applies one step with learning rate lr to params (in the
	// order the state was created with) from their gradients.
	Update(params []Param, lr float64) error
	State() *OptimizerState
	SetState(s *OptimizerState, params []Param) error
}

// newOptimizer creates the optimizer cfg names for params.
func newOptimizer(cfg OptimizerConfig, params []Param) (optimizer, error) {
	switch cfg.Name {
	case "adamw":
		return NewAdamW(params, cfg.Beta1, cfg.Beta2, cfg.Eps, cfg.WeightDecay), nil
	case "adamw_8bit":
		return NewAdamW8bit(params, cfg.Beta1, cfg.Beta2, cfg.Eps, cfg.WeightDecay), nil
	}
	return nil, fmt.Errorf("optimizer %q: use adamw or adamw_8bit", cfg.Name)
}

// AdamW is torch.optim.AdamW: Adam with decoupled weight decay, applied to
// float32 parameters with float32 moments in torch's order of operations.
type AdamW struct {
	Beta1, Beta2, Eps, WeightDecay float64
	Step                           int         // optimizer steps taken
	M, V                           [][]float32 // first and second moments per parameter
	names                          []string
}

// NewAdamW creates the optimizer state for params.
func NewAdamW(params []Param, beta1, beta2, eps, weightDecay float64) *AdamW {
	o := &AdamW{Beta1: beta1, Beta2: beta2, Eps: eps, WeightDecay: weightDecay}
	for _, p := range params {
		o.M = append(o.M, make([]float32, len(p.Data)))
		o.V = append(o.V, make([]float32, len(p.Data)))
		o.names = append(o.names, p.Name)
	}
	return o
}

// AdamWScalars are the per-step constants of torch's AdamW update, formed in
// float64 and rounded once, as torch turns its Python-float arguments into
// float32 scalars. The GPU kernel receives the same values.
type AdamWScalars struct {
	OneMinusBeta1, Beta2, OneMinusBeta2       float32
	Decay, StepSize, BiasCorrection2Sqrt, Eps float32
}

// AdamWStep returns the constants of update number step (counted from 1).
func AdamWStep(beta1, beta2, eps, weightDecay, lr float64, step int) AdamWScalars {
	return AdamWScalars{
		OneMinusBeta1: float32(1 - beta1), Beta2: float32(beta2), OneMinusBeta2: float32(1 - beta2),
		Decay:               float32(1 - lr*weightDecay),
		StepSize:            float32(lr / (1 - math.Pow(beta1, float64(step)))),
		BiasCorrection2Sqrt: float32(math.Sqrt(1 - math.Pow(beta2, float64(step)))),
		Eps:                 float32(eps),
	}
}

// Update applies one step with learning rate lr to params (in the order the
// state was created with) from their gradients.
func (o *AdamW) Update(params []Param, lr float64) error {
	if len(params) != len(o.M) {
		return fmt.Errorf("adamw: %d parameters, state for %d", len(params), len(o.M))
	}
	o.Step++
	k := AdamWStep(o.Beta1, o.Beta2, o.Eps, o.WeightDecay, lr, o.Step)
	for i, p := range params {
		m, v := o.M[i], o.V[i]
		if len(m) != len(p.Data) {
			return fmt.Errorf("adamw: parameter %s has %d elements, state %d", p.Name, len(p.Data), len(m))
		}
		for j, g := range p.Grad {
			p.Data[j] *= k.Decay
			m[j] += k.OneMinusBeta1 * (g - m[j])
			v[j] = v[j]*k.Beta2 + k.OneMinusBeta2*(g*g)
			denom := float32(math.Sqrt(float64(v[j])))/k.BiasCorrection2Sqrt + k.Eps
			p.Data[j] -= k.StepSize * (m[j] / denom)
		}
	}
	return nil
}

// State returns the moments as "<param>.exp_avg" and "<param>.exp_avg_sq".
func (o *AdamW) State() *OptimizerState {
	s := &OptimizerState{Name: "adamw", Step: o.Step}
	for i, name := range o.names {
		s.Tensors = append(s.Tensors, float32Tensor(name+".exp_avg", o.M[i]), float32Tensor(name+".exp_avg_sq", o.V[i]))
	}
	return s
}

// SetState restores moments saved by State; a zero state starts afresh.
func (o *AdamW) SetState(s *OptimizerState, params []Param) error {
	o.Step = 0
	for i := range o.M {
		clear(o.M[i])
		clear(o.V[i])
	}
	if s == nil || (s.Step == 0 && len(s.Tensors) == 0) {
		return nil
	}
	if s.Name != "adamw" {
		return fmt.Errorf("adamw: the saved optimizer state is %s's", s.Name)
	}
	for i, p := range params {
		for _, part := range []struct {
			suffix string
			dst    []float32
		}{{".exp_avg", o.M[i]}, {".exp_avg_sq", o.V[i]}} {
			if err := readStateTensor(s, p.Name+part.suffix, part.dst); err != nil {
				return err
			}
		}
	}
	o.Step = s.Step
	return nil
}

// float32Tensor encodes v as a one-dimensional F32 tensor.
func float32Tensor(name string, v []float32) safetensors.Tensor {
	b, _ := safetensors.EncodeFloat32(safetensors.F32, v)
	return safetensors.Tensor{Name: name, DType: safetensors.F32, Shape: []int{len(v)}, Data: b}
}

// readStateTensor decodes the named F32 tensor of s into dst, which it
// must fill exactly.
func readStateTensor(s *OptimizerState, name string, dst []float32) error {
	t, ok := s.tensor(name)
	if !ok {
		return fmt.Errorf("optimizer state: tensor %s missing", name)
	}
	if t.DType != safetensors.F32 {
		return fmt.Errorf("optimizer state: tensor %s is %s, want F32", name, t.DType)
	}
	v, err := safetensors.DecodeFloat32(t.DType, t.Data)
	if err != nil {
		return fmt.Errorf("optimizer state: tensor %s: %w", name, err)
	}
	if len(v) != len(dst) {
		return fmt.Errorf("optimizer state: tensor %s has %d elements, want %d", name, len(v), len(dst))
	}
	copy(dst, v)
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
// spells it to the update rule the backends run: "adamw" (torch's AdamW,
// float32 state) or "adamw_8bit" (bitsandbytes' blockwise 8-bit AdamW).
// The paged variants run the same update as their unpaged names: paging
// only lets bitsandbytes move state to host memory under pressure, and the
// state of a LoRA adapter is small (2 bytes a parameter in 8 bits). note
// says so when the name asks for paging.
func ResolveOptimizer(name string) (resolved, note string, err error) {
	switch name {
	case "", "adamw", "adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw_32bit", "paged_adamw_32bit", "paged_adamw":
		resolved = "adamw"
	case "adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit":
		resolved = "adamw_8bit"
	default:
		return "", "", fmt.Errorf("optimizer %q is not supported (adamw, adamw_torch, adamw_8bit, paged_adamw_8bit, paged_adamw_32bit)", name)
	}
	if strings.HasPrefix(name, "paged_") {
		note = name + " runs as " + resolved + " with its state in device memory (paging does not change the update)"
	}
	if name == "paged_adamw_32bit" {
		// bitsandbytes' 32-bit kernel folds the bias correction into
		// epsilon and decays after the step (AdamW8bit's rule).
		note += "; torch's AdamW rule, not bitsandbytes' 32-bit one, which differs where gradients come near epsilon or with weight decay"
	}
	return resolved, note, nil
}
