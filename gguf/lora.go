package gguf

import (
	"context"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"

	"gemmaft/trainer"
)

// LoRAOptions configures Gemma3LoRA.
type LoRAOptions struct {
	// Type is the type of the adapter's matrices: f32 (the default, as
	// llama.cpp's convert_lora_to_gguf), f16 or bf16.
	Type FileType
	// Name is general.name (default: the adapter folder's name).
	Name string
}

// Gemma3LoRA writes the PEFT LoRA adapter in adapterDir, made for the
// Gemma 3 checkpoint in baseDir, as a GGUF LoRA adapter: the file
// llama.cpp applies to a GGUF of that base (llama-cli -m BASE.gguf --lora
// out) as convert_lora_to_gguf.py writes it, each projection's A and B
// under the base tensor's name with .lora_a and .lora_b. llama.cpp scales
// an update by adapter.lora.alpha / r; a rank-stabilised adapter (alpha /
// √r) is written with alpha·√r, which that tool leaves as alpha. The file
// appears only complete; a canceled ctx stops it between tensors.
func Gemma3LoRA(ctx context.Context, baseDir, adapterDir, out string, opts LoRAOptions) error {
	if _, err := os.Stat(out); err == nil {
		return fmt.Errorf("gguf: %s already exists", out)
	}
	switch opts.Type {
	case AllF32, MostlyF16, MostlyBF16:
	default:
		return fmt.Errorf("gguf: a LoRA adapter is written in f32, f16 or bf16, not %s", opts.Type)
	}
	ck, err := trainer.OpenCheckpoint(baseDir)
	if err != nil {
		return err
	}
	if err := llamaCppSupports(ck.Config); err != nil {
		return fmt.Errorf("gguf: %s: %w", baseDir, err)
	}
	a, err := ck.LoadAdapter(adapterDir)
	if err != nil {
		return fmt.Errorf("gguf: the adapter in %s: %w", adapterDir, err)
	}
	if opts.Name == "" {
		opts.Name = filepath.Base(filepath.Clean(adapterDir))
	}
	alpha := a.Config.Alpha
	if a.Config.RSLoRA {
		alpha *= math.Sqrt(float64(a.Config.R))
	}
	kvs := []KV{
		{"general.architecture", "gemma3"},
		{"general.type", "adapter"},
		{"general.name", opts.Name},
		{"general.file_type", uint32(opts.Type)},
		{"adapter.type", "lora"},
		{"adapter.lora.alpha", float32(alpha)},
	}
	typ := opts.Type.base()
	var tensors []Tensor
	for li, mods := range a.Layers {
		for _, m := range trainer.AllModules {
			w, ok := mods[m]
			if !ok {
				continue
			}
			name, err := tensorName(trainer.WeightTensor{Role: string(m), Layer: li})
			if err != nil {
				return err
			}
			for _, part := range []struct {
				suffix string
				shape  []int
				data   []float32
			}{{".lora_a", []int{w.R, w.In}, w.A}, {".lora_b", []int{w.Out, w.R}, w.B}} {
				tensors = append(tensors, Tensor{Name: name + part.suffix, Shape: part.shape, Type: typ,
					Write: func(wr io.Writer) error {
						if err := ctx.Err(); err != nil {
							return err
						}
						b, err := Encode(nil, typ, part.data)
						if err != nil {
							return err
						}
						_, err = wr.Write(b)
						return err
					}})
			}
		}
	}
	return WriteFile(out, kvs, tensors)
}
