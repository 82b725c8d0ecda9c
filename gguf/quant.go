package gguf

import (
	"encoding/binary"
	"fmt"
	"math"
	"runtime"
	"slices"
	"sync"

	"gemmaft/internal/half"
)

// Encode appends the values of x, a whole number of the type's blocks, in
// type t's layout. The quantised types follow ggml's reference quantisers
// (quantize_row_q8_0_ref, quantize_row_q4_0_ref and those in kquant.go),
// so a file we write holds the bytes llama.cpp's own quantiser would.
func Encode(dst []byte, t Type, x []float32) ([]byte, error) {
	if bs := t.blockSize(); len(x)%bs != 0 {
		return dst, fmt.Errorf("%d values do not fill %s blocks of %d", len(x), t, bs)
	}
	switch t {
	case F32:
		for _, v := range x {
			dst = binary.LittleEndian.AppendUint32(dst, math.Float32bits(v))
		}
	case F16:
		for _, v := range x {
			dst = binary.LittleEndian.AppendUint16(dst, half.F16(v))
		}
	case BF16:
		for _, v := range x {
			dst = binary.LittleEndian.AppendUint16(dst, half.BF16(v))
		}
	default:
		block, ok := blockEncoders[t]
		if !ok {
			return dst, fmt.Errorf("cannot encode %s", t)
		}
		return encodeBlocks(dst, t, block, x), nil
	}
	return dst, nil
}

// encodeBlocks appends x's blocks, split over the CPUs: the k-quants'
// searches make a 12B model's conversion minutes of one core's work.
// Every block's bytes have a fixed place, so each part is written where it
// goes and the result does not depend on the split.
func encodeBlocks(dst []byte, t Type, block func([]byte, []float32) []byte, x []float32) []byte {
	n := t.blockSize()
	blocks := len(x) / n
	start := len(dst)
	dst = slices.Grow(dst, blocks*t.blockBytes())[:start+blocks*t.blockBytes()]
	parts := min(runtime.GOMAXPROCS(0), max(1, len(x)/(1<<16)))
	var wg sync.WaitGroup
	for p := 0; p < parts; p++ {
		lo, hi := blocks*p/parts, blocks*(p+1)/parts
		out := dst[start+lo*t.blockBytes() : start+lo*t.blockBytes()] // appends fill dst in place
		wg.Add(1)
		go func() {
			defer wg.Done()
			for b := lo; b < hi; b++ {
				out = block(out, x[b*n:(b+1)*n])
			}
		}()
	}
	wg.Wait()
	return dst
}

// blockEncoders append one block of a quantised type.
var blockEncoders = map[Type]func(dst []byte, x []float32) []byte{
	Q8_0: appendQ8_0, Q4_0: appendQ4_0, Q5_0: appendQ5_0, Q5_1: appendQ5_1,
	Q4_K: appendQ4K, Q5_K: appendQ5K, Q6_K: appendQ6K,
}

// appendQ8_0 stores a block of 32 as a float16 scale d = max|x|/127 and
// the 32 values round(x/d) as int8.
func appendQ8_0(dst []byte, x []float32) []byte {
	var amax float32
	for _, v := range x {
		amax = max(amax, float32(math.Abs(float64(v))))
	}
	d := amax / 127
	var id float32
	if d != 0 {
		id = 1 / d
	}
	dst = binary.LittleEndian.AppendUint16(dst, half.F16(d))
	for _, v := range x {
		dst = append(dst, byte(int8(math.Round(float64(v*id)))))
	}
	return dst
}

// appendQ4_0 stores a block of 32 as a float16 scale d = m/-8, m the value
// of largest magnitude (so m itself is exactly -8·d), and the values as
// 4-bit codes min(15, ⌊x/d + 8.5⌋) that decode to (code-8)·d: value j in
// the low nibble of byte j, value j+16 in its high nibble.
func appendQ4_0(dst []byte, x []float32) []byte {
	var amax, m float32
	for _, v := range x {
		if a := float32(math.Abs(float64(v))); a > amax {
			amax, m = a, v
		}
	}
	d := m / -8
	var id float32
	if d != 0 {
		id = 1 / d
	}
	dst = binary.LittleEndian.AppendUint16(dst, half.F16(d))
	code := func(v float32) byte { return byte(min(15, int8(float32(v*id)+8.5))) }
	for j := 0; j < 16; j++ {
		dst = append(dst, code(x[j])|code(x[j+16])<<4)
	}
	return dst
}

// Decode is Encode's inverse: the values a runtime computes with.
func Decode(t Type, data []byte, n int) ([]float32, error) {
	if want := t.Bytes(int64(n)); int64(len(data)) != want || n%t.blockSize() != 0 {
		return nil, fmt.Errorf("%d bytes of %s do not hold %d values", len(data), t, n)
	}
	out := make([]float32, n)
	switch t {
	case F32:
		for i := range out {
			out[i] = math.Float32frombits(binary.LittleEndian.Uint32(data[4*i:]))
		}
	case F16:
		for i := range out {
			out[i] = half.FromF16(binary.LittleEndian.Uint16(data[2*i:]))
		}
	case BF16:
		for i := range out {
			out[i] = half.FromBF16(binary.LittleEndian.Uint16(data[2*i:]))
		}
	case Q8_0:
		for b := 0; b < n/32; b++ {
			blk := data[b*34:]
			d := half.FromF16(binary.LittleEndian.Uint16(blk))
			for j := 0; j < 32; j++ {
				out[b*32+j] = float32(int8(blk[2+j])) * d
			}
		}
	case Q4_0:
		for b := 0; b < n/32; b++ {
			blk := data[b*18:]
			d := half.FromF16(binary.LittleEndian.Uint16(blk))
			for j := 0; j < 16; j++ {
				out[b*32+j] = float32(int(blk[2+j]&15)-8) * d
				out[b*32+j+16] = float32(int(blk[2+j]>>4)-8) * d
			}
		}
	default:
		block, ok := blockDecoders[t]
		if !ok {
			return nil, fmt.Errorf("cannot decode %s", t)
		}
		vals, size := t.blockSize(), t.blockBytes()
		for b := 0; b < n/vals; b++ {
			block(out[b*vals:(b+1)*vals], data[b*size:(b+1)*size])
		}
	}
	return out, nil
}

// blockDecoders write one block's values (ggml's dequantize_row_*).
var blockDecoders = map[Type]func(out []float32, blk []byte){
	Q5_0: decodeQ5_0, Q5_1: decodeQ5_1, Q4_K: decodeQ4K, Q5_K: decodeQ5K, Q6_K: decodeQ6K,
}
