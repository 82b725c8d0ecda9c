package trainer

import (
	"math"
	"math/rand/v2"
	"testing"
)

// TestGradientCheckpointingChangesNothing: keeping every layer's
// activations and recomputing them give bit-identical losses and
// gradients.
func TestGradientCheckpointingChangesNothing(t *testing.T) {
	c := tinyConfig()
	m := tinyModel(t, c)
	b := tinyBatch(t, c.VocabSize, 3)
	grads := func(recompute bool) (float64, []Param) {
		a, _ := NewAdapter(c, LoRAConfig{R: 4, Alpha: 8, Dropout: 0.1, Targets: AllModules}, 1)
		randomizeB(a, 2)
		sum, _, err := m.lossAndGrad(a, b, float64(b.Trained()), 5, recompute)
		if err != nil {
			t.Fatal(err)
		}
		return sum, a.Params()
	}
	s1, p1 := grads(true)
	s2, p2 := grads(false)
	if s1 != s2 {
		t.Fatalf("loss %v with checkpointing, %v without", s1, s2)
	}
	for i := range p1 {
		for j := range p1[i].Grad {
			if p1[i].Grad[j] != p2[i].Grad[j] {
				t.Fatalf("%s grad[%d]: %v with checkpointing, %v without", p1[i].Name, j, p1[i].Grad[j], p2[i].Grad[j])
			}
		}
	}
}

// TestAdamW8bitFollowsFloatMoments runs the 8-bit optimizer and the same
// update with float64 moments side by side: the parameters stay close
// (quantised moments carry about 1% error), the small tensor that keeps
// float32 moments matches closely, and a saved state restores exactly.
func TestAdamW8bitFollowsFloatMoments(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	// big's last 8-bit block is partial; small keeps float32 moments.
	big := Param{Name: "big", Data: make([]float32, Adam8MinSize+100), Grad: make([]float32, Adam8MinSize+100)}
	small := Param{Name: "small", Data: make([]float32, 300), Grad: make([]float32, 300)}
	params := []Param{big, small}
	for _, p := range params {
		for i := range p.Data {
			p.Data[i] = float32(rng.NormFloat64() * 0.1)
		}
	}
	ref := make([][]float64, len(params))
	m, v := make([][]float64, len(params)), make([][]float64, len(params))
	for i, p := range params {
		ref[i] = make([]float64, len(p.Data))
		for j, x := range p.Data {
			ref[i][j] = float64(x)
		}
		m[i], v[i] = make([]float64, len(p.Data)), make([]float64, len(p.Data))
	}
	const b1, b2, eps, wd, lr = 0.9, 0.999, 1e-8, 0.01, 1e-3
	opt := NewAdamW8bit(params, b1, b2, eps, wd)
	var saved *OptimizerState
	for step := 1; step <= 20; step++ {
		for i, p := range params {
			for j := range p.Grad {
				p.Grad[j] = float32(rng.NormFloat64() * (1 + float64(j%7)))
				g := float64(p.Grad[j])
				m[i][j] = b1*m[i][j] + (1-b1)*g
				v[i][j] = b2*v[i][j] + (1-b2)*g*g
				c1, c2 := 1-math.Pow(b1, float64(step)), math.Sqrt(1-math.Pow(b2, float64(step)))
				ref[i][j] += -lr * c2 / c1 * m[i][j] / (math.Sqrt(v[i][j]) + eps*c2)
				ref[i][j] *= 1 - lr*wd
			}
		}
		if err := opt.Update(params, lr); err != nil {
			t.Fatal(err)
		}
		if step == 10 {
			saved = opt.State()
		}
	}
	for i, p := range params {
		var num, den float64
		start := make([]float64, len(p.Data))
		for j := range p.Data {
			d := float64(p.Data[j]) - ref[i][j]
			num += d * d
			den += (ref[i][j] - start[j]) * (ref[i][j] - start[j])
		}
		rel := math.Sqrt(num / den)
		limit := 1e-2
		if p.Name == "small" {
			limit = 1e-5
		}
		if rel > limit {
			t.Errorf("%s: parameters differ from float64 moments by %.3g relative", p.Name, rel)
		}
		t.Logf("%s: relative difference %.3g", p.Name, rel)
	}
	opt2 := NewAdamW8bit(params, b1, b2, eps, wd)
	if err := opt2.SetState(saved, params); err != nil {
		t.Fatal(err)
	}
	if opt2.Step != 10 {
		t.Fatalf("restored step %d", opt2.Step)
	}
	st := opt2.State()
	if len(st.Tensors) != len(saved.Tensors) {
		t.Fatalf("restored state has %d tensors, saved %d", len(st.Tensors), len(saved.Tensors))
	}
	for i := range st.Tensors {
		if string(st.Tensors[i].Data) != string(saved.Tensors[i].Data) {
			t.Errorf("tensor %s differs after a round trip", st.Tensors[i].Name)
		}
	}
}

// TestQuantizeMoment: nearest code value, never a flipped sign.
func TestQuantizeMoment(t *testing.T) {
	code := DynamicCode(true)
	ucode := DynamicCode(false)
	rng := rand.New(rand.NewPCG(3, 4))
	for i := 0; i < 10000; i++ {
		x := float32(rng.NormFloat64())
		absmax := float32(3)
		q := QuantizeMoment(&code, x, absmax, true)
		r := x / absmax
		if (code[q] < 0) != (x < 0) && code[q] != 0 {
			t.Fatalf("x %v encoded as %v: sign flipped", x, code[q])
		}
		best := 0
		for j := range code {
			if math.Abs(float64(code[j]-r)) < math.Abs(float64(code[best]-r)) {
				best = j
			}
		}
		if int(q) != best && math.Abs(float64(code[q]-r)) > math.Abs(float64(code[best]-r))+1e-7 && (code[best] < 0) == (x < 0) {
			t.Fatalf("x/absmax %v encoded as %v, nearest %v", r, code[q], code[best])
		}
		u := float32(math.Abs(float64(x)))
		uq := QuantizeMoment(&ucode, u, absmax, false)
		if ucode[uq] < 0 {
			t.Fatalf("unsigned code value %v", ucode[uq])
		}
	}
	if code[QuantizeMoment(&code, 1, 0, true)] != 0 {
		t.Error("a zero block maximum does not encode to zero")
	}
}
