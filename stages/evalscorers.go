package stages

import (
	"context"
	"fmt"

	"gemmaft/eval"
	"gemmaft/trainer"
)

// The eval stage scores the base model, then the adapter on the base it
// was trained against, on the CPU reference or on the GPU.
type scorers interface {
	// open returns the scorer of which ("base" or "adapter"), releasing
	// the one before.
	open(which string, progress func(done, total int)) (eval.Scorer, error)
	close()
}

// resolveDevice resolves the backend parameter of a stage that runs a
// model without training it (eval, generate): auto becomes cuda or cpu,
// and cpu is kept as "", so that specs without the parameter keep their
// keys.
func resolveDevice(backend *string) error {
	if *backend == "" {
		return nil
	}
	b, _, err := trainer.ResolveBackend(*backend)
	if err != nil {
		return err
	}
	*backend = b.Name()
	if *backend == "cpu" {
		*backend = ""
	}
	return nil
}

// adapterFitError: the adapter does not fit the base (its shapes, its
// projections), as err says.
type adapterFitError struct{ err error }

func (e *adapterFitError) Error() string { return e.err.Error() }
func (e *adapterFitError) Unwrap() error { return e.err }

func openScorers(ctx context.Context, p *evalParams, base, adapterDir string, nf4 bool) (scorers, error) {
	if p.Backend == "cuda" {
		ck, err := trainer.OpenCheckpoint(base)
		if err != nil {
			return nil, err
		}
		a, err := ck.ModelInfo.LoadAdapter(adapterDir)
		if err != nil {
			return nil, &adapterFitError{err}
		}
		return &gpuScorers{ctx: ctx, base: base, cfg: ck.Config, adapter: a, nf4: nf4, tokens: p.BatchTokens}, nil
	}
	m, err := trainer.LoadModel(base)
	if err != nil {
		return nil, err
	}
	a, err := m.LoadAdapter(adapterDir)
	if err != nil {
		return nil, &adapterFitError{err}
	}
	return &cpuScorers{m: m, adapter: a, nf4: nf4, tokens: p.BatchTokens}, nil
}

// cpuScorers score on one CPU model: as stored for the base, through the
// NF4 round trip (when the adapter trained on it) with the adapter.
type cpuScorers struct {
	m       *trainer.Model
	adapter *trainer.Adapter
	nf4     bool
	tokens  int
}

func (c *cpuScorers) open(which string, progress func(int, int)) (eval.Scorer, error) {
	s := &eval.ModelScorer{Model: c.m, BatchTokens: c.tokens, Progress: progress}
	if which == "adapter" {
		s.Adapter = c.adapter
		if c.nf4 {
			if err := c.m.QuantizeBase(); err != nil {
				return nil, err
			}
		}
	}
	return s, nil
}

func (c *cpuScorers) close() {}

// gpuScorers score on GPU sessions, one at a time: the base as stored
// (with a LoRA whose B is zero, which adds nothing), then the NF4 (or
// stored) base with the adapter.
type gpuScorers struct {
	ctx     context.Context
	base    string
	cfg     *trainer.Config
	adapter *trainer.Adapter
	nf4     bool
	tokens  int
	sess    trainer.Session
}

func (g *gpuScorers) open(which string, progress func(int, int)) (eval.Scorer, error) {
	g.close()
	quantize, state := "none", g.adapter
	if which == "base" {
		zero, err := trainer.NewAdapter(g.cfg, g.adapter.Config, 0)
		if err != nil {
			return nil, err
		}
		state = zero
	} else if g.nf4 {
		quantize = "nf4"
	}
	s, err := trainer.OpenSession(g.ctx, "cuda", trainer.SessionConfig{Model: g.base, Quantize: quantize,
		LoRA: g.adapter.Config, GradientCheckpointing: true, Inference: true, MaxTokens: g.tokens})
	if err != nil {
		return nil, fmt.Errorf("opening %s on the GPU: %w", g.base, err)
	}
	g.sess = s
	if err := s.SetState(state, nil); err != nil {
		return nil, err
	}
	ls, ok := s.(trainer.LogitSession)
	if !ok {
		return nil, fmt.Errorf("backend %s does not return logits", s.Backend())
	}
	return &eval.SessionScorer{Session: ls, MaxTokens: g.tokens, Progress: progress}, nil
}

func (g *gpuScorers) close() {
	if g.sess != nil {
		g.sess.Close()
		g.sess = nil
	}
}
