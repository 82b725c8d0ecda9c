package trainer

import (
	"fmt"
	"math"
)

// NF4 quantisation as bitsandbytes stores it (quant_type "nf4",
// compress_statistics true, the QLoRA defaults):
//
//   - the weight, flattened row-major, is cut into blocks of 64; each block
//     keeps its absmax and each element x becomes the index of the NF4 code
//     value nearest to x·(1/absmax), two per byte, the first in the high
//     nibble;
//   - the absmax values are themselves quantised ("double quantisation"):
//     their mean is subtracted, and the rest quantised blockwise to the
//     8-bit signed dynamic code in blocks of 256, each block with a float32
//     absmax of its own.

// NF4BlockSize and AbsmaxBlockSize are bitsandbytes' QLoRA block sizes.
const (
	NF4BlockSize    = 64
	AbsmaxBlockSize = 256
)

// nf4Code is the 16-value NormalFloat code (quantiles of N(0,1) scaled to
// [-1, 1], with an exact zero), as float32.
var nf4Code = [16]float32{
	-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
	-0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
	0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
	0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
}

// nf4Midpoints[i] separates code i from code i+1; a value strictly above
// it maps to i+1, as bitsandbytes' decision tree does.
var nf4Midpoints = func() (m [15]float32) {
	for i := range m {
		m[i] = float32((float64(nf4Code[i]) + float64(nf4Code[i+1])) / 2)
	}
	return m
}()

// dynamicCode is bitsandbytes' signed 8-bit dynamic map
// (create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)),
// which quantises NF4's absmax values and the first moment of 8-bit AdamW;
// unsignedDynamicCode is its signed=False form, for 8-bit AdamW's second
// moment.
var (
	dynamicCode         = makeDynamicCode(true)
	unsignedDynamicCode = makeDynamicCode(false)
)

// makeDynamicCode follows create_dynamic_map: for exponent e = 0..6 the
// means of neighbouring points of an even grid over [0.1, 1] (2^e + 1
// points signed, 2^(e+1) + 1 unsigned), scaled by 10^(e-6), with both
// signs when signed, plus 0 and 1, sorted.
func makeDynamicCode(signed bool) [256]float32 {
	var data []float32
	for e := 0; e < 7; e++ {
		n := (1 << e) + 1
		if !signed {
			n = (1 << (e + 1)) + 1
		}
		scale := float32(math.Pow(10, float64(e-6)))
		bounds := linspace32(0.1, 1, n)
		for i := 0; i+1 < n; i++ {
			mean := (bounds[i] + bounds[i+1]) / 2
			data = append(data, scale*mean)
			if signed {
				data = append(data, -scale*mean)
			}
		}
	}
	data = append(data, 0, 1)
	var code [256]float32
	copy(code[:], data)
	sortFloat32(code[:])
	return code
}

// linspace32 follows torch.linspace in float32 on the CPU: the first half
// of the points step up from start, the second half down from end, each as
// one fused multiply-add (the float64 product and sum below are exact, so
// rounding once to float32 is what a float32 FMA gives).
func linspace32(start, end float32, n int) []float32 {
	out := make([]float32, n)
	step := (end - start) / float32(n-1)
	half := n / 2
	for i := 0; i < n; i++ {
		if i < half {
			out[i] = float32(float64(start) + float64(step)*float64(i))
		} else {
			out[i] = float32(float64(end) - float64(step)*float64(n-1-i))
		}
	}
	return out
}

func sortFloat32(v []float32) {
	for i := 1; i < len(v); i++ {
		for j := i; j > 0 && v[j] < v[j-1]; j-- {
			v[j], v[j-1] = v[j-1], v[j]
		}
	}
}

// NF4Tensor is a weight quantised to NF4 with double-quantised absmax.
type NF4Tensor struct {
	Shape []int
	// Packed holds two 4-bit code indices per byte, high nibble first.
	Packed []uint8
	// AbsmaxQ is each 64-block's absmax minus Offset, as a dynamic-code index.
	AbsmaxQ []uint8
	// Absmax2 is the float32 absmax of each 256-block of AbsmaxQ.
	Absmax2 []float32
	// Offset is the mean of the float32 absmax values.
	Offset float32
	// WeightDType is the checkpoint dtype ("bfloat16", "float16",
	// "float32") the dequantised weight is rounded to.
	WeightDType string
}

// quantizeNF4Value maps a value in [-1, 1] to its NF4 code index.
func quantizeNF4Value(x float32) uint8 {
	var q uint8
	for q < 15 && x > nf4Midpoints[q] {
		q++
	}
	return q
}

// quantizeDynamic maps x in [-1, 1] to a dynamic-code index with
// bitsandbytes' seven-step binary search and round-to-nearest finish,
// which can differ from a true nearest search at the code's edges.
func quantizeDynamic(code *[256]float32, x float32) uint8 {
	pivot, upperPivot, lowerPivot := 127, 255, 0
	lower, upper := float32(-1), float32(1)
	val := code[pivot]
	for i := 64; i > 0; i >>= 1 {
		if x > val {
			lowerPivot, lower = pivot, val
			pivot += i
		} else {
			upperPivot, upper = pivot, val
			pivot -= i
		}
		val = code[pivot]
	}
	if upperPivot == 255 {
		upper = code[upperPivot]
	}
	if lowerPivot == 0 {
		lower = code[lowerPivot]
	}
	if x > val {
		if x > (upper+val)*0.5 {
			return uint8(upperPivot)
		}
		return uint8(pivot)
	}
	if x < (lower+val)*0.5 {
		return uint8(lowerPivot)
	}
	return uint8(pivot)
}

// QuantizeNF4 quantises w (row-major, any shape) to NF4 with double
// quantisation. dtype is the checkpoint dtype dequantised values are
// rounded to.
func QuantizeNF4(w []float32, shape []int, dtype string) (*NF4Tensor, error) {
	n := 1
	for _, d := range shape {
		n *= d
	}
	if n != len(w) || n == 0 {
		return nil, fmt.Errorf("nf4: %d values for shape %v", len(w), shape)
	}
	if i := firstNonFinite(w); i >= 0 {
		return nil, fmt.Errorf("nf4: non-finite weight %v at element %d", w[i], i)
	}
	blocks := (n + NF4BlockSize - 1) / NF4BlockSize
	absmax := make([]float32, blocks)
	packed := make([]uint8, (n+1)/2)
	for b := 0; b < blocks; b++ {
		lo, hi := b*NF4BlockSize, min((b+1)*NF4BlockSize, n)
		var m float32
		for _, x := range w[lo:hi] {
			m = max(m, float32(math.Abs(float64(x))))
		}
		absmax[b] = m
		inv := float32(1) / m
		if m == 0 {
			inv = 0
		}
		for i := lo; i < hi; i++ {
			q := quantizeNF4Value(w[i] * inv)
			if i%2 == 0 {
				packed[i/2] |= q << 4
			} else {
				packed[i/2] |= q
			}
		}
	}
	return NewNF4Tensor(shape, packed, absmax, dtype), nil
}

// NewNF4Tensor completes a tensor whose 64-blocks are already quantised
// (packed codes and each block's float32 absmax) with the double
// quantisation of the absmax values. The GPU backend quantises the blocks
// on the device and calls this on the host, so both backends share one
// implementation of the second level.
func NewNF4Tensor(shape []int, packed []uint8, absmax []float32, dtype string) *NF4Tensor {
	t := &NF4Tensor{Shape: append([]int(nil), shape...), Packed: packed, WeightDType: dtype}
	t.AbsmaxQ, t.Absmax2, t.Offset = DoubleQuantize(absmax)
	return t
}

// DoubleQuantize quantises NF4's per-block absmax values as bitsandbytes
// does with compress_statistics: their mean is subtracted (offset) and the
// rest encoded with the signed 8-bit dynamic code in blocks of 256, each
// with a float32 absmax of its own (absmax2).
func DoubleQuantize(absmax []float32) (q []uint8, absmax2 []float32, offset float32) {
	blocks := len(absmax)
	// The mean is a float32 reduction as torch computes it; summing in
	// float64 and rounding once differs from it by at most an ulp.
	var sum float64
	for _, a := range absmax {
		sum += float64(a)
	}
	offset = float32(sum / float64(blocks))
	q = make([]uint8, blocks)
	for b := 0; b < blocks; b += AbsmaxBlockSize {
		hi := min(b+AbsmaxBlockSize, blocks)
		var m float32
		for _, a := range absmax[b:hi] {
			m = max(m, float32(math.Abs(float64(a-offset))))
		}
		absmax2 = append(absmax2, m)
		inv := float32(1) / m
		if m == 0 {
			inv = 0
		}
		for i := b; i < hi; i++ {
			q[i] = quantizeDynamic(&dynamicCode, (absmax[i]-offset)*inv)
		}
	}
	return q, absmax2, offset
}

// NF4Code returns the 16 NF4 code values and DynamicCode the signed
// (absmax, first moment) or unsigned (second moment) 8-bit dynamic code,
// for device kernels that decode the same formats.
func NF4Code() [16]float32 { return nf4Code }

// DynamicCode returns bitsandbytes' 8-bit dynamic code; see makeDynamicCode.
func DynamicCode(signed bool) [256]float32 {
	if signed {
		return dynamicCode
	}
	return unsignedDynamicCode
}

// Absmax returns the dequantised per-block absmax values.
func (t *NF4Tensor) Absmax() []float32 {
	out := make([]float32, len(t.AbsmaxQ))
	for i, q := range t.AbsmaxQ {
		out[i] = dynamicCode[q]*t.Absmax2[i/AbsmaxBlockSize] + t.Offset
	}
	return out
}

// Dequantize returns the weight as bitsandbytes reconstructs it: code value
// times the block's absmax in float32, rounded to the weight dtype.
func (t *NF4Tensor) Dequantize() []float32 {
	n := 1
	for _, d := range t.Shape {
		n *= d
	}
	absmax := t.Absmax()
	out := make([]float32, n)
	for i := range out {
		q := t.Packed[i/2] >> 4
		if i%2 == 1 {
			q = t.Packed[i/2] & 0xf
		}
		out[i] = RoundToDType(t.WeightDType, nf4Code[q]*absmax[i/NF4BlockSize])
	}
	return out
}

// QuantizeBase replaces every projection of m by its NF4 round trip,
// keeping the packed form beside the dequantised weights the CPU computes
// with: the frozen base QLoRA trains against.
func (m *Model) QuantizeBase() error {
	for li := range m.Layers {
		for _, mod := range AllModules {
			lin := m.Layers[li].Proj[mod]
			q, err := QuantizeNF4(lin.W, []int{lin.Out, lin.In}, m.Config.DType)
			if err != nil {
				return fmt.Errorf("layer %d %s: %w", li, mod, err)
			}
			lin.NF4 = q
			lin.W = q.Dequantize()
		}
	}
	return nil
}
