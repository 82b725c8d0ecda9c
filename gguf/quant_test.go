package gguf

import (
	"math"
	"math/rand/v2"
	"strings"
	"testing"

	"gemmaft/internal/half"
)

// quantBound is the largest error Decode(Encode(x)) may have on an element
// of a block whose float32 scale is d, derived from the quantisers:
//
//	q8_0: q = round(x/d) is within d/2 of x/d, and the stored scale
//	      d' = fp16(d) is within |d|·2⁻¹¹ of d, so |x − q·d'| ≤ |d|/2 + 127·|d|·2⁻¹¹.
//	q4_0: codes round x/d to the nearest of −8…7; the block's largest
//	      magnitude is exactly −8·d, but a value of the opposite sign can
//	      reach +8·d and is clamped to 7·d, an error of |d|; with the scale
//	      stored in fp16, |x − (c−8)·d'| ≤ |d| + 8·|d|·2⁻¹¹.
func quantBound(t Type, d float32) float64 {
	ad := math.Abs(float64(d))
	switch t {
	case Q8_0:
		return ad/2 + 127*ad*math.Pow(2, -11)
	case Q4_0:
		return ad + 8*ad*math.Pow(2, -11)
	}
	return 0
}

func TestQuantisationErrorBound(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	x := make([]float32, 32*4096)
	for i := range x {
		x[i] = float32(rng.NormFloat64()) * float32(math.Pow(10, float64(rng.IntN(5)-3)))
	}
	copy(x[:32], make([]float32, 32)) // an all-zero block
	for _, typ := range []Type{Q8_0, Q4_0} {
		data, err := Encode(nil, typ, x)
		if err != nil {
			t.Fatal(err)
		}
		if int64(len(data)) != typ.Bytes(int64(len(x))) {
			t.Fatalf("%s: %d bytes, want %d", typ, len(data), typ.Bytes(int64(len(x))))
		}
		y, err := Decode(typ, data, len(x))
		if err != nil {
			t.Fatal(err)
		}
		worst := 0.0
		for b := 0; b < len(x); b += 32 {
			var amax, m float32
			for _, v := range x[b : b+32] {
				if a := float32(math.Abs(float64(v))); a > amax {
					amax, m = a, v
				}
			}
			d := amax / 127
			if typ == Q4_0 {
				d = m / -8
			}
			for j := b; j < b+32; j++ {
				e := math.Abs(float64(x[j] - y[j]))
				bound := quantBound(typ, d)
				if e > bound {
					t.Fatalf("%s: element %d: %g decodes to %g, error %g above the bound %g", typ, j, x[j], y[j], e, bound)
				}
				if bound > 0 {
					worst = max(worst, e/bound)
				}
			}
		}
		if worst < 0.3 {
			t.Errorf("%s: the largest error is %.2f of the bound: the bound is too loose to mean anything", typ, worst)
		}
		t.Logf("%s: largest error %.2f of the bound", typ, worst)
	}
}

func TestEncodeFloatTypes(t *testing.T) {
	x := []float32{0, 1, -2.5, 3.14159, 65504, 1e-8}
	for _, typ := range []Type{F32, F16, BF16} {
		data, err := Encode(nil, typ, x)
		if err != nil {
			t.Fatal(err)
		}
		y, err := Decode(typ, data, len(x))
		if err != nil {
			t.Fatal(err)
		}
		for i, v := range x {
			want := v
			switch typ {
			case F16:
				want = half.RoundF16(v)
			case BF16:
				want = half.RoundBF16(v)
			}
			if y[i] != want {
				t.Errorf("%s: %g decodes to %g, want %g", typ, v, y[i], want)
			}
		}
	}
	if _, err := Encode(nil, Q8_0, make([]float32, 31)); err == nil {
		t.Error("31 values encoded as q8_0 without an error")
	}
}

// TestParseFileType: types as llama.cpp's tools write them (upper case)
// read as ours; its types not written here are refused naming the tool
// that makes them.
func TestParseFileType(t *testing.T) {
	for in, want := range map[string]FileType{"q8_0": MostlyQ8_0, "Q8_0": MostlyQ8_0, "Q4_0": MostlyQ4_0, "F16": MostlyF16,
		"bf16": MostlyBF16, "f32": AllF32, "Q4_K_M": MostlyQ4_K_M, "q4_k_s": MostlyQ4_K_S, "Q5_K_M": MostlyQ5_K_M,
		"q5_k_s": MostlyQ5_K_S, "Q6_K": MostlyQ6_K, "q5_0": MostlyQ5_0, "Q5_1": MostlyQ5_1,
		"Q4_K": MostlyQ4_K_M, "q5_k": MostlyQ5_K_M} { // llama-quantize's aliases
		if got, err := ParseFileType(in); err != nil || got != want {
			t.Errorf("%s: %v %v, want %v", in, got, err, want)
		}
	}
	for in, want := range map[string]string{
		"Q3_K_M":    "llama-quantize turns that file into Q3_K_M",
		"IQ2_XS":    "llama-quantize turns that file into IQ2_XS",
		"q4_1":      "llama-quantize turns that file into q4_1",
		"MXFP4_MOE": "llama-quantize turns that file into MXFP4_MOE",
		"iqra":      `unknown type "iqra"`,
		"q5":        `unknown type "q5" (q8_0, q6_k, q5_k_m`,
	} {
		if _, err := ParseFileType(in); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v, want an error saying %q", in, err, want)
		}
	}
}
