package trainer

import (
	"context"
	"fmt"
)

// cpuBackend is the reference backend: the model in float32 on the host,
// every operation one plain function of ops.go.
type cpuBackend struct{}

func (cpuBackend) Name() string  { return "cpu" }
func (cpuBackend) Usable() error { return nil }

func (cpuBackend) Open(_ context.Context, cfg SessionConfig) (Session, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	m, err := LoadModel(cfg.Model)
	if err != nil {
		return nil, err
	}
	if cfg.Quantize == "nf4" {
		if err := m.QuantizeBase(); err != nil {
			return nil, err
		}
	}
	return NewCPUSession(m, cfg)
}

// cpuSession trains an adapter on a Model held in host memory.
type cpuSession struct {
	m   *Model
	cfg SessionConfig
	a   *Adapter
	opt optimizer
}

// NewCPUSession opens a CPU session on a model already in memory (already
// quantised if cfg.Quantize says nf4: the session uses m's weights as they
// are). The adapter starts at PEFT's initialisation with seed 0 until
// SetState replaces it.
func NewCPUSession(m *Model, cfg SessionConfig) (Session, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	a, err := NewAdapter(m.Config, cfg.LoRA, 0)
	if err != nil {
		return nil, err
	}
	opt, err := newOptimizer(cfg.Optimizer, a.Params())
	if err != nil {
		return nil, err
	}
	return &cpuSession{m: m, cfg: cfg, a: a, opt: opt}, nil
}

func (s *cpuSession) Model() *ModelInfo     { return &s.m.ModelInfo }
func (s *cpuSession) Config() SessionConfig { return s.cfg }
func (s *cpuSession) Backend() string       { return "cpu" }
func (s *cpuSession) PeakMemory() int64     { return 0 }
func (s *cpuSession) Close() error          { return nil }

func (s *cpuSession) SetState(a *Adapter, opt *OptimizerState) error {
	dst, src := s.a.Params(), a.Params()
	if len(dst) != len(src) {
		return fmt.Errorf("adapter has %d tensors, the session %d", len(src), len(dst))
	}
	for i := range dst {
		if len(dst[i].Data) != len(src[i].Data) {
			return fmt.Errorf("adapter tensor %s has %d elements, the session's %d", src[i].Name, len(src[i].Data), len(dst[i].Data))
		}
		copy(dst[i].Data, src[i].Data)
	}
	s.a.ZeroGrad()
	return s.opt.SetState(opt, dst)
}

func (s *cpuSession) State() (*Adapter, *OptimizerState, error) {
	return s.a.Clone(), s.opt.State(), nil
}

func (s *cpuSession) Grads() (*Adapter, error) {
	g := s.a.Clone()
	for li, mods := range s.a.Layers {
		for m, w := range mods {
			copy(g.Layers[li][m].A, w.GradA)
			copy(g.Layers[li][m].B, w.GradB)
		}
	}
	return g, nil
}

func (s *cpuSession) LossAndGrad(b *Batch, normalizer float64, dropoutSeed uint64) (float64, int, error) {
	return s.m.lossAndGrad(s.a, b, normalizer, dropoutSeed, s.cfg.GradientCheckpointing)
}

func (s *cpuSession) Loss(b *Batch) (float64, int, error) { return s.m.Loss(s.a, b) }

func (s *cpuSession) Step(lr, maxGradNorm float64) (float64, error) {
	params := s.a.Params()
	norm := ClipGradNorm(params, maxGradNorm)
	if err := s.opt.Update(params, lr); err != nil {
		return 0, err
	}
	s.a.ZeroGrad()
	return norm, nil
}
