package gguf

import (
	"context"
	"errors"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"gemmaft/internal/testenv"
	"gemmaft/tokenizer"
	"gemmaft/trainer"
)

// randomAdapter is a PEFT adapter for the checkpoint in dir, on every
// projection but gate, with B drawn too (PEFT starts it at zero, which
// would apply nothing), saved in a folder of its own.
func randomAdapter(t *testing.T, dir string, lc trainer.LoRAConfig) (*trainer.Adapter, string) {
	t.Helper()
	ck, err := trainer.OpenCheckpoint(dir)
	if err != nil {
		t.Fatal(err)
	}
	a, err := trainer.NewAdapter(ck.Config, lc, 5)
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(5, 6))
	for _, mods := range a.Layers {
		for _, m := range trainer.AllModules {
			if w, ok := mods[m]; ok {
				for i := range w.B {
					w.B[i] = float32(rng.NormFloat64() * 0.02)
				}
			}
		}
	}
	adir := filepath.Join(t.TempDir(), "adapter")
	if err := ck.SaveAdapter(adir, a, trainer.BaseModel{NameOrPath: dir}); err != nil {
		t.Fatal(err)
	}
	return a, adir
}

// TestLlamaCppLoRA: llama.cpp applies our GGUF LoRA adapter to the f32
// GGUF of its base and computes the logits our CPU reference computes with
// the PEFT adapter, within the f32 bound of TestLlamaCppLogits; the
// rank-stabilised adapter too, whose scale alpha / √r llama.cpp reads only
// as the alpha written for it. The adapters move the logits far more than
// the bound, so an adapter left out or scaled wrongly fails.
func TestLlamaCppLoRA(t *testing.T) {
	testenv.LlamaOracle(t)
	dir := checkpoint(t, "tiny")
	base := convert(t, dir, AllF32)
	tok, err := tokenizer.LoadFile(filepath.Join(dir, "tokenizer.json"))
	if err != nil {
		t.Fatal(err)
	}
	ps := prompts(t, tok, 24)
	m, err := trainer.LoadModel(dir)
	if err != nil {
		t.Fatal(err)
	}
	m.Config.DType = "float32" // llama.cpp scales embeddings in float32
	v := m.Config.VocabSize
	bound := math.Sqrt(7*float64(m.Config.Layers)) * activationRounding(AllF32)
	plain := referenceLogits(t, m, ps, nil)
	targets := []trainer.Module{trainer.QProj, trainer.KProj, trainer.VProj, trainer.OProj, trainer.UpProj, trainer.DownProj}
	for _, lc := range []trainer.LoRAConfig{{R: 8, Alpha: 16, Targets: targets}, {R: 8, Alpha: 16, Targets: targets, RSLoRA: true}} {
		name := "lora"
		if lc.RSLoRA {
			name = "rslora"
		}
		t.Run(name, func(t *testing.T) {
			a, adir := randomAdapter(t, dir, lc)
			out := filepath.Join(t.TempDir(), "adapter.gguf")
			if err := Gemma3LoRA(context.Background(), dir, adir, out, LoRAOptions{}); err != nil {
				t.Fatal(err)
			}
			got := llamaLogits(t, base, ps, v, out)
			rel, agree := relError(got, referenceLogits(t, m, ps, a), v)
			moved, _ := relError(plain, referenceLogits(t, m, ps, a), v)
			t.Logf("relative error %.3g (bound %.3g), same argmax %.0f%%; the adapter moves the logits by %.3g", rel, bound, 100*agree, moved)
			if rel > bound {
				t.Errorf("logits with the adapter differ from the reference's by %.3g, above the bound %.3g", rel, bound)
			}
			if moved < 10*bound {
				t.Errorf("the adapter moves the logits by %.3g only: the test would not see it left out", moved)
			}
		})
	}
}

// TestLoRARefusals: a type not written for adapters, an existing file, an
// adapter of another shape: errors, and no file.
func TestLoRARefusals(t *testing.T) {
	dir := checkpoint(t, "tiny")
	_, adir := randomAdapter(t, dir, trainer.LoRAConfig{R: 4, Alpha: 8, Targets: []trainer.Module{trainer.QProj}})
	out := filepath.Join(t.TempDir(), "a.gguf")
	if err := Gemma3LoRA(context.Background(), dir, adir, out, LoRAOptions{Type: MostlyQ4_K_M}); err == nil || !strings.Contains(err.Error(), "f32, f16 or bf16, not q4_k_m") {
		t.Errorf("q4_k_m: %v", err)
	}
	c, _ := trainer.Preset("tiny")
	c.Hidden = 128
	other := checkpointOf(t, c, "wide")
	if err := Gemma3LoRA(context.Background(), other, adir, out, LoRAOptions{}); err == nil || !strings.Contains(err.Error(), "the adapter in") {
		t.Errorf("another base: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := Gemma3LoRA(ctx, dir, adir, out, LoRAOptions{}); !errors.Is(err, context.Canceled) {
		t.Errorf("canceled: %v", err)
	}
	if _, err := os.Stat(out); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a refused conversion left %s", out)
	}
}
