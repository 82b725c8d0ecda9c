package trainer

import (
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"testing"

	"gemmaft/trainer/safetensors"
)

// The golden files under testdata/reference/golden were written by
// scripts/reference/reference.py with transformers 5.17 + PEFT 0.21 in
// float64, from the checkpoints, adapters and batches beside them (written
// by trainer/internal/refgen).

const refDir = "testdata/reference"

type golden struct {
	Loss         float64 `json:"loss"`
	Tokens       int     `json:"tokens"`
	GradNorm     float64 `json:"grad_norm"`
	MaxNorm      float64 `json:"max_norm"`
	PostStepLoss float64 `json:"post_step_loss"`
	EmbedScale   float64 `json:"embed_scale"`
	LoRATensors  int     `json:"lora_tensors"`
}

type caseSpec struct {
	LR, WeightDecay, Beta1, Beta2, Eps float64
}

func readJSON(t *testing.T, path string, v any) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, v); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
}

func relErr(got, want float64) float64 { return math.Abs(got-want) / math.Abs(want) }

func TestHuggingFaceParity(t *testing.T) {
	cases, _ := filepath.Glob(filepath.Join(refDir, "golden", "*", "golden.json"))
	if len(cases) < 4 {
		t.Fatalf("found %d golden cases, want at least 4", len(cases))
	}
	for _, gpath := range cases {
		name := filepath.Base(filepath.Dir(gpath))
		t.Run(name, func(t *testing.T) {
			dir := filepath.Join(refDir, name)
			var g golden
			readJSON(t, gpath, &g)
			var spec caseSpec
			b, _ := os.ReadFile(filepath.Join(dir, "case.json"))
			json.Unmarshal(b, &struct {
				LR          *float64 `json:"lr"`
				WeightDecay *float64 `json:"weight_decay"`
				Beta1       *float64 `json:"beta1"`
				Beta2       *float64 `json:"beta2"`
				Eps         *float64 `json:"eps"`
			}{&spec.LR, &spec.WeightDecay, &spec.Beta1, &spec.Beta2, &spec.Eps})
			m, err := LoadModel(filepath.Join(dir, "model"))
			if err != nil {
				t.Fatal(err)
			}
			if float64(m.EmbedScale()) != g.EmbedScale {
				t.Errorf("embed scale %v, reference %v", m.EmbedScale(), g.EmbedScale)
			}
			a, err := m.LoadAdapter(filepath.Join(dir, "adapter"))
			if err != nil {
				t.Fatal(err)
			}
			a.Config.Dropout = 0 // the reference runs PEFT in eval mode
			rows, err := ReadPackedRows(filepath.Join(dir, "batch.jsonl"))
			if err != nil {
				t.Fatal(err)
			}
			batch, err := NewBatch(rows)
			if err != nil {
				t.Fatal(err)
			}
			gf, err := safetensors.Open(filepath.Join(filepath.Dir(gpath), "golden.safetensors"))
			if err != nil {
				t.Fatal(err)
			}
			defer gf.Close()
			read := func(name string) []float64 {
				t.Helper()
				info, raw, err := gf.Raw(name)
				if err != nil {
					t.Fatal(err)
				}
				if info.DType != safetensors.F64 {
					t.Fatalf("%s: dtype %s", name, info.DType)
				}
				out := make([]float64, len(raw)/8)
				for i := range out {
					out[i] = math.Float64frombits(uint64(raw[8*i]) | uint64(raw[8*i+1])<<8 | uint64(raw[8*i+2])<<16 | uint64(raw[8*i+3])<<24 |
						uint64(raw[8*i+4])<<32 | uint64(raw[8*i+5])<<40 | uint64(raw[8*i+6])<<48 | uint64(raw[8*i+7])<<56)
				}
				return out
			}

			// Logits of the first packed example, run alone, with the adapter.
			first := rows[0].SeqLengths[0]
			one, _ := NewBatch([]PackedRow{{InputIDs: rows[0].InputIDs[:first], Labels: rows[0].Labels[:first], SeqLengths: []int32{first}}})
			logits := logitsOf(t, m, a, one)
			want := read("logits.row0.ex0")
			var num, den float64
			for i, w := range want {
				num += (float64(logits[i]) - w) * (float64(logits[i]) - w)
				den += w * w
			}
			if e := math.Sqrt(num / den); e > 1e-5 {
				t.Errorf("logits: relative error %.3g", e)
			}

			sum, count, err := m.LossAndGrad(a, batch, float64(batch.Trained()), 0)
			if err != nil {
				t.Fatal(err)
			}
			loss := sum / float64(count)
			if count != g.Tokens {
				t.Fatalf("%d trained tokens, reference %d", count, g.Tokens)
			}
			if e := relErr(loss, g.Loss); e > 1e-5 {
				t.Errorf("loss %.9g, reference %.9g: relative error %.3g", loss, g.Loss, e)
			}
			params := a.Params()
			if len(params) != g.LoRATensors {
				t.Fatalf("%d LoRA tensors, reference %d", len(params), g.LoRATensors)
			}
			worst := 0.0
			for _, p := range params {
				key := "grad." + m.peftPrefix() + p.Name + ".weight"
				ref := read(key)
				var num, den float64
				for i, r := range ref {
					d := float64(p.Grad[i]) - r
					num += d * d
					den += r * r
				}
				e := math.Sqrt(num / den)
				worst = max(worst, e)
				if e > 1e-4 {
					t.Errorf("%s: gradient relative norm error %.3g", p.Name, e)
				}
			}
			t.Logf("loss %.9g (reference %.9g), worst gradient error %.3g", loss, g.Loss, worst)

			norm := ClipGradNorm(params, g.MaxNorm)
			if e := relErr(norm, g.GradNorm); e > 1e-5 {
				t.Errorf("gradient norm %.9g, reference %.9g", norm, g.GradNorm)
			}
			opt := NewAdamW(params, spec.Beta1, spec.Beta2, spec.Eps, spec.WeightDecay)
			if err := opt.Update(params, spec.LR); err != nil {
				t.Fatal(err)
			}
			post, count2, err := m.Loss(a, batch)
			if err != nil {
				t.Fatal(err)
			}
			postLoss := post / float64(count2)
			if e := relErr(postLoss, g.PostStepLoss); e > 1e-5 {
				t.Errorf("post-step loss %.9g, reference %.9g: relative error %.3g", postLoss, g.PostStepLoss, e)
			}
			t.Logf("post-step loss %.9g (reference %.9g)", postLoss, g.PostStepLoss)
		})
	}
}

// logitsOf computes the logits [T×VocabSize] of every position of a short
// batch: the forward pass of training, then the whole tied lm_head product
// that training computes only in chunks at the trained positions.
func logitsOf(t *testing.T, m *Model, a *Adapter, b *Batch) []float32 {
	t.Helper()
	r, err := newRunner(m, a, b, 0, false)
	if err != nil {
		t.Fatal(err)
	}
	xf, _, _, _, _ := r.forward(false)
	logits := make([]float32, r.T*m.Config.VocabSize)
	Matmul(logits, xf, m.Embed, r.T, m.Config.VocabSize, m.Config.Hidden, false)
	return logits
}
