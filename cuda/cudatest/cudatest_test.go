package cudatest

import (
	"math"
	"strings"
	"testing"
)

func TestCompareRejectsNaNWhateverTheTolerance(t *testing.T) {
	want := []float64{1, 2, 3}
	for _, bad := range []float64{math.NaN(), math.Inf(1), math.Inf(-1)} {
		if _, err := Compare([]float64{1, bad, 3}, want, Tolerance{"any", math.Inf(1)}); err == nil {
			t.Errorf("%v passed", bad)
		}
	}
	if _, err := Compare([]float64{1, 2, 3}, []float64{1, math.NaN(), 3}, F32); err == nil {
		t.Error("a NaN reference passed")
	}
}

func TestCompareTolerance(t *testing.T) {
	want := []float64{3, 4} // norm 5
	r, err := Compare([]float64{3, 4 + 5e-7}, want, F32)
	if err != nil || math.Abs(r.RelErr-1e-7) > 1e-12 {
		t.Errorf("1e-7 relative: %+v, %v", r, err)
	}
	_, err = Compare([]float64{3, 4 + 5e-5}, want, F32)
	if err == nil || !strings.Contains(err.Error(), "float32 tolerance") {
		t.Errorf("1e-5 relative passed the float32 tolerance: %v", err)
	}
	if _, err := Compare([]float64{3, 4.02}, want, BF16); err != nil {
		t.Errorf("4e-3 relative failed the bfloat16 tolerance: %v", err)
	}
	if _, err := Compare([]float64{1}, want, F32); err == nil {
		t.Error("a length mismatch passed")
	}
}

// The poison pattern must read as NaN in both float32 and bfloat16, so an
// unwritten element always fails Compare.
func TestPoisonPatternIsNaN(t *testing.T) {
	if !math.IsNaN(float64(math.Float32frombits(0xffffffff))) {
		t.Error("0xffffffff is not a float32 NaN")
	}
	if got := F64FromBF16([]uint16{0xffff}); !math.IsNaN(got[0]) {
		t.Error("0xffff is not a bfloat16 NaN")
	}
}

func TestUniformNeverZero(t *testing.T) {
	rng := RandSeeded(7)
	for _, x := range Uniform(rng, 100000, 1e-30) {
		if x == 0 {
			t.Fatal("a zero input")
		}
	}
	for _, x := range UniformBF16(rng, 100000, 1) {
		if x&0x7fff == 0 {
			t.Fatal("a zero bf16 input")
		}
	}
}
