package trainer

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// generateGolden is what scripts/reference/generate_golden.py writes:
// transformers' greedy generate (float32, KV cache) on each prompt.
type generateGolden struct {
	Adapter      bool      `json:"adapter"`
	MaxNewTokens int       `json:"max_new_tokens"`
	Stop         []int32   `json:"stop"`
	Attn         string    `json:"attn_implementation"`
	Transformers string    `json:"transformers"`
	Prompts      [][]int32 `json:"prompts"`
	Outputs      [][]int32 `json:"outputs"`
}

// TestGreedyDecodingMatchesTransformers: on the tiny parity cases, greedy
// decoding gives transformers' tokens, every one of them, with and without
// the case's adapter. The goldens come from generate_golden.py on a machine
// with torch (see its header); without them the test skips.
func TestGreedyDecodingMatchesTransformers(t *testing.T) {
	ref := filepath.Join("testdata", "reference")
	found := 0
	for _, c := range []string{"t5_gqa", "orig_mqa", "mm_f32", "trained_qlora", "rslora_gqa"} {
		for _, file := range []string{"generate.json", "generate_adapter.json"} {
			path := filepath.Join(ref, "golden", c, file)
			data, err := os.ReadFile(path)
			if os.IsNotExist(err) {
				continue
			}
			if err != nil {
				t.Fatal(err)
			}
			found++
			t.Run(c+"/"+file, func(t *testing.T) {
				var g generateGolden
				if err := json.Unmarshal(data, &g); err != nil {
					t.Fatalf("%s: %v", path, err)
				}
				if len(g.Prompts) != len(g.Outputs) || len(g.Prompts) == 0 {
					t.Fatalf("%s: %d prompts, %d outputs", path, len(g.Prompts), len(g.Outputs))
				}
				m, err := LoadModel(filepath.Join(ref, c, "model"))
				if err != nil {
					t.Fatal(err)
				}
				var a *Adapter
				if g.Adapter {
					if a, err = m.LoadAdapter(filepath.Join(ref, c, "adapter")); err != nil {
						t.Fatal(err)
					}
				}
				got, err := m.Generate(context.Background(), a, g.Prompts, GenerateOptions{MaxNewTokens: g.MaxNewTokens, Stop: g.Stop}, nil)
				if err != nil {
					t.Fatal(err)
				}
				for i := range g.Prompts {
					if fmt.Sprint(got[i]) != fmt.Sprint(g.Outputs[i]) {
						n := 0
						for n < min(len(got[i]), len(g.Outputs[i])) && got[i][n] == g.Outputs[i][n] {
							n++
						}
						t.Errorf("prompt %d (%d tokens): first difference at new token %d (%s):\n ours %v\n HF   %v",
							i, len(g.Prompts[i]), n, margin(t, m, a, g.Prompts[i], g.Outputs[i], got[i], n), got[i], g.Outputs[i])
					}
				}
				t.Logf("%d prompts, %d new tokens each, as transformers %s (%s attention) decodes them", len(g.Prompts), g.MaxNewTokens, g.Transformers, g.Attn)
			})
		}
	}
	if found == 0 {
		t.Skip("no goldens in testdata/reference/golden/*/generate*.json; make them with scripts/reference/generate_golden.py on a machine with torch")
	}
}

// margin says, at the first token two greedy continuations disagree on,
// how far apart our logits put the two choices: a near-tie that float
// rounding may flip reads very differently from a wrong model.
func margin(t *testing.T, m *Model, a *Adapter, prompt, theirs, ours []int32, n int) string {
	if n >= len(theirs) || n >= len(ours) {
		return "one stopped early"
	}
	seq := append(append([]int32(nil), prompt...), ours[:n]...)
	b, err := NewBatch([]PackedRow{{InputIDs: seq, Labels: seq, SeqLengths: []int32{int32(len(seq))}}})
	if err != nil {
		return err.Error()
	}
	logits, err := m.Logits(a, b)
	if err != nil {
		return err.Error()
	}
	last := logits[(len(seq)-1)*m.Config.VocabSize:]
	return fmt.Sprintf("our logits: %d at %.6g, %d at %.6g", ours[n], last[ours[n]], theirs[n], last[theirs[n]])
}
