package trainer

import (
	"math"
	"math/rand/v2"
	"testing"
)

// tinyConfig is a small shape that still has every feature: a global layer
// (7 layers), GQA, a window shorter than the examples, linear rope scaling
// and query_pre_attn_scalar different from head_dim.
func tinyConfig() *Config {
	c, _ := Preset("tiny")
	c.VocabSize, c.Hidden, c.Intermediate, c.Layers = 97, 32, 48, 7
	c.Heads, c.KVHeads, c.HeadDim, c.QueryPreAttnScalar, c.SlidingWindow = 4, 2, 8, 12, 3
	c.DType = "float32"
	c.Rope[FullAttention] = Rope{Theta: 1e6, Type: "linear", Factor: 2}
	c.LayerTypes = nil
	for i := 0; i < c.Layers; i++ {
		lt := SlidingAttention
		if (i+1)%6 == 0 {
			lt = FullAttention
		}
		c.LayerTypes = append(c.LayerTypes, lt)
	}
	return c
}

func tinyModel(t testing.TB, c *Config) *Model {
	t.Helper()
	dir := t.TempDir()
	if err := WriteRandomCheckpoint(dir, c, InitOptions{Seed: 7, Std: 0.2, NormStd: 0.5}); err != nil {
		t.Fatal(err)
	}
	m, err := LoadModel(dir)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func tinyBatch(t testing.TB, vocab int, seed uint64) *Batch {
	rng := rand.New(rand.NewPCG(seed, 1))
	row := func(n int, lens ...int32) PackedRow {
		r := PackedRow{SeqLengths: lens}
		used := 0
		for _, l := range lens {
			for j := 0; j < int(l); j++ {
				r.InputIDs = append(r.InputIDs, int32(rng.IntN(vocab)))
				lab := int32(rng.IntN(vocab))
				if j == 0 || j < int(l)/3 {
					lab = IgnoreIndex
				}
				r.Labels = append(r.Labels, lab)
				r.PositionIDs = append(r.PositionIDs, int32(j))
			}
			used += int(l)
		}
		for ; used < n; used++ {
			r.InputIDs = append(r.InputIDs, 0)
			r.Labels = append(r.Labels, IgnoreIndex)
			r.PositionIDs = append(r.PositionIDs, 0)
		}
		return r
	}
	b, err := NewBatch([]PackedRow{row(12, 5, 4), row(12, 12)})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func randomizeB(a *Adapter, seed uint64) {
	rng := rand.New(rand.NewPCG(seed, 2))
	for _, p := range a.Params() {
		for i := range p.Data {
			if len(p.Name) > 6 && p.Name[len(p.Name)-6:] == "lora_B" {
				p.Data[i] = float32(rng.NormFloat64() * 0.1)
			}
		}
	}
}

// TestGradientFiniteDifferences checks every LoRA gradient tensor against
// a central difference of the loss along a random direction.
func TestGradientFiniteDifferences(t *testing.T) {
	c := tinyConfig()
	m := tinyModel(t, c)
	a, err := NewAdapter(c, LoRAConfig{R: 2, Alpha: 4, Targets: AllModules}, 3)
	if err != nil {
		t.Fatal(err)
	}
	randomizeB(a, 5)
	b := tinyBatch(t, c.VocabSize, 11)
	n := float64(b.Trained())
	sum, _, err := m.LossAndGrad(a, b, n, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("loss %.6f over %v tokens", sum/n, n)
	rng := rand.New(rand.NewPCG(9, 9))
	lossAt := func() float64 {
		s, _, err := m.Loss(a, b)
		if err != nil {
			t.Fatal(err)
		}
		return s / n
	}
	for _, p := range a.Params() {
		u := make([]float32, len(p.Data))
		var want float64
		for i := range u {
			u[i] = float32(rng.NormFloat64())
			want += float64(u[i]) * float64(p.Grad[i])
		}
		orig := append([]float32(nil), p.Data...)
		// Richardson extrapolation of two central differences cancels the
		// eps² error term, leaving float32 rounding as the only noise.
		diff := func(eps float32) float64 {
			for i := range p.Data {
				p.Data[i] = orig[i] + eps*u[i]
			}
			lp := lossAt()
			for i := range p.Data {
				p.Data[i] = orig[i] - eps*u[i]
			}
			lm := lossAt()
			copy(p.Data, orig)
			return (lp - lm) / (2 * float64(eps))
		}
		got := (4*diff(5e-3) - diff(1e-2)) / 3
		if math.Abs(got-want) > 1e-3*math.Abs(want)+2e-4 {
			t.Errorf("%s: directional derivative %.6g by differences, %.6g by backward", p.Name, got, want)
		}
	}
}
