package trainer

import (
	"context"
	"errors"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"gemmaft/internal/half"
	"gemmaft/trainer/safetensors"
)

// TestMergeAdapter merges a trained-looking adapter into a tiny checkpoint
// both ways and checks the merged weights and the model's loss: the merged
// model without an adapter computes what the base with the adapter does
// (on the NF4 base for "dequantized", on the stored weights for
// "original"), within the bf16 rounding of the merged weights.
func TestMergeAdapter(t *testing.T) {
	c := tinyConfig()
	c.DType = "bfloat16"
	dir := t.TempDir()
	base := filepath.Join(dir, "base")
	if err := WriteRandomCheckpoint(base, c, InitOptions{Seed: 7, Std: 0.2, NormStd: 0.5}); err != nil {
		t.Fatal(err)
	}
	m, err := LoadModel(base)
	if err != nil {
		t.Fatal(err)
	}
	a, _ := NewAdapter(c, LoRAConfig{R: 4, Alpha: 8, Targets: []Module{QProj, VProj, DownProj}}, 3)
	randomizeB(a, 4)
	adapter := filepath.Join(dir, "adapter")
	if err := m.SaveAdapter(adapter, a, BaseModel{NameOrPath: "base"}); err != nil {
		t.Fatal(err)
	}
	tok := filepath.Join(dir, "tok")
	os.MkdirAll(tok, 0o755)
	os.WriteFile(filepath.Join(tok, "tokenizer.json"), []byte(`{"added_tokens": [{"id": 0, "content": "<pad>"}, {"id": 1, "content": "<eos>"}, {"id": 2, "content": "<bos>"}, {"id": 5, "content": "<end_of_turn>"}]}`), 0o644)
	batch := tinyBatch(t, c.VocabSize, 9)
	for _, mode := range []MergeBase{MergeDequantized, MergeOriginal} {
		t.Run(string(mode), func(t *testing.T) {
			out := filepath.Join(dir, "merged-"+string(mode))
			if err := MergeAdapter(context.Background(), base, adapter, out, MergeOptions{Base: mode, TokenizerDir: tok}); err != nil {
				t.Fatal(err)
			}
			merged, err := LoadModel(out)
			if err != nil {
				t.Fatal(err)
			}
			ref, _ := LoadModel(base)
			if mode == MergeDequantized {
				if err := ref.QuantizeBase(); err != nil {
					t.Fatal(err)
				}
			}
			// Every adapted projection is bf16(W + scale·B·A); the others are W.
			for li := range c.Layers {
				for _, mod := range AllModules {
					w := ref.Layers[li].Proj[mod]
					got := merged.Layers[li].Proj[mod].W
					l := a.Layers[li][mod]
					for o := 0; o < w.Out; o += 7 {
						for i := 0; i < w.In; i += 3 {
							want := w.W[o*w.In+i]
							if l != nil {
								var d float64
								for r := 0; r < l.R; r++ {
									d += float64(l.B[o*l.R+r]) * float64(l.A[r*l.In+i])
								}
								want += a.Config.Scale() * float32(d)
							}
							if g, wv := got[o*w.In+i], half.RoundBF16(want); math.Abs(float64(g-wv)) > 1e-6*math.Abs(float64(wv))+1e-7 &&
								half.BF16(g) != half.BF16(want) {
								t.Fatalf("layer %d %s [%d,%d]: %v, want %v", li, mod, o, i, g, wv)
							}
						}
					}
				}
			}
			want, n1, err := ref.Loss(a, batch)
			if err != nil {
				t.Fatal(err)
			}
			got, n2, err := merged.Loss(nil, batch)
			if err != nil || n1 != n2 {
				t.Fatal(err, n1, n2)
			}
			if e := math.Abs(got-want) / want; e > 2e-3 {
				t.Errorf("merged model's loss %.6f, base with adapter %.6f (relative %.2g)", got/float64(n2), want/float64(n1), e)
			}
			for _, f := range []string{"config.json", "generation_config.json", "tokenizer.json"} {
				if _, err := os.Stat(filepath.Join(out, f)); err != nil {
					t.Errorf("%s missing: %v", f, err)
				}
			}
			cfg, _ := os.ReadFile(filepath.Join(out, "config.json"))
			if !strings.Contains(string(cfg), `"bfloat16"`) {
				t.Errorf("config.json does not say bfloat16: %s", cfg)
			}
		})
	}
	// Errors: an existing target, another base's adapter, no tokenizer.
	if err := MergeAdapter(context.Background(), base, adapter, filepath.Join(dir, "merged-original"), MergeOptions{TokenizerDir: tok}); err == nil || !strings.Contains(err.Error(), "exists") {
		t.Errorf("existing target: %v", err)
	}
	other := tinyConfig()
	other.Layers = 8
	other.LayerTypes = append(other.LayerTypes, SlidingAttention)
	otherBase := filepath.Join(dir, "other")
	WriteRandomCheckpoint(otherBase, other, InitOptions{Seed: 1})
	if err := MergeAdapter(context.Background(), otherBase, adapter, filepath.Join(dir, "x"), MergeOptions{TokenizerDir: tok}); err == nil || !strings.Contains(err.Error(), "adapter") {
		t.Errorf("adapter for another base: %v", err)
	}
	if err := MergeAdapter(context.Background(), base, adapter, filepath.Join(dir, "y"), MergeOptions{}); err == nil || !strings.Contains(err.Error(), "tokenizer") {
		t.Errorf("no tokenizer: %v", err)
	}
	// A canceled merge (Ctrl-C in a run) stops and leaves nothing.
	canceled, cancel := context.WithCancel(context.Background())
	cancel()
	if err := MergeAdapter(canceled, base, adapter, filepath.Join(dir, "z"), MergeOptions{TokenizerDir: tok}); !errors.Is(err, context.Canceled) {
		t.Errorf("canceled merge: %v", err)
	}
	for _, p := range []string{"x", "y", "z", "x.tmp", "y.tmp", "z.tmp"} {
		if _, err := os.Stat(filepath.Join(dir, p)); err == nil {
			t.Errorf("%s left behind after a failed merge", p)
		}
	}
}

// TestMergeRefusesABrokenBase: a base whose weights the config does not
// describe (a tensor missing, another shape) or that holds a NaN is
// refused, naming the tensor, and no folder is written: merge used to copy
// such tensors as they were and write a checkpoint that nothing loads.
func TestMergeRefusesABrokenBase(t *testing.T) {
	c := tinyConfig()
	c.DType = "bfloat16"
	dir := t.TempDir()
	good := filepath.Join(dir, "good")
	if err := WriteRandomCheckpoint(good, c, InitOptions{Seed: 7, Std: 0.2}); err != nil {
		t.Fatal(err)
	}
	m, err := LoadModel(good)
	if err != nil {
		t.Fatal(err)
	}
	a, _ := NewAdapter(c, LoRAConfig{R: 4, Alpha: 8, Targets: []Module{QProj, DownProj}}, 3)
	adapter := filepath.Join(dir, "adapter")
	if err := m.SaveAdapter(adapter, a, BaseModel{NameOrPath: "good"}); err != nil {
		t.Fatal(err)
	}
	tok := filepath.Join(dir, "tok")
	os.MkdirAll(tok, 0o755)
	os.WriteFile(filepath.Join(tok, "tokenizer.json"), []byte(`{"added_tokens": [{"id": 1, "content": "<eos>"}, {"id": 5, "content": "<end_of_turn>"}]}`), 0o644)

	// broken rewrites good's weights, changing the named tensor.
	broken := func(name string, change func(*safetensors.Tensor) bool) string {
		out := filepath.Join(dir, strings.ReplaceAll(name, ".", "_"))
		os.MkdirAll(out, 0o755)
		cfg, _ := os.ReadFile(filepath.Join(good, "config.json"))
		os.WriteFile(filepath.Join(out, "config.json"), cfg, 0o644)
		f, err := safetensors.Open(filepath.Join(good, "model.safetensors"))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		var ts []safetensors.Tensor
		for _, info := range f.Header.Tensors {
			_, raw, _ := f.Raw(info.Name)
			tn := safetensors.Tensor{Name: info.Name, DType: info.DType, Shape: info.Shape, Data: append([]byte(nil), raw...)}
			if strings.HasSuffix(info.Name, "."+name) && !change(&tn) {
				continue
			}
			ts = append(ts, tn)
		}
		if err := safetensors.WriteFile(filepath.Join(out, "model.safetensors"), ts, nil); err != nil {
			t.Fatal(err)
		}
		return out
	}
	for _, c := range []struct {
		base, want string
	}{
		{broken("layers.1.mlp.down_proj.weight", func(*safetensors.Tensor) bool { return false }), "layers.1.mlp.down_proj.weight missing"},
		{broken("layers.0.input_layernorm.weight", func(tn *safetensors.Tensor) bool {
			tn.Shape, tn.Data = []int{tn.Shape[0] / 2}, tn.Data[:len(tn.Data)/2]
			return true
		}), "layers.0.input_layernorm.weight has shape"},
		{broken("norm.weight", func(tn *safetensors.Tensor) bool {
			tn.Data[0], tn.Data[1] = 0xc0, 0x7f // a bf16 NaN
			return true
		}), "norm.weight holds a non-finite value"},
	} {
		out := filepath.Join(dir, "merged")
		err := MergeAdapter(context.Background(), c.base, adapter, out, MergeOptions{TokenizerDir: tok})
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want %q", filepath.Base(c.base), err, c.want)
		}
		if _, err := os.Stat(out); err == nil {
			t.Errorf("%s: a folder was written", filepath.Base(c.base))
			os.RemoveAll(out)
		}
	}
}
