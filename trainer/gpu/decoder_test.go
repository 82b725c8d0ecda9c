package gpu

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"gemmaft/cuda/cudatest"
	"gemmaft/trainer"
)

// TestGreedyDecodingOnGPU: in the float32 test mode, the GPU decoder (its
// caches, the ring of sliding layers, prompts longer than the window)
// gives transformers' greedy tokens, every one, on the parity cases with
// and without their adapters: the goldens TestGreedyDecodingMatchesTransformers
// holds the CPU reference to. In bf16 it reports how far it follows them.
func TestGreedyDecodingOnGPU(t *testing.T) {
	cudatest.Device(t)
	for _, precision := range []string{"fp32", "bf16"} {
		for _, c := range []string{"t5_gqa", "orig_mqa", "mm_f32", "trained_qlora"} {
			for _, file := range []string{"generate.json", "generate_adapter.json"} {
				data, err := os.ReadFile(filepath.Join(refDir, "golden", c, file))
				if err != nil {
					t.Fatal(err)
				}
				t.Run(precision+"/"+c+"/"+file, func(t *testing.T) {
					var g struct {
						Adapter      bool      `json:"adapter"`
						MaxNewTokens int       `json:"max_new_tokens"`
						Stop         []int32   `json:"stop"`
						Prompts      [][]int32 `json:"prompts"`
						Outputs      [][]int32 `json:"outputs"`
					}
					if err := json.Unmarshal(data, &g); err != nil {
						t.Fatal(err)
					}
					cfg := trainer.DecoderConfig{Model: filepath.Join(refDir, c, "model")}
					if g.Adapter {
						cfg.Adapter = filepath.Join(refDir, c, "adapter")
					}
					d, err := openDecoder(context.Background(), cfg, precision)
					if err != nil {
						t.Fatal(err)
					}
					defer d.Close()
					// All prompts at once: each sequence's tokens are its own.
					got, err := d.Generate(context.Background(), g.Prompts, trainer.GenerateOptions{MaxNewTokens: g.MaxNewTokens, Stop: g.Stop}, nil)
					if err != nil {
						t.Fatal(err)
					}
					same := 0
					for i := range g.Prompts {
						n := 0
						for n < min(len(got[i]), len(g.Outputs[i])) && got[i][n] == g.Outputs[i][n] {
							n++
						}
						same += n
						if precision == "fp32" && fmt.Sprint(got[i]) != fmt.Sprint(g.Outputs[i]) {
							t.Errorf("prompt %d (%d tokens): first difference at new token %d:\n GPU %v\n HF  %v", i, len(g.Prompts[i]), n, got[i], g.Outputs[i])
						}
					}
					t.Logf("%s: %d of %d new tokens as transformers decodes them before the first difference", precision, same, len(g.Prompts)*g.MaxNewTokens)
				})
			}
		}
	}
}

// TestDecodeBatch: a prefill of two prompts and a later step laid out as
// the session and the cache kernels read them.
func TestDecodeBatch(t *testing.T) {
	const I = trainer.IgnoreIndex
	b, seq, from := decodeBatch([]int32{2, 5, 6, 7, 8, 2, 9}, []int32{0, 1, 2, 3, 4, 0, 1}, []int{0, 0, 0, 0, 0, 1, 1}, 3)
	for _, c := range []struct {
		what      string
		got, want []int32
	}{
		{"segment starts", b.SegStart, []int32{0, 0, 0, 0, 0, 5, 5}},
		{"targets", b.Targets, []int32{I, I, I, I, 0, I, 0}},
		{"sequences", seq, []int32{0, 0, 0, 0, 0, 1, 1}},
		{"first kept positions", from, []int32{2, 2, 2, 2, 2, 0, 0}},
	} {
		if fmt.Sprint(c.got) != fmt.Sprint(c.want) {
			t.Errorf("prefill %s: %v, want %v", c.what, c.got, c.want)
		}
	}
	b, seq, from = decodeBatch([]int32{11, 12}, []int32{5, 2}, []int{0, 1}, 3)
	if fmt.Sprint(b.SegStart, b.Targets, seq, from) != fmt.Sprint([]int32{0, 1}, []int32{0, 0}, []int32{0, 1}, []int32{3, 0}) {
		t.Errorf("decode step: %v %v %v %v", b.SegStart, b.Targets, seq, from)
	}
}
