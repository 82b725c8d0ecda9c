package trainer

import (
	"fmt"
	"math"
	"sort"

	"gemmaft/trainer/safetensors"
)

// AdamW8bit is bitsandbytes' blockwise 8-bit AdamW (bnb.optim.AdamW8bit,
// the optimizer behind TRL's paged_adamw_8bit): each parameter's two
// moments are stored as one byte per element, an index into a dynamic
// code (signed for the first moment, unsigned for the second), with a
// float32 absolute maximum per block of 256 elements. An update decodes a
// block, applies Adam in float32, writes the parameter and re-encodes the
// moments against the block's new maxima. Parameters of fewer than 4096
// elements keep float32 moments (bitsandbytes' min_8bit_size) under the
// same update rule.
//
// The update rule is bitsandbytes', which differs from torch's AdamW in two
// places: epsilon is scaled by sqrt(1 - beta2^t) (the bias correction is
// folded into the step size), and weight decay multiplies the parameter
// after the Adam step instead of before. Moments are encoded to the nearest
// code value, breaking ties towards the lower index; bitsandbytes' search
// can differ from that in the last code step, so states are close to
// bitsandbytes' but not bit for bit. The GPU backend's kernel follows this
// code exactly.
type AdamW8bit struct {
	Beta1, Beta2, Eps, WeightDecay float64
	Step                           int
	params                         []adam8State
}

// Adam8BlockSize is the block of elements sharing one absmax; Adam8MinSize
// is the smallest parameter whose moments are stored in 8 bits.
const (
	Adam8BlockSize = 256
	Adam8MinSize   = 4096
)

// adam8State is one parameter's moments: Q1/Q2 with Absmax1/Absmax2 when
// quantised, M/V otherwise.
type adam8State struct {
	name             string
	n                int
	q1, q2           []uint8
	absmax1, absmax2 []float32
	m, v             []float32
}

func (s *adam8State) quantized() bool { return s.q1 != nil }

// NewAdamW8bit creates a fresh state for params.
func NewAdamW8bit(params []Param, beta1, beta2, eps, weightDecay float64) *AdamW8bit {
	o := &AdamW8bit{Beta1: beta1, Beta2: beta2, Eps: eps, WeightDecay: weightDecay}
	for _, p := range params {
		n := len(p.Data)
		s := adam8State{name: p.Name, n: n}
		if n >= Adam8MinSize {
			blocks := (n + Adam8BlockSize - 1) / Adam8BlockSize
			s.q1, s.q2 = make([]uint8, n), make([]uint8, n)
			s.absmax1, s.absmax2 = make([]float32, blocks), make([]float32, blocks)
		} else {
			s.m, s.v = make([]float32, n), make([]float32, n)
		}
		o.params = append(o.params, s)
	}
	return o
}

// Adam8Scalars are the per-step constants of the 8-bit update, formed in
// float64 and rounded once; the GPU kernel receives the same values.
type Adam8Scalars struct {
	Beta1, OneMinusBeta1, Beta2, OneMinusBeta2 float32
	// StepSize is -lr·sqrt(1 - beta2^t)/(1 - beta1^t); EpsScaled is
	// eps·sqrt(1 - beta2^t); Decay is 1 - lr·weight_decay.
	StepSize, EpsScaled, Decay float32
	WeightDecay                bool
}

// Adam8Step returns the constants of update number step (counted from 1).
func Adam8Step(beta1, beta2, eps, weightDecay, lr float64, step int) Adam8Scalars {
	c1 := 1 - math.Pow(beta1, float64(step))
	c2 := math.Sqrt(1 - math.Pow(beta2, float64(step)))
	return Adam8Scalars{
		Beta1: float32(beta1), OneMinusBeta1: float32(1 - beta1), Beta2: float32(beta2), OneMinusBeta2: float32(1 - beta2),
		StepSize: float32(-lr * c2 / c1), EpsScaled: float32(eps * c2), Decay: float32(1 - lr*weightDecay),
		WeightDecay: weightDecay > 0,
	}
}

// adam8Element is the update of one element: new moments and parameter.
func adam8Element(k *Adam8Scalars, p, g, m, v float32) (float32, float32, float32) {
	v = v*k.Beta2 + k.OneMinusBeta2*g*g
	m = m*k.Beta1 + k.OneMinusBeta1*g
	p += k.StepSize * (m / (float32(math.Sqrt(float64(v))) + k.EpsScaled))
	if k.WeightDecay {
		p *= k.Decay
	}
	return p, m, v
}

// Update applies one step with learning rate lr.
func (o *AdamW8bit) Update(params []Param, lr float64) error {
	if len(params) != len(o.params) {
		return fmt.Errorf("adamw_8bit: %d parameters, state for %d", len(params), len(o.params))
	}
	o.Step++
	k := Adam8Step(o.Beta1, o.Beta2, o.Eps, o.WeightDecay, lr, o.Step)
	for i, p := range params {
		s := &o.params[i]
		if len(p.Data) != s.n {
			return fmt.Errorf("adamw_8bit: parameter %s has %d elements, state %d", p.Name, len(p.Data), s.n)
		}
		if !s.quantized() {
			for j, g := range p.Grad {
				p.Data[j], s.m[j], s.v[j] = adam8Element(&k, p.Data[j], g, s.m[j], s.v[j])
			}
			continue
		}
		var m, v [Adam8BlockSize]float32
		for b := range s.absmax1 {
			lo, hi := b*Adam8BlockSize, min((b+1)*Adam8BlockSize, s.n)
			var max1, max2 float32
			for j := lo; j < hi; j++ {
				mj := dynamicCode[s.q1[j]] * s.absmax1[b]
				vj := unsignedDynamicCode[s.q2[j]] * s.absmax2[b]
				p.Data[j], m[j-lo], v[j-lo] = adam8Element(&k, p.Data[j], p.Grad[j], mj, vj)
				max1 = max(max1, float32(math.Abs(float64(m[j-lo]))))
				max2 = max(max2, float32(math.Abs(float64(v[j-lo]))))
			}
			s.absmax1[b], s.absmax2[b] = max1, max2
			for j := lo; j < hi; j++ {
				s.q1[j] = QuantizeMoment(&dynamicCode, m[j-lo], max1, true)
				s.q2[j] = QuantizeMoment(&unsignedDynamicCode, v[j-lo], max2, false)
			}
		}
	}
	return nil
}

// QuantizeMoment encodes x against a block maximum: the index of the code
// value nearest x/absmax (ties to the lower index). For the signed first
// moment the index moves one step when the nearest value has the wrong sign,
// as bitsandbytes does, so that a moment never flips sign; a zero absmax
// encodes to the code's zero.
func QuantizeMoment(code *[256]float32, x, absmax float32, signed bool) uint8 {
	if absmax == 0 {
		return uint8(sort.Search(256, func(i int) bool { return code[i] >= 0 }))
	}
	r := x / absmax
	hi := sort.Search(256, func(i int) bool { return code[i] >= r })
	var q int
	switch {
	case hi == 0:
		q = 0
	case hi == 256:
		q = 255
	case code[hi]-r < r-code[hi-1]:
		q = hi
	default:
		q = hi - 1
	}
	if signed && math.Signbit(float64(code[q])) != math.Signbit(float64(x)) {
		if x > 0 {
			q++
		} else {
			q--
		}
	}
	return uint8(q)
}

// State returns the moments: "<param>.state1" and ".state2" (U8) with
// ".absmax1" and ".absmax2" (F32) for quantised parameters,
// "<param>.exp_avg" and ".exp_avg_sq" (F32) for small ones.
func (o *AdamW8bit) State() *OptimizerState {
	st := &OptimizerState{Name: "adamw_8bit", Step: o.Step}
	for _, s := range o.params {
		if !s.quantized() {
			st.Tensors = append(st.Tensors, float32Tensor(s.name+".exp_avg", s.m), float32Tensor(s.name+".exp_avg_sq", s.v))
			continue
		}
		st.Tensors = append(st.Tensors,
			safetensors.Tensor{Name: s.name + ".state1", DType: safetensors.U8, Shape: []int{s.n}, Data: append([]byte(nil), s.q1...)},
			float32Tensor(s.name+".absmax1", s.absmax1),
			safetensors.Tensor{Name: s.name + ".state2", DType: safetensors.U8, Shape: []int{s.n}, Data: append([]byte(nil), s.q2...)},
			float32Tensor(s.name+".absmax2", s.absmax2))
	}
	return st
}

// SetState restores a state saved by State; a zero state starts afresh.
func (o *AdamW8bit) SetState(st *OptimizerState, params []Param) error {
	o.Step = 0
	for i := range o.params {
		s := &o.params[i]
		for _, b := range [][]uint8{s.q1, s.q2} {
			clear(b)
		}
		for _, f := range [][]float32{s.absmax1, s.absmax2, s.m, s.v} {
			clear(f)
		}
	}
	if st == nil || (st.Step == 0 && len(st.Tensors) == 0) {
		return nil
	}
	if st.Name != "adamw_8bit" {
		return fmt.Errorf("adamw_8bit: the saved optimizer state is %s's", st.Name)
	}
	for i := range o.params {
		s := &o.params[i]
		if !s.quantized() {
			if err := readStateTensor(st, s.name+".exp_avg", s.m); err != nil {
				return err
			}
			if err := readStateTensor(st, s.name+".exp_avg_sq", s.v); err != nil {
				return err
			}
			continue
		}
		for _, part := range []struct {
			name string
			dst  []uint8
		}{{".state1", s.q1}, {".state2", s.q2}} {
			t, ok := st.tensor(s.name + part.name)
			if !ok || t.DType != safetensors.U8 || len(t.Data) != len(part.dst) {
				return fmt.Errorf("optimizer state: tensor %s%s missing or not %d bytes of U8", s.name, part.name, len(part.dst))
			}
			copy(part.dst, t.Data)
		}
		if err := readStateTensor(st, s.name+".absmax1", s.absmax1); err != nil {
			return err
		}
		if err := readStateTensor(st, s.name+".absmax2", s.absmax2); err != nil {
			return err
		}
	}
	o.Step = st.Step
	return nil
}
