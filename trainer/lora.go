package trainer

import (
	"fmt"
	"math"
	"math/rand/v2"
	"sort"
)

// LoRAConfig is the adapter's shape: rank, alpha (the update is scaled by
// alpha / r), dropout on the adapter's input, and the projections adapted.
type LoRAConfig struct {
	R       int
	Alpha   float64
	Dropout float64
	Targets []Module
	// RSLoRA scales the update by alpha / √r (rank-stabilised LoRA, PEFT's
	// use_rslora), so that a higher rank does not shrink it. Left out of
	// the JSON when false: a run's resume fingerprint marshals the config,
	// and checkpoints written before the option must still resume.
	RSLoRA bool `json:",omitempty"`
}

// Scale is alpha / r, or alpha / √r with RSLoRA, computed in float64 as
// PEFT computes its scaling.
func (c LoRAConfig) Scale() float32 {
	if c.RSLoRA {
		return float32(c.Alpha / math.Sqrt(float64(c.R)))
	}
	return float32(c.Alpha / float64(c.R))
}

// Validate checks the settings.
func (c LoRAConfig) Validate() error {
	if c.R <= 0 || c.R > 1<<16 {
		return fmt.Errorf("lora: r = %d must be in [1, 65536]", c.R)
	}
	if c.Alpha <= 0 {
		return fmt.Errorf("lora: alpha = %v must be positive", c.Alpha)
	}
	if c.Dropout < 0 || c.Dropout >= 1 {
		return fmt.Errorf("lora: dropout = %v must be in [0, 1)", c.Dropout)
	}
	if len(c.Targets) == 0 {
		return fmt.Errorf("lora: no target modules")
	}
	seen := map[Module]bool{}
	for _, m := range c.Targets {
		if _, err := ParseModule(string(m)); err != nil {
			return fmt.Errorf("lora: %w", err)
		}
		if seen[m] {
			return fmt.Errorf("lora: target module %s listed twice", m)
		}
		seen[m] = true
	}
	return nil
}

// LoRAWeights is one adapted projection: ΔW = scale · B·A with A [R×In]
// and B [Out×R], and their gradients.
type LoRAWeights struct {
	R, In, Out int
	A, B       []float32
	GradA      []float32
	GradB      []float32
}

// Adapter holds the LoRA weights of every adapted projection.
type Adapter struct {
	Config LoRAConfig
	Layers []map[Module]*LoRAWeights
}

// NewAdapter creates an adapter for cfg with PEFT's initialisation: A
// Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)), and B
// zero, drawn deterministically from seed.
func NewAdapter(cfg *Config, lc LoRAConfig, seed uint64) (*Adapter, error) {
	if err := lc.Validate(); err != nil {
		return nil, err
	}
	a := &Adapter{Config: lc, Layers: make([]map[Module]*LoRAWeights, cfg.Layers)}
	for li := range a.Layers {
		a.Layers[li] = map[Module]*LoRAWeights{}
		for _, m := range lc.Targets {
			out, in := cfg.ProjShape(m)
			w := &LoRAWeights{R: lc.R, In: in, Out: out,
				A: make([]float32, lc.R*in), B: make([]float32, out*lc.R),
				GradA: make([]float32, lc.R*in), GradB: make([]float32, out*lc.R)}
			rng := rand.New(rand.NewPCG(seed, uint64(li)<<8|uint64(moduleIndex(m))))
			bound := 1 / math.Sqrt(float64(in))
			for i := range w.A {
				w.A[i] = float32((2*rng.Float64() - 1) * bound)
			}
			a.Layers[li][m] = w
		}
	}
	return a, nil
}

func moduleIndex(m Module) int {
	for i, x := range AllModules {
		if x == m {
			return i
		}
	}
	return -1
}

// Param is one trainable tensor with its gradient and a stable name.
type Param struct {
	Name string
	Data []float32
	Grad []float32
}

// Params lists the trainable tensors in a fixed order (layer, module in
// block order, A then B), which the optimizer state follows.
func (a *Adapter) Params() []Param {
	var ps []Param
	for li, mods := range a.Layers {
		for _, m := range AllModules {
			w, ok := mods[m]
			if !ok {
				continue
			}
			base := fmt.Sprintf("layers.%d.%s.%s", li, m.parent(), m)
			ps = append(ps, Param{base + ".lora_A", w.A, w.GradA}, Param{base + ".lora_B", w.B, w.GradB})
		}
	}
	return ps
}

// ZeroGrad clears every gradient.
func (a *Adapter) ZeroGrad() {
	for _, p := range a.Params() {
		clear(p.Grad)
	}
}

// sortedModules returns the adapter's targets in block order.
func (c LoRAConfig) sortedModules() []Module {
	ms := append([]Module(nil), c.Targets...)
	sort.Slice(ms, func(i, j int) bool { return moduleIndex(ms[i]) < moduleIndex(ms[j]) })
	return ms
}

// Clone returns a deep copy of the adapter's weights (gradients zeroed).
func (a *Adapter) Clone() *Adapter {
	c := &Adapter{Config: a.Config, Layers: make([]map[Module]*LoRAWeights, len(a.Layers))}
	for li, mods := range a.Layers {
		c.Layers[li] = map[Module]*LoRAWeights{}
		for m, w := range mods {
			c.Layers[li][m] = &LoRAWeights{R: w.R, In: w.In, Out: w.Out,
				A: append([]float32(nil), w.A...), B: append([]float32(nil), w.B...),
				GradA: make([]float32, len(w.GradA)), GradB: make([]float32, len(w.GradB))}
		}
	}
	return c
}
