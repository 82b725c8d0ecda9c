package safetensors

import (
	"encoding/binary"
	"math"
)

// BF16ToFloat32 widens a bfloat16 bit pattern; the conversion is exact.
func BF16ToFloat32(b uint16) float32 { return math.Float32frombits(uint32(b) << 16) }

// Float32ToBF16 rounds to the nearest bfloat16, ties to even, as PyTorch's
// .to(torch.bfloat16) does. NaN stays NaN.
func Float32ToBF16(f float32) uint16 {
	u := math.Float32bits(f)
	if u&0x7fffffff > 0x7f800000 {
		return uint16(u>>16) | 0x40
	}
	u += 0x7fff + (u>>16)&1
	return uint16(u >> 16)
}

// RoundBF16 rounds f to the nearest bfloat16 value.
func RoundBF16(f float32) float32 { return BF16ToFloat32(Float32ToBF16(f)) }

// F16ToFloat32 widens an IEEE half-precision bit pattern; exact.
func F16ToFloat32(h uint16) float32 {
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

// Float32ToF16 rounds to the nearest IEEE half, ties to even; values beyond
// its range become infinities.
func Float32ToF16(f float32) uint16 {
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
func RoundF16(f float32) float32 { return F16ToFloat32(Float32ToF16(f)) }

// FirstNonFinite returns the index of the first NaN or infinite element of
// raw, little-endian values of the floating-point dtype dt, or -1 when all
// are finite (and for dtypes that are not floating point). An element is
// not finite when its exponent bits are all ones.
func FirstNonFinite(dt DType, raw []byte) int {
	var size int
	var exp uint64
	switch dt {
	case BF16:
		size, exp = 2, 0x7f80
	case F16:
		size, exp = 2, 0x7c00
	case F32:
		size, exp = 4, 0x7f800000
	case F64:
		size, exp = 8, 0x7ff0000000000000
	default:
		return -1
	}
	for i := 0; i+size <= len(raw); i += size {
		var bits uint64
		switch size {
		case 2:
			bits = uint64(binary.LittleEndian.Uint16(raw[i:]))
		case 4:
			bits = uint64(binary.LittleEndian.Uint32(raw[i:]))
		default:
			bits = binary.LittleEndian.Uint64(raw[i:])
		}
		if bits&exp == exp {
			return i / size
		}
	}
	return -1
}
