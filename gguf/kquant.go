package gguf

import (
	"encoding/binary"
	"math"

	"gemmaft/internal/half"
)

// The quantisers below are ggml's reference ones (ggml-quants.c: q5_0,
// q5_1 and the k-quants q4_K, q5_K and q6_K, quantize_row_*_ref), which
// llama.cpp's quantiser runs when it has no importance matrix: a file
// written here holds the bytes llama-quantize would write. Byte equality
// needs every float32 operation in the same order with the same rounding,
// so products that feed a sum are converted to float32 explicitly: Go may
// otherwise fuse a*b+c into one rounding (on arm64, for one), and ggml's
// reference build does not. The same holds for a product handed to
// nearestInt, whose inlined addition would otherwise fuse with it.

// superBlock is the number of values in a k-quant block (ggml's QK_K).
const superBlock = 256

// nearestInt rounds to the nearest integer, ties to even, as ggml's
// nearest_int does by adding 1.5·2²³ (valid for |f| < 2²²).
func nearestInt(f float32) int {
	v := f + 12582912
	return int(math.Float32bits(v)&0x7fffff) - 0x400000
}

func clampInt(v, lo, hi int) int { return max(lo, min(hi, v)) }

func sqrt32(f float32) float32 { return float32(math.Sqrt(float64(f))) }

func abs32(f float32) float32 { return float32(math.Abs(float64(f))) }

// appendQ5_0 stores a block of 32 as q4_0 does with 5-bit codes: a float16
// scale d = m/-16 (m the value of largest magnitude), the codes' low
// nibbles as q4_0 packs them, and their fifth bits in a 32-bit word.
func appendQ5_0(dst []byte, x []float32) []byte {
	var amax, m float32
	for _, v := range x {
		if a := abs32(v); a > amax {
			amax, m = a, v
		}
	}
	d := m / -16
	var id float32
	if d != 0 {
		id = 1 / d
	}
	code := func(v float32) uint8 { return uint8(min(31, int8(float32(v*id)+16.5))) }
	return appendFiveBit(binary.LittleEndian.AppendUint16(dst, half.F16(d)), x, code)
}

// appendQ5_1 stores a block of 32 as a float16 scale d = (max-min)/31, the
// float16 minimum, and 5-bit codes of (x-min)/d packed as in q5_0.
func appendQ5_1(dst []byte, x []float32) []byte {
	lo, hi := float32(math.MaxFloat32), float32(-math.MaxFloat32)
	for _, v := range x {
		if v < lo {
			lo = v
		}
		if v > hi {
			hi = v
		}
	}
	d := (hi - lo) / 31
	var id float32
	if d != 0 {
		id = 1 / d
	}
	dst = binary.LittleEndian.AppendUint16(dst, half.F16(d))
	dst = binary.LittleEndian.AppendUint16(dst, half.F16(lo))
	code := func(v float32) uint8 { return uint8(float32((v-lo)*id) + 0.5) }
	return appendFiveBit(dst, x, code)
}

// appendFiveBit packs 32 five-bit codes: the fifth bits of values j and
// j+16 as bits j and j+16 of a little-endian word, then the low nibbles of
// j and j+16 in byte j.
func appendFiveBit(dst []byte, x []float32, code func(float32) uint8) []byte {
	var qh uint32
	var qs [16]byte
	for j := 0; j < 16; j++ {
		c0, c1 := code(x[j]), code(x[j+16])
		qs[j] = c0&15 | (c1&15)<<4
		qh |= uint32(c0>>4&1)<<j | uint32(c1>>4&1)<<(j+16)
	}
	dst = binary.LittleEndian.AppendUint32(dst, qh)
	return append(dst, qs[:]...)
}

// fitScaleMin is ggml's make_qkx2_quants: codes L in 0…nmax and a scale
// and minimum with x ≈ scale·L − min, chosen among nstep+1 trial scales
// (nmax+rmin+rdelta·i over the range) by the weighted squared error of
// each trial's least-squares fit. It returns the scale and min (≥ 0).
func fitScaleMin(nmax int, x, weights []float32, L, aux []uint8, rmin, rdelta float32, nstep int) (float32, float32) {
	lo, hi := x[0], x[0]
	sumW := weights[0]
	sumX := float32(sumW * x[0])
	for i := 1; i < len(x); i++ {
		// Comparisons, not min and max: those order −0 before +0.
		if x[i] < lo {
			lo = x[i]
		}
		if x[i] > hi {
			hi = x[i]
		}
		sumW += weights[i]
		sumX += float32(weights[i] * x[i])
	}
	if lo > 0 {
		lo = 0
	}
	if hi == lo {
		clear(L)
		return 0, -lo
	}
	iscale := float32(nmax) / (hi - lo)
	scale := 1 / iscale
	var best float32
	for i, v := range x {
		L[i] = uint8(clampInt(nearestInt(float32(iscale*(v-lo))), 0, nmax))
		diff := float32(scale*float32(L[i])) + lo - v
		best += float32(weights[i] * float32(diff*diff))
	}
	for is := 0; is <= nstep; is++ {
		iscale = (rmin + float32(rdelta*float32(is)) + float32(nmax)) / (hi - lo)
		var sumL, sumL2, sumXL float32
		for i, v := range x {
			l := clampInt(nearestInt(float32(iscale*(v-lo))), 0, nmax)
			aux[i] = uint8(l)
			wl := float32(weights[i] * float32(l))
			sumL += wl
			sumL2 += float32(wl * float32(l))
			sumXL += float32(wl * v)
		}
		D := float32(sumW*sumL2) - float32(sumL*sumL)
		if D <= 0 {
			continue
		}
		s := (float32(sumW*sumXL) - float32(sumX*sumL)) / D
		m := (float32(sumL2*sumX) - float32(sumL*sumXL)) / D
		if m > 0 {
			m, s = 0, sumXL/sumL2
		}
		var cur float32
		for i, v := range x {
			diff := float32(s*float32(aux[i])) + m - v
			cur += float32(weights[i] * float32(diff*diff))
		}
		if cur < best {
			copy(L, aux)
			best, scale, lo = cur, s, m
		}
	}
	return scale, -lo
}

// appendQ4K and appendQ5K store a block of 256 as 8 groups of 32, each with
// its own 6-bit scale and minimum (of the block's float16 d and dmin) and
// 4- or 5-bit codes.
func appendQ4K(dst []byte, x []float32) []byte { return appendKWithMin(dst, x, 15) }
func appendQ5K(dst []byte, x []float32) []byte { return appendKWithMin(dst, x, 31) }

func appendKWithMin(dst []byte, x []float32, nmax int) []byte {
	var L, aux [superBlock]uint8
	var weights [32]float32
	var scales, mins [8]float32
	rmin, nstep := float32(-1), 20
	if nmax == 31 {
		rmin, nstep = -0.5, 15
	}
	var maxScale, maxMin float32
	for j := 0; j < 8; j++ {
		g := x[32*j : 32*j+32]
		var sumX2 float32
		for _, v := range g {
			sumX2 += float32(v * v)
		}
		av := sqrt32(sumX2 / 32)
		for l, v := range g {
			weights[l] = av + abs32(v)
		}
		scales[j], mins[j] = fitScaleMin(nmax, g, weights[:], L[32*j:32*j+32], aux[:32], rmin, 0.1, nstep)
		maxScale, maxMin = max(maxScale, scales[j]), max(maxMin, mins[j])
	}
	var invScale, invMin float32
	if maxScale > 0 {
		invScale = 63 / maxScale
	}
	if maxMin > 0 {
		invMin = 63 / maxMin
	}
	// The 6-bit scales and mins: groups 0–3 in the low six bits of bytes
	// 0–3 (scales) and 4–7 (mins); groups 4–7 as nibbles in bytes 8–11,
	// with their top two bits in the spare bits of bytes 0–7.
	var packed [12]byte
	for j := 0; j < 8; j++ {
		ls := min(63, uint8(nearestInt(float32(invScale*scales[j]))))
		lm := min(63, uint8(nearestInt(float32(invMin*mins[j]))))
		if j < 4 {
			packed[j], packed[j+4] = ls, lm
		} else {
			packed[j+4] = ls&15 | (lm&15)<<4
			packed[j-4] |= ls >> 4 << 6
			packed[j] |= lm >> 4 << 6
		}
	}
	d, dmin := half.F16(maxScale/63), half.F16(maxMin/63)
	for j := 0; j < 8; j++ {
		sc, m := scaleMinK4(j, packed[:])
		gd := half.FromF16(d) * float32(sc)
		if gd == 0 {
			continue
		}
		dm := float32(half.FromF16(dmin) * float32(m))
		for i := 32 * j; i < 32*j+32; i++ {
			L[i] = uint8(clampInt(nearestInt((x[i]+dm)/gd), 0, nmax))
		}
	}
	dst = binary.LittleEndian.AppendUint16(dst, d)
	dst = binary.LittleEndian.AppendUint16(dst, dmin)
	dst = append(dst, packed[:]...)
	if nmax == 31 {
		// The fifth bits: of the values n+j and n+j+32 of each 64, bits
		// 2n/64 and 2n/64+1 of byte j.
		var qh [32]byte
		for n := 0; n < superBlock; n += 64 {
			for j := 0; j < 32; j++ {
				qh[j] |= (L[n+j]>>4&1)<<(n/32) | (L[n+j+32]>>4&1)<<(n/32+1)
			}
		}
		dst = append(dst, qh[:]...)
	}
	for n := 0; n < superBlock; n += 64 {
		for j := 0; j < 32; j++ {
			dst = append(dst, L[n+j]&15|(L[n+j+32]&15)<<4)
		}
	}
	return dst
}

// scaleMinK4 unpacks group j's 6-bit scale and minimum (ggml's
// get_scale_min_k4).
func scaleMinK4(j int, q []byte) (uint8, uint8) {
	if j < 4 {
		return q[j] & 63, q[j+4] & 63
	}
	return q[j+4]&15 | q[j-4]>>6<<4, q[j+4]>>4 | q[j]>>6<<4
}

// fitScale is ggml's make_qx_quants with x² weights (rmse_type 1): codes
// in −nmax…nmax−1, stored offset by nmax, and the scale whose least-squares
// fit has the smallest weighted error among 19 trial scales.
func fitScale(nmax int, x []float32, L []int8) float32 {
	var amax, m float32
	for _, v := range x {
		if a := abs32(v); a > amax {
			amax, m = a, v
		}
	}
	if amax < 1e-15 {
		clear(L)
		return 0
	}
	sums := func(iscale float32, store bool) (float32, float32) {
		var sumLX, sumL2 float32
		for i, v := range x {
			l := clampInt(nearestInt(float32(iscale*v)), -nmax, nmax-1)
			if store {
				L[i] = int8(l + nmax)
			}
			w := v * v
			sumLX += float32(float32(w*v) * float32(l))
			sumL2 += float32(float32(w*float32(l)) * float32(l))
		}
		return sumLX, sumL2
	}
	iscale := float32(-nmax) / m
	sumLX, sumL2 := sums(iscale, true)
	var scale float32
	if sumL2 != 0 {
		scale = sumLX / sumL2
	}
	best := scale * sumLX
	for is := -9; is <= 9; is++ {
		if is == 0 {
			continue
		}
		iscale = -(float32(nmax) + float32(0.1*float32(is))) / m
		sumLX, sumL2 = sums(iscale, false)
		if sumL2 > 0 && sumLX*sumLX > best*sumL2 {
			sums(iscale, true)
			scale = sumLX / sumL2
			best = scale * sumLX
		}
	}
	return scale
}

// appendQ6K stores a block of 256 as 16 groups of 16 with 8-bit scales (of
// the block's float16 d) and 6-bit codes: low nibbles in 128 bytes, high
// bit pairs in 64, then the scales and d.
func appendQ6K(dst []byte, x []float32) []byte {
	var L [superBlock]int8
	var scales [16]float32
	var maxScale, maxAbs float32
	for ib := 0; ib < 16; ib++ {
		scales[ib] = fitScale(32, x[16*ib:16*ib+16], L[16*ib:16*ib+16])
		if a := abs32(scales[ib]); a > maxAbs {
			maxAbs, maxScale = a, scales[ib]
		}
	}
	if maxAbs < 1e-15 {
		return append(dst, make([]byte, 210)...)
	}
	iscale := -128 / maxScale
	d := half.F16(1 / iscale)
	var sc [16]int8
	for ib := range sc {
		sc[ib] = int8(min(127, nearestInt(float32(iscale*scales[ib]))))
	}
	for j := 0; j < 16; j++ {
		gd := half.FromF16(d) * float32(sc[j])
		if gd == 0 {
			continue
		}
		for i := 16 * j; i < 16*j+16; i++ {
			L[i] = int8(clampInt(nearestInt(x[i]/gd), -32, 31) + 32)
		}
	}
	var ql [128]byte
	var qh [64]byte
	for n := 0; n < superBlock; n += 128 {
		for l := 0; l < 32; l++ {
			q := [4]uint8{uint8(L[n+l]), uint8(L[n+l+32]), uint8(L[n+l+64]), uint8(L[n+l+96])}
			ql[n/2+l] = q[0]&15 | (q[2]&15)<<4
			ql[n/2+l+32] = q[1]&15 | (q[3]&15)<<4
			qh[n/4+l] = q[0]>>4 | q[1]>>4<<2 | q[2]>>4<<4 | q[3]>>4<<6
		}
	}
	dst = append(dst, ql[:]...)
	dst = append(dst, qh[:]...)
	for _, s := range sc {
		dst = append(dst, byte(s))
	}
	return binary.LittleEndian.AppendUint16(dst, d)
}

// fiveBit reads value j's 5-bit code of a q5_0 or q5_1 block's packed
// bits (qh) and nibbles (qs).
func fiveBit(qh uint32, qs []byte, j int) int {
	if j < 16 {
		return int(qs[j]&15) | int(qh>>j&1)<<4
	}
	return int(qs[j-16]>>4) | int(qh>>j&1)<<4
}

func decodeQ5_0(out []float32, blk []byte) {
	d := half.FromF16(binary.LittleEndian.Uint16(blk))
	qh := binary.LittleEndian.Uint32(blk[2:])
	for j := range out {
		out[j] = float32(fiveBit(qh, blk[6:], j)-16) * d
	}
}

func decodeQ5_1(out []float32, blk []byte) {
	d := half.FromF16(binary.LittleEndian.Uint16(blk))
	m := half.FromF16(binary.LittleEndian.Uint16(blk[2:]))
	qh := binary.LittleEndian.Uint32(blk[4:])
	for j := range out {
		out[j] = float32(float32(fiveBit(qh, blk[8:], j))*d) + m
	}
}

func decodeQ4K(out []float32, blk []byte) { decodeKWithMin(out, blk, false) }
func decodeQ5K(out []float32, blk []byte) { decodeKWithMin(out, blk, true) }

func decodeKWithMin(out []float32, blk []byte, fifth bool) {
	d := half.FromF16(binary.LittleEndian.Uint16(blk))
	dmin := half.FromF16(binary.LittleEndian.Uint16(blk[2:]))
	scales, qs := blk[4:16], blk[16:]
	var qh []byte
	if fifth {
		qh, qs = qs[:32], qs[32:]
	}
	for i := range out {
		n, j := i/64*64, i%32
		high := i%64 >= 32 // the second 32 of a 64: the high nibbles
		code := qs[n/2+j] & 15
		if high {
			code = qs[n/2+j] >> 4
		}
		if fifth {
			bit := n / 32
			if high {
				bit++
			}
			code |= qh[j] >> bit & 1 << 4
		}
		sc, m := scaleMinK4(i/32, scales)
		out[i] = float32(d*float32(sc)*float32(code)) - float32(dmin*float32(m))
	}
}

func decodeQ6K(out []float32, blk []byte) {
	ql, qh, sc := blk[:128], blk[128:192], blk[192:208]
	d := half.FromF16(binary.LittleEndian.Uint16(blk[208:]))
	for i := range out {
		n, r := i/128*128, i%128
		l, quarter := r%32, r/32 // value n + 32·quarter + l
		lo := ql[n/2+l+32*(quarter%2)]
		if quarter >= 2 {
			lo >>= 4
		}
		code := int(lo&15) | int(qh[n/4+l]>>(2*quarter)&3)<<4
		out[i] = d * float32(int8(sc[i/16])) * float32(code-32)
	}
}
