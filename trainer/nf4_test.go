package trainer

import (
	"math"
	"path/filepath"
	"testing"

	"gemmaft/trainer/safetensors"
)

// TestNF4Golden compares QuantizeNF4 with the quantisation the reference
// script computed for testdata/reference/nf4/weight.safetensors (see
// golden/nf4.json for its source).
func TestNF4Golden(t *testing.T) {
	wf, err := safetensors.Open(filepath.Join(refDir, "nf4", "weight.safetensors"))
	if err != nil {
		t.Fatal(err)
	}
	defer wf.Close()
	info, w, err := wf.Float32("weight")
	if err != nil {
		t.Fatal(err)
	}
	q, err := QuantizeNF4(w, info.Shape, "bfloat16")
	if err != nil {
		t.Fatal(err)
	}
	gf, err := safetensors.Open(filepath.Join(refDir, "golden", "nf4.safetensors"))
	if err != nil {
		t.Fatal(err)
	}
	defer gf.Close()
	raw := func(name string) []byte {
		_, b, err := gf.Raw(name)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	f32 := func(name string) []float32 {
		_, v, err := gf.Float32(name)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	code2 := f32("code2")
	for i, c := range code2 {
		if c != dynamicCode[i] {
			t.Fatalf("dynamic code[%d] = %v, reference %v", i, dynamicCode[i], c)
		}
	}
	packed := raw("packed")
	if len(packed) != len(q.Packed) {
		t.Fatalf("%d packed bytes, reference %d", len(q.Packed), len(packed))
	}
	for i := range packed {
		if packed[i] != q.Packed[i] {
			t.Fatalf("packed byte %d = %#02x, reference %#02x", i, q.Packed[i], packed[i])
		}
	}
	offset := f32("offset")[0]
	if d := math.Abs(float64(offset - q.Offset)); d > 1e-6*math.Abs(float64(offset)) {
		t.Errorf("offset %v, reference %v", q.Offset, offset)
	}
	absmax2 := f32("absmax2")
	for i := range absmax2 {
		if math.Abs(float64(absmax2[i]-q.Absmax2[i])) > 1e-6*float64(absmax2[i]) {
			t.Errorf("absmax2[%d] = %v, reference %v", i, q.Absmax2[i], absmax2[i])
		}
	}
	// The mean is reduced in a different order than torch's, so an absmax
	// lying on a rounding boundary may land on the neighbouring code.
	aq := raw("absmax_q")
	diff := 0
	for i := range aq {
		if aq[i] != q.AbsmaxQ[i] {
			diff++
			if d := int(aq[i]) - int(q.AbsmaxQ[i]); d > 1 || d < -1 {
				t.Errorf("absmax code %d = %d, reference %d", i, q.AbsmaxQ[i], aq[i])
			}
		}
	}
	if diff > len(aq)/100 {
		t.Errorf("%d of %d absmax codes differ", diff, len(aq))
	}
	deq := q.Dequantize()
	ref := f32("dequant")
	var num, den float64
	for i := range ref {
		num += float64(deq[i]-ref[i]) * float64(deq[i]-ref[i])
		den += float64(ref[i]) * float64(ref[i])
	}
	if e := math.Sqrt(num / den); e > 1e-3 {
		t.Errorf("dequantised weight: relative error %.3g", e)
	}
	t.Logf("%d packed bytes equal, %d/%d absmax codes differ, dequantised relative error %.3g", len(packed), diff, len(aq), math.Sqrt(num/den))
}

// TestNF4Layout checks the packing order and the round trip on values
// with known codes.
func TestNF4Layout(t *testing.T) {
	w := make([]float32, 128)
	for i := range w {
		w[i] = nf4Code[i%16] * 0.5 // absmax 0.5 in both blocks: every value is a code point
	}
	q, err := QuantizeNF4(w, []int{2, 64}, "float32")
	if err != nil {
		t.Fatal(err)
	}
	if q.Packed[0] != 0x01 || q.Packed[1] != 0x23 || q.Packed[7] != 0xef {
		t.Errorf("packed % x, want first element in the high nibble", q.Packed[:8])
	}
	back := q.Dequantize()
	for i := range w {
		if math.Abs(float64(back[i]-w[i])) > 1e-6 {
			t.Fatalf("element %d: %v -> %v", i, w[i], back[i])
		}
	}
	if _, err := QuantizeNF4([]float32{1, float32(math.NaN())}, []int{2}, "float32"); err == nil {
		t.Error("NaN weight quantised without error")
	}
}
