// Package half converts between float32 and the two 16-bit float formats
// checkpoints and GPUs use: bfloat16 and IEEE half precision. One
// implementation serves the safetensors codec, the trainer's rounding of
// values to a checkpoint's dtype and the GPU code's host-side conversions.
package half

import "math"

// FromBF16 widens a bfloat16 bit pattern; the conversion is exact.
func FromBF16(b uint16) float32 { return math.Float32frombits(uint32(b) << 16) }

// BF16 rounds to the nearest bfloat16, ties to even, as PyTorch's
// .to(torch.bfloat16) and the GPU's conversion instructions do. NaN stays a
// (quiet) NaN; values past the largest bfloat16 become infinities.
func BF16(f float32) uint16 {
	u := math.Float32bits(f)
	if u&0x7fffffff > 0x7f800000 {
		return uint16(u>>16) | 0x40
	}
	u += 0x7fff + (u>>16)&1
	return uint16(u >> 16)
}

// RoundBF16 rounds f to the nearest bfloat16 value.
func RoundBF16(f float32) float32 { return FromBF16(BF16(f)) }

// FromF16 widens an IEEE half-precision bit pattern; exact.
func FromF16(h uint16) float32 {
	sign := uint32(h>>15) << 31
	exp := uint32(h>>10) & 0x1f
	man := uint32(h) & 0x3ff
	switch {
	case exp == 0x1f:
		return math.Float32frombits(sign | 0x7f800000 | man<<13)
	case exp == 0:
		if man == 0 {
			return math.Float32frombits(sign)
		}
		// Subnormal: value is man * 2^-24.
		v := float32(man) * (1.0 / (1 << 24))
		if sign != 0 {
			v = -v
		}
		return v
	}
	return math.Float32frombits(sign | (exp+112)<<23 | man<<13)
}

// F16 rounds to the nearest IEEE half, ties to even; values beyond
// its range become infinities.
func F16(f float32) uint16 {
	u := math.Float32bits(f)
	sign := uint16(u>>16) & 0x8000
	a := u & 0x7fffffff
	switch {
	case a > 0x7f800000: // NaN
		return sign | 0x7e00
	case a >= 0x477ff000: // rounds to or beyond 65520: infinity
		return sign | 0x7c00
	case a < 0x38800000: // below the smallest normal half (2^-14)
		// Scale to units of 2^-24 and round half to even.
		v := float64(math.Float32frombits(a)) * (1 << 24)
		r := math.RoundToEven(v)
		return sign | uint16(r)
	}
	// Normal: rebias the exponent and round the mantissa from 23 to 10 bits.
	a += 0xc8000000 // exponent -= 112 (rebias 127 -> 15), in place
	a += 0xfff + (a>>13)&1
	return sign | uint16(a>>13)
}

// RoundF16 rounds f to the nearest IEEE half value.
func RoundF16(f float32) float32 { return FromF16(F16(f)) }

// BF16s rounds a float32 slice to bfloat16 bits.
func BF16s(src []float32) []uint16 {
	out := make([]uint16, len(src))
	for i, f := range src {
		out[i] = BF16(f)
	}
	return out
}

// FromBF16s widens bfloat16 bits to float32.
func FromBF16s(src []uint16) []float32 {
	out := make([]float32, len(src))
	for i, h := range src {
		out[i] = FromBF16(h)
	}
	return out
}
