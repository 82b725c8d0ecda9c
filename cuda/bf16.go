package cuda

import "math"

// BF16FromFloat32 rounds f to the nearest bfloat16, ties to even, as the
// GPU's conversion instructions and PyTorch do. NaN stays NaN (quiet);
// values past the largest bfloat16 round to infinity.
func BF16FromFloat32(f float32) uint16 {
	b := math.Float32bits(f)
	if b&0x7fffffff > 0x7f800000 { // NaN: keep the sign, force a quiet mantissa bit
		return uint16(b>>16) | 0x0040
	}
	lsb := (b >> 16) & 1
	return uint16((b + 0x7fff + lsb) >> 16)
}

// Float32FromBF16 widens a bfloat16 exactly.
func Float32FromBF16(h uint16) float32 {
	return math.Float32frombits(uint32(h) << 16)
}

// BF16Slice converts a float32 slice to bfloat16 bits.
func BF16Slice(src []float32) []uint16 {
	out := make([]uint16, len(src))
	for i, f := range src {
		out[i] = BF16FromFloat32(f)
	}
	return out
}

// Float32Slice widens bfloat16 bits to float32.
func Float32Slice(src []uint16) []float32 {
	out := make([]float32, len(src))
	for i, h := range src {
		out[i] = Float32FromBF16(h)
	}
	return out
}
