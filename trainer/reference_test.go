package trainer

import (
	"math"
	"testing"

	"gemmaft/trainer/internal/golden"
)

// The golden files under testdata/reference/golden were written by
// scripts/reference/reference.py with transformers 5.17 + PEFT 0.21 in
// float64, from the checkpoints, adapters and batches beside them (written
// by trainer/internal/refgen). The loss, the LoRA gradients, the clipped
// AdamW step and the post-step loss are compared by the backend
// conformance suite (trainer/backendtest), which this package's
// TestCPUBackendConformance runs; this test adds what only the CPU
// reference exposes: the logits and the embedding scale.

const refDir = "testdata/reference"

func relErr(got, want float64) float64 { return math.Abs(got-want) / math.Abs(want) }

func TestHuggingFaceLogits(t *testing.T) {
	cases, err := golden.Cases(refDir)
	if err != nil {
		t.Fatal(err)
	}
	if len(cases) < 4 {
		t.Fatalf("found %d golden cases, want at least 4", len(cases))
	}
	for _, rc := range cases {
		t.Run(rc.Name, func(t *testing.T) {
			m, err := LoadModel(rc.Model())
			if err != nil {
				t.Fatal(err)
			}
			if float64(m.EmbedScale()) != rc.Golden.EmbedScale {
				t.Errorf("embed scale %v, reference %v", m.EmbedScale(), rc.Golden.EmbedScale)
			}
			a, err := m.LoadAdapter(rc.AdapterDir())
			if err != nil {
				t.Fatal(err)
			}
			rows, err := ReadPackedRows(rc.RowsFile())
			if err != nil {
				t.Fatal(err)
			}
			// Logits of the first packed example, run alone, with the adapter.
			first := rows[0].SeqLengths[0]
			one, _ := NewBatch([]PackedRow{{InputIDs: rows[0].InputIDs[:first], Labels: rows[0].Labels[:first], SeqLengths: []int32{first}}})
			logits, err := m.Logits(a, one)
			if err != nil {
				t.Fatal(err)
			}
			want, err := rc.Tensor("logits.row0.ex0")
			if err != nil {
				t.Fatal(err)
			}
			var num, den float64
			for i, w := range want {
				num += (float64(logits[i]) - w) * (float64(logits[i]) - w)
				den += w * w
			}
			if e := math.Sqrt(num / den); e > 1e-5 {
				t.Errorf("logits: relative error %.3g", e)
			}
		})
	}
}
