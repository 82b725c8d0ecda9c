package trainer

import (
	"context"
	"fmt"
)

// Decoder is a model loaded for decoding: a base checkpoint, as stored or
// through the NF4 round trip QLoRA trains against, with or without a LoRA
// adapter. The chat command and the generate stage drive a Decoder and
// nothing else, so another device can serve them by implementing it; the
// CPU reference (OpenDecoder) is the one there is.
type Decoder interface {
	// Info describes the loaded checkpoint; Info().Config.MaxPositions is
	// the context a prompt and its answer must fit in.
	Info() *ModelInfo
	// Generate continues each prompt (token ids, <bos> included) as
	// Model.Generate does.
	Generate(ctx context.Context, prompts [][]int32, o GenerateOptions, emit func(seq int, tok int32)) ([][]int32, error)
	// Close releases the model.
	Close() error
}

// DecoderConfig says what a Decoder loads.
type DecoderConfig struct {
	// Model is a Hugging Face Gemma 3 checkpoint folder.
	Model string
	// Adapter is a PEFT LoRA adapter folder made for Model; empty decodes
	// with the base alone.
	Adapter string
	// Quantize is "nf4" (the projections through NF4 and back, the base a
	// QLoRA adapter learned to correct) or "none" (as stored; "" too).
	Quantize string
	// Backend decodes on the CPU reference ("" or cpu, in float32), on the
	// GPU (cuda, in bf16), or on the GPU when one is usable (auto).
	Backend string
}

// DecoderBackend is a Backend that decodes as well as trains.
type DecoderBackend interface {
	OpenDecoder(ctx context.Context, cfg DecoderConfig) (Decoder, error)
}

// Validate checks the settings.
func (c DecoderConfig) Validate() error {
	if c.Model == "" {
		return fmt.Errorf("no model folder")
	}
	switch c.Quantize {
	case "", "none", "nf4":
	default:
		return fmt.Errorf("quantize %q: use nf4 or none", c.Quantize)
	}
	switch c.Backend {
	case "", "cpu", "cuda", "auto":
	default:
		return fmt.Errorf("backend %q: use cpu, cuda or auto", c.Backend)
	}
	return nil
}

// OpenDecoder loads a model for decoding on cfg.Backend: the CPU reference
// in float32 by default. An adapter whose tensors do not fit the
// checkpoint (another size or architecture) is an error.
func OpenDecoder(cfg DecoderConfig) (Decoder, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.Adapter != "" {
		if err := CheckAdapterDir(cfg.Adapter); err != nil { // before the base loads
			return nil, err
		}
	}
	if cfg.Backend != "" && cfg.Backend != "cpu" {
		b, _, err := ResolveBackend(cfg.Backend)
		if err != nil {
			return nil, err
		}
		if b.Name() != "cpu" {
			db, ok := b.(DecoderBackend)
			if !ok {
				return nil, fmt.Errorf("backend %s does not decode", b.Name())
			}
			return db.OpenDecoder(context.Background(), cfg)
		}
	}
	ck, err := OpenCheckpoint(cfg.Model)
	if err != nil {
		return nil, err
	}
	d := &cpuDecoder{}
	if cfg.Adapter != "" { // read and checked before the weights, which take minutes at 12B
		if d.a, err = ck.LoadAdapter(cfg.Adapter); err != nil {
			return nil, fmt.Errorf("adapter for %s: %w", cfg.Model, err)
		}
	}
	if d.m, err = ck.Load(); err != nil {
		return nil, err
	}
	if cfg.Quantize == "nf4" {
		if err := d.m.QuantizeBase(); err != nil {
			return nil, fmt.Errorf("%s: quantising to NF4: %w", cfg.Model, err)
		}
	}
	return d, nil
}

type cpuDecoder struct {
	m *Model
	a *Adapter
}

func (d *cpuDecoder) Info() *ModelInfo { return &d.m.ModelInfo }
func (d *cpuDecoder) Close() error     { d.m, d.a = nil, nil; return nil }

func (d *cpuDecoder) Generate(ctx context.Context, prompts [][]int32, o GenerateOptions, emit func(seq int, tok int32)) ([][]int32, error) {
	if d.m == nil {
		return nil, fmt.Errorf("decoder is closed")
	}
	return d.m.Generate(ctx, d.a, prompts, o, emit)
}
