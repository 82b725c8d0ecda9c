package gpu

import (
	"context"
	"math"
	"math/rand/v2"
	"testing"

	"gemmaft/cuda/cudatest"
	"gemmaft/eval"
	"gemmaft/trainer"
)

// TestPositionLogits: the logits the GPU hands over, and the
// log-likelihoods eval.SessionScorer makes of them, are the CPU
// reference's: within 1e-4 in the float32 test mode, 2e-2 in bf16 (the
// relative size of a bf16 forward pass's rounding at these depths).
func TestPositionLogits(t *testing.T) {
	cudatest.Device(t)
	sc, _ := demoOptions()
	sc.Model = demoModel(t)
	sc.MaxTokens = 512
	m, err := trainer.LoadModel(sc.Model)
	if err != nil {
		t.Fatal(err)
	}
	a, err := trainer.NewAdapter(m.Config, sc.LoRA, 5)
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(7, 7))
	for _, p := range a.Params() {
		for i := range p.Data {
			if p.Name[len(p.Name)-1] == 'B' {
				p.Data[i] = float32(rng.NormFloat64() * 0.02)
			}
		}
	}
	var reqs []eval.Request
	for q := 0; q < 12; q++ {
		ctx := []int32{2}
		for range 5 + rng.IntN(40) {
			ctx = append(ctx, int32(rng.IntN(m.Config.VocabSize)))
		}
		for c := 0; c < 4; c++ {
			reqs = append(reqs, eval.Request{Context: ctx, Continuation: []int32{int32(rng.IntN(m.Config.VocabSize)), int32(rng.IntN(1000))}})
		}
	}
	want, err := (&eval.ModelScorer{Model: m, Adapter: a}).LogLikelihoods(context.Background(), reqs)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		precision string
		tol       float64
	}{{"fp32", 1e-4}, {"bf16", 2e-2}} {
		t.Run(c.precision, func(t *testing.T) {
			cfg := sc
			cfg.Precision, cfg.Quantize = c.precision, "none"
			s, err := trainer.OpenSession(context.Background(), "cuda", cfg)
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			if err := s.SetState(a, nil); err != nil {
				t.Fatal(err)
			}
			got, err := (&eval.SessionScorer{Session: s.(trainer.LogitSession), MaxTokens: cfg.MaxTokens}).LogLikelihoods(context.Background(), reqs)
			if err != nil {
				t.Fatal(err)
			}
			worst := 0.0
			for i := range reqs {
				worst = math.Max(worst, math.Abs(got[i].LogLik-want[i].LogLik)/math.Max(1, math.Abs(want[i].LogLik)))
			}
			if worst > c.tol {
				t.Errorf("log-likelihoods differ from the CPU reference's by up to %.3g relative", worst)
			}
			t.Logf("%d requests: log-likelihoods within %.3g of the CPU reference", len(reqs), worst)
		})
	}
}
