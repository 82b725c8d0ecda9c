package safetensors

import "encoding/binary"

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
