package stages

import (
	"context"
	"fmt"

	"gemmaft/pipeline"
	"gemmaft/trainer"
)

const modelKindName = "model"

func init() { kinds[modelKindName] = modelKind{} }

// modelKind writes a randomly initialised Gemma 3 checkpoint of a released
// shape, in Hugging Face's layout: for tests, the demo and benchmarks, where
// the real weights (the user's download) are not at hand.
type modelKind struct{}

type modelParams struct {
	// Preset is the shape: tiny, 1b, 4b, 12b or 27b.
	Preset string `json:"preset"`
	Seed   uint64 `json:"seed"`
	// DType is the stored dtype: bfloat16, float16 or float32.
	DType string `json:"dtype"`
	// Std is the standard deviation of the embeddings and projections
	// (transformers uses 0.02). A tiny model learns visibly only with larger
	// embeddings: its logits are bounded by sqrt(hidden) times their norm.
	Std float64 `json:"std"`
}

func (modelKind) Version() int       { return 1 }
func (modelKind) Inputs() (int, int) { return 0, 0 }
func (modelKind) Params() any        { return &modelParams{Preset: "tiny", DType: "bfloat16", Std: 0.02} }

func (p *modelParams) Validate() error {
	if _, err := trainer.Preset(p.Preset); err != nil {
		return &pipeline.ParamError{Param: "preset", Msg: fmt.Sprintf("unknown shape %q", p.Preset), Fix: "use tiny, 1b, 4b, 12b or 27b"}
	}
	if !(p.Std > 0) {
		return &pipeline.ParamError{Param: "std", Msg: "must be positive", Fix: "0.02 is the usual initialisation"}
	}
	switch p.DType {
	case "bfloat16", "float16", "float32":
	default:
		return &pipeline.ParamError{Param: "dtype", Msg: fmt.Sprintf("unknown dtype %q", p.DType), Fix: "use bfloat16, float16 or float32"}
	}
	return nil
}

func (modelKind) Prepare(params any, _ string) (pipeline.Runner, error) {
	return modelStage{p: params.(*modelParams)}, nil
}

type modelStage struct{ p *modelParams }

func (modelStage) Files() []string { return nil }

func (s modelStage) Run(ctx context.Context, t *pipeline.Task) error {
	cfg, err := trainer.Preset(s.p.Preset)
	if err != nil {
		return err
	}
	if err := trainer.WriteRandomCheckpoint(t.Dir, cfg, trainer.InitOptions{Seed: s.p.Seed, DType: s.p.DType, Std: s.p.Std}); err != nil {
		return err
	}
	t.SetStat("preset", s.p.Preset)
	t.SetStat("layers", cfg.Layers)
	t.SetStat("hidden", cfg.Hidden)
	t.SetStat("vocab", cfg.VocabSize)
	return nil
}
