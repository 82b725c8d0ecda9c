package half

import (
	"math"
	"math/rand/v2"
	"testing"
)

// nearestBF16 is the reference: of the two bfloat16 values around f (found
// by truncation), the nearer in float64, the one with an even last bit on
// a tie.
func nearestBF16(f float32) uint16 {
	b := math.Float32bits(f)
	lo := uint16(b >> 16)
	hi := lo + 1
	dlo := math.Abs(float64(f) - float64(math.Float32frombits(uint32(lo)<<16)))
	hiF := float64(math.Float32frombits(uint32(hi) << 16))
	if uint32(hi)<<16&0x7f800000 == 0x7f800000 && uint32(hi)<<16&0x7fffff == 0 {
		// hi is infinity: round there only past the midpoint to the next
		// finite step, as IEEE rounding does.
		hiF = float64(math.Float32frombits(uint32(lo)<<16)) + math.Ldexp(1, int(lo>>7&0xff)-127-7)
		if math.Signbit(float64(f)) {
			hiF = float64(math.Float32frombits(uint32(lo)<<16)) - math.Ldexp(1, int(lo>>7&0xff)-127-7)
		}
	}
	dhi := math.Abs(float64(f) - hiF)
	switch {
	case dlo < dhi:
		return lo
	case dhi < dlo:
		return hi
	case lo&1 == 0:
		return lo
	default:
		return hi
	}
}

func TestBF16RoundsToNearestEven(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	check := func(f float32) {
		t.Helper()
		if got, want := BF16(f), nearestBF16(f); got != want {
			t.Fatalf("BF16(%g = %#08x) = %#04x, want %#04x", f, math.Float32bits(f), got, want)
		}
	}
	for range 200000 {
		check(math.Float32frombits(rng.Uint32()&^0x7f800000 | uint32(rng.IntN(254)+1)<<23)) // finite normals
	}
	// Ties both ways, subnormals, signed zeros, the largest finite values.
	for _, bits := range []uint32{0x3f808000, 0x3f818000, 0xbf808000, 0x00008000, 0x00018000, 0x00000001,
		0x80000000, 0, 0x7f7fffff, 0xff7fffff, 0x7f7f7fff, 0x3f800000} {
		check(math.Float32frombits(bits))
	}
}

func TestBF16SpecialValues(t *testing.T) {
	if got := BF16(float32(math.Inf(1))); got != 0x7f80 {
		t.Errorf("+Inf -> %#04x", got)
	}
	if got := BF16(float32(math.Inf(-1))); got != 0xff80 {
		t.Errorf("-Inf -> %#04x", got)
	}
	// A NaN whose payload sits only in the low bits must not round to Inf.
	nan := math.Float32frombits(0x7f800001)
	if got := BF16(nan); !math.IsNaN(float64(FromBF16(got))) {
		t.Errorf("NaN -> %#04x, not NaN", got)
	}
	if got := FromBF16(0x3fc0); got != 1.5 {
		t.Errorf("FromBF16(0x3fc0) = %v", got)
	}
	xs := []float32{1, -2.5, 3.140625}
	for i, f := range FromBF16s(BF16s(xs)) {
		if f != xs[i] {
			t.Errorf("exact bf16 value %v came back as %v", xs[i], f)
		}
	}
}

func TestBF16Rounding(t *testing.T) {
	// 1 + 2^-8 is halfway between two bf16 values; ties go to the even one (1).
	if got := RoundBF16(1 + 1.0/256); got != 1 {
		t.Errorf("RoundBF16(1+2^-8) = %v, want 1", got)
	}
	if got := RoundBF16(1 + 3.0/256); got != 1+4.0/256 {
		t.Errorf("RoundBF16(1+3*2^-8) = %v", got)
	}
	if got := RoundBF16(float32(math.Sqrt(3072))); got != 55.5 {
		t.Errorf("RoundBF16(sqrt 3072) = %v, want 55.5", got)
	}
	if !math.IsNaN(float64(RoundBF16(float32(math.NaN())))) {
		t.Error("NaN did not survive")
	}
}

func TestF16(t *testing.T) {
	for _, c := range []struct{ in, want float32 }{
		{1, 1}, {-2, -2}, {65504, 65504}, {1e6, float32(math.Inf(1))},
		{1.0 / (1 << 24), 1.0 / (1 << 24)}, {1.0 / (1 << 26), 0}, {0.1, 0.0999755859375},
		{1 + 1.0/2048, 1}, {1 + 3.0/2048, 1 + 4.0/2048},
	} {
		if got := RoundF16(c.in); got != c.want {
			t.Errorf("RoundF16(%v) = %v, want %v", c.in, got, c.want)
		}
	}
	for h := 0; h < 1<<16; h++ {
		f := FromF16(uint16(h))
		if f != f {
			continue
		}
		if back := F16(f); back != uint16(h) {
			t.Fatalf("half %#04x -> %v -> %#04x", h, f, back)
		}
	}
}
