package trainer

import (
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"gemmaft/internal/half"
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
			if err := MergeAdapter(base, adapter, out, MergeOptions{Base: mode, TokenizerDir: tok}); err != nil {
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
	if err := MergeAdapter(base, adapter, filepath.Join(dir, "merged-original"), MergeOptions{TokenizerDir: tok}); err == nil || !strings.Contains(err.Error(), "exists") {
		t.Errorf("existing target: %v", err)
	}
	other := tinyConfig()
	other.Layers = 8
	other.LayerTypes = append(other.LayerTypes, SlidingAttention)
	otherBase := filepath.Join(dir, "other")
	WriteRandomCheckpoint(otherBase, other, InitOptions{Seed: 1})
	if err := MergeAdapter(otherBase, adapter, filepath.Join(dir, "x"), MergeOptions{TokenizerDir: tok}); err == nil || !strings.Contains(err.Error(), "adapter") {
		t.Errorf("adapter for another base: %v", err)
	}
	if err := MergeAdapter(base, adapter, filepath.Join(dir, "y"), MergeOptions{}); err == nil || !strings.Contains(err.Error(), "tokenizer") {
		t.Errorf("no tokenizer: %v", err)
	}
	for _, p := range []string{"x", "y", "x.tmp", "y.tmp"} {
		if _, err := os.Stat(filepath.Join(dir, p)); err == nil {
			t.Errorf("%s left behind after a failed merge", p)
		}
	}
}
