package trainer

import (
	"math"
	"runtime"
	"sync"

	"gonum.org/v1/gonum/blas"
	"gonum.org/v1/gonum/blas/blas32"

	"gemmaft/packer"
)

// The operations of the CPU reference backend. Each is one plain function
// over row-major float32 slices that a GPU kernel can mirror and be tested
// against. Work is split over goroutines by output rows so that every
// output element is always summed in the same order: results do not depend
// on the number of cores, which keeps training bit-for-bit reproducible.

// parallelFor runs f over [0, n) split into contiguous ranges.
func parallelFor(n int, f func(lo, hi int)) {
	workers := min(runtime.GOMAXPROCS(0), n)
	if workers <= 1 {
		if n > 0 {
			f(0, n)
		}
		return
	}
	var wg sync.WaitGroup
	step := (n + workers - 1) / workers
	for lo := 0; lo < n; lo += step {
		hi := min(lo+step, n)
		wg.Add(1)
		go func() {
			defer wg.Done()
			f(lo, hi)
		}()
	}
	wg.Wait()
}

// dot is a float32 dot product with four partial sums.
func dot(a, b []float32) float32 {
	b = b[:len(a)]
	var s0, s1, s2, s3 float32
	i := 0
	for ; i+4 <= len(a); i += 4 {
		s0 += a[i] * b[i]
		s1 += a[i+1] * b[i+1]
		s2 += a[i+2] * b[i+2]
		s3 += a[i+3] * b[i+3]
	}
	for ; i < len(a); i++ {
		s0 += a[i] * b[i]
	}
	return (s0 + s1) + (s2 + s3)
}

// axpy computes y += alpha x.
func axpy(y []float32, alpha float32, x []float32) {
	x = x[:len(y)]
	for i := range y {
		y[i] += alpha * x[i]
	}
}

// The matrix products run on the AVX2 kernels of kernels_amd64.s where the
// shapes allow (Matmul with an inner size divisible by 8, the lm_head's
// backward) and otherwise on gonum's float32 BLAS (blocked, with SIMD inner
// kernels). Both compute each output element in a fixed order and choose
// how to split the work from the shapes alone, so results do not depend on
// the number of cores.

func general(rows, cols int, data []float32) blas32.General {
	return blas32.General{Rows: rows, Cols: cols, Stride: cols, Data: data[:rows*cols]}
}

// Matmul computes out[T×N] = x[T×K] · wᵀ with w stored [N×K] (a linear
// layer's weight), adding to out when accumulate is set.
func Matmul(out, x, w []float32, T, N, K int, accumulate bool) {
	if hasFMA && K%8 == 0 {
		matmulNT(out, x, w, T, N, K, accumulate)
		return
	}
	beta := float32(0)
	if accumulate {
		beta = 1
	}
	blas32.Gemm(blas.NoTrans, blas.Trans, 1, general(T, K, x), general(N, K, w), beta, general(T, N, out))
}

// backwardRows is how many rows of dx one MatmulBackwardInput task owns.
// gonum runs a product whose output is a single block serially, which for
// the lm_head's T×hidden gradient would use one core; fixed row groups
// spread it without making the result depend on the core count.
const backwardRows = 4

// MatmulBackwardInput adds dout[T×N] · w[N×K] to dx[T×K]: the gradient of
// Matmul with respect to its input.
func MatmulBackwardInput(dx, dout, w []float32, T, N, K int) {
	groups := (T + backwardRows - 1) / backwardRows
	parallelFor(groups, func(lo, hi int) {
		for g := lo; g < hi; g++ {
			t0, t1 := g*backwardRows, min((g+1)*backwardRows, T)
			blas32.Gemm(blas.NoTrans, blas.NoTrans, 1, general(t1-t0, N, dout[t0*N:]), general(N, K, w), 1, general(t1-t0, K, dx[t0*K:]))
		}
	})
}

// MatmulBackwardWeight adds scale · doutᵀ[N×T] · x[T×K] to dw[N×K]: the
// gradient of Matmul with respect to its weight.
func MatmulBackwardWeight(dw, dout, x []float32, T, N, K int, scale float32) {
	blas32.Gemm(blas.Trans, blas.NoTrans, scale, general(T, N, dout), general(T, K, x), 1, general(N, K, dw))
}

// RMSNorm normalises each of the T rows of x[T×D] to unit root mean square
// and multiplies by (1 + w), Gemma's convention. rstd receives each row's
// 1/sqrt(mean(x²) + eps) for the backward pass.
func RMSNorm(out, x, w []float32, rstd []float32, T, D int, eps float64) {
	parallelFor(T, func(lo, hi int) {
		for t := lo; t < hi; t++ {
			xr := x[t*D : (t+1)*D]
			var ss float64
			for _, v := range xr {
				ss += float64(v) * float64(v)
			}
			r := 1 / math.Sqrt(ss/float64(D)+eps)
			rstd[t] = float32(r)
			or := out[t*D : (t+1)*D]
			for i, v := range xr {
				or[i] = float32(float64(v) * r * (1 + float64(w[i])))
			}
		}
	})
}

// RMSNormBackward adds to dx the gradient of RMSNorm given dout, for a
// frozen weight w.
func RMSNormBackward(dx, dout, x, w, rstd []float32, T, D int) {
	parallelFor(T, func(lo, hi int) {
		for t := lo; t < hi; t++ {
			xr, dr, dxr := x[t*D:(t+1)*D], dout[t*D:(t+1)*D], dx[t*D:(t+1)*D]
			r := float64(rstd[t])
			var gx float64
			for i := range xr {
				gx += float64(dr[i]) * (1 + float64(w[i])) * float64(xr[i])
			}
			c := r * r * r * gx / float64(D)
			for i := range xr {
				g := float64(dr[i]) * (1 + float64(w[i]))
				dxr[i] += float32(r*g - c*float64(xr[i]))
			}
		}
	})
}

// RopeInvFreq returns the rotary inverse frequencies of one layer type,
// computed in float32 as transformers does: 1 / theta^(2i/d), divided by
// the linear scaling factor.
func RopeInvFreq(r Rope, headDim int) []float32 {
	out := make([]float32, headDim/2)
	for i := range out {
		e := float32(2*i) / float32(headDim)
		out[i] = 1 / float32(math.Pow(r.Theta, float64(e)))
		if r.Type == "linear" {
			out[i] /= float32(r.Factor)
		}
	}
	return out
}

// RopeTables returns cos and sin [T×headDim/2] of position·invFreq, the
// angle rounded to float32 as transformers computes it.
func RopeTables(pos []int32, invFreq []float32) (cos, sin []float32) {
	half := len(invFreq)
	cos = make([]float32, len(pos)*half)
	sin = make([]float32, len(pos)*half)
	for t, p := range pos {
		for i, f := range invFreq {
			a := float64(float32(p) * f)
			cos[t*half+i] = float32(math.Cos(a))
			sin[t*half+i] = float32(math.Sin(a))
		}
	}
	return cos, sin
}

// ApplyRope rotates each head of x[T×heads×headDim] in place, pairing element i
// with element i + headDim/2 (transformers' rotate_half layout). With
// inverse set it applies the transposed rotation: the backward pass.
func ApplyRope(x, cos, sin []float32, T, heads, headDim int, inverse bool) {
	half := headDim / 2
	parallelFor(T, func(lo, hi int) {
		for t := lo; t < hi; t++ {
			c, s := cos[t*half:(t+1)*half], sin[t*half:(t+1)*half]
			for h := 0; h < heads; h++ {
				v := x[(t*heads+h)*headDim : (t*heads+h+1)*headDim]
				for i := 0; i < half; i++ {
					a, b := v[i], v[i+half]
					si := s[i]
					if inverse {
						si = -si
					}
					v[i] = a*c[i] - b*si
					v[i+half] = b*c[i] + a*si
				}
			}
		}
	})
}

// AttentionSpans gives each query the first key it may see: the start of
// its own packed example, and for a sliding window w no key at or before
// i - w (a query at i sees keys j with i - w < j <= i).
func AttentionSpans(segStart []int32, window int) []int32 {
	lo := make([]int32, len(segStart))
	for i, s := range segStart {
		l := s
		if window > 0 && int32(i-window+1) > l {
			l = int32(i - window + 1)
		}
		lo[i] = l
	}
	return lo
}

// Attention computes causal attention of q[T×H×D] over k, v[T×KV×D] (query
// head h reads key head h/(H/KV)), where query i sees keys lo[i]..i.
// Probabilities are computed in float64; lse receives each (query, head)'s
// log-sum-exp of scaled scores for the backward pass.
func Attention(out, lse, q, k, v []float32, lo []int32, T, H, KV, D int, scale float64) {
	group := H / KV
	parallelFor(T, func(tlo, thi int) {
		scores := make([]float64, T)
		acc := make([]float64, D)
		for i := tlo; i < thi; i++ {
			for h := 0; h < H; h++ {
				g := h / group
				qi := q[(i*H+h)*D : (i*H+h+1)*D]
				m := math.Inf(-1)
				for j := int(lo[i]); j <= i; j++ {
					s := scale * float64(dot(qi, k[(j*KV+g)*D:(j*KV+g+1)*D]))
					scores[j] = s
					m = max(m, s)
				}
				var sum float64
				for j := int(lo[i]); j <= i; j++ {
					e := math.Exp(scores[j] - m)
					scores[j] = e
					sum += e
				}
				clear(acc)
				for j := int(lo[i]); j <= i; j++ {
					p := scores[j] / sum
					vj := v[(j*KV+g)*D : (j*KV+g+1)*D]
					for d := range acc {
						acc[d] += p * float64(vj[d])
					}
				}
				o := out[(i*H+h)*D : (i*H+h+1)*D]
				for d := range o {
					o[d] = float32(acc[d])
				}
				lse[i*H+h] = float32(m + math.Log(sum))
			}
		}
	})
}

// AttentionBackward adds the gradients of Attention to dq, dk, dv,
// recomputing probabilities from q, k and lse. Work is split by key head so
// each goroutine owns the dk, dv rows it writes.
func AttentionBackward(dq, dk, dv, dout, out, lse, q, k, v []float32, lo []int32, T, H, KV, D int, scale float64) {
	group := H / KV
	var wg sync.WaitGroup
	for g := 0; g < KV; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p := make([]float64, T)
			dkAcc := make([]float64, T*D)
			dvAcc := make([]float64, T*D)
			dqAcc := make([]float64, D)
			for h := g * group; h < (g+1)*group; h++ {
				for i := 0; i < T; i++ {
					qi := q[(i*H+h)*D : (i*H+h+1)*D]
					doi := dout[(i*H+h)*D : (i*H+h+1)*D]
					oi := out[(i*H+h)*D : (i*H+h+1)*D]
					l := float64(lse[i*H+h])
					var delta float64
					for d := range doi {
						delta += float64(doi[d]) * float64(oi[d])
					}
					clear(dqAcc)
					for j := int(lo[i]); j <= i; j++ {
						kj := k[(j*KV+g)*D : (j*KV+g+1)*D]
						vj := v[(j*KV+g)*D : (j*KV+g+1)*D]
						pj := math.Exp(scale*float64(dot(qi, kj)) - l)
						p[j] = pj
						dp := float64(dot(doi, vj))
						ds := pj * (dp - delta) * scale
						for d := 0; d < D; d++ {
							dqAcc[d] += ds * float64(kj[d])
							dkAcc[j*D+d] += ds * float64(qi[d])
							dvAcc[j*D+d] += pj * float64(doi[d])
						}
					}
					dqi := dq[(i*H+h)*D : (i*H+h+1)*D]
					for d := range dqi {
						dqi[d] += float32(dqAcc[d])
					}
				}
			}
			for j := 0; j < T; j++ {
				dkj := dk[(j*KV+g)*D : (j*KV+g+1)*D]
				dvj := dv[(j*KV+g)*D : (j*KV+g+1)*D]
				for d := 0; d < D; d++ {
					dkj[d] += float32(dkAcc[j*D+d])
					dvj[d] += float32(dvAcc[j*D+d])
				}
			}
		}()
	}
	wg.Wait()
}

const geluC = 0.7978845608028654 // sqrt(2/pi)

// GeGLU computes out = gelu_tanh(gate) · up elementwise.
func GeGLU(out, gate, up []float32) {
	parallelFor(len(out), func(lo, hi int) {
		for i := lo; i < hi; i++ {
			x := float64(gate[i])
			th := math.Tanh(geluC * (x + 0.044715*x*x*x))
			out[i] = float32(0.5 * x * (1 + th) * float64(up[i]))
		}
	})
}

// GeGLUBackward writes the gradients of GeGLU into dgate and dup.
func GeGLUBackward(dgate, dup, dout, gate, up []float32) {
	parallelFor(len(dout), func(lo, hi int) {
		for i := lo; i < hi; i++ {
			x := float64(gate[i])
			u := geluC * (x + 0.044715*x*x*x)
			th := math.Tanh(u)
			g := 0.5 * x * (1 + th)
			dg := 0.5*(1+th) + 0.5*x*(1-th*th)*geluC*(1+3*0.044715*x*x)
			d := float64(dout[i])
			dgate[i] = float32(d * float64(up[i]) * dg)
			dup[i] = float32(d * g)
		}
	})
}

// Embed gathers rows of table[V×D] for ids and multiplies them by scale.
func Embed(out, table []float32, ids []int32, D int, scale float32) {
	for t, id := range ids {
		row := table[int(id)*D : (int(id)+1)*D]
		o := out[t*D : (t+1)*D]
		for i, v := range row {
			o[i] = v * scale
		}
	}
}

// IgnoreIndex marks a label that is not trained, as in PyTorch; the packer
// owns the convention and writes it into packed rows.
const IgnoreIndex = packer.IgnoreIndex

// lossChunk is how many tokens' logits over the vocabulary are held at once.
const lossChunk = 128

// LMHeadLoss computes, for hidden states h[T×D] after the final norm, the
// logits h·Eᵀ over the tied embedding E[V×D] and returns the sum of
// cross-entropies over tokens whose target is not IgnoreIndex, with their
// count. When dh is not nil it adds to it the gradient of sum/normalizer
// with respect to h. Only trained positions are computed, lossChunk of them
// at a time, so memory holds lossChunk×V logits whatever the batch.
func LMHeadLoss(h, E []float32, targets []int32, T, V, D int, normalizer float64, dh []float32) (sum float64, count int) {
	var rows []int
	for t := 0; t < T; t++ {
		if targets[t] != IgnoreIndex {
			rows = append(rows, t)
		}
	}
	buf := getScratch(lossChunk * V)
	defer scratch.Put(buf)
	logits := (*buf)[:lossChunk*V]
	hc := make([]float32, lossChunk*D)
	dhc := make([]float32, lossChunk*D)
	rowLoss := make([]float64, lossChunk)
	for c0 := 0; c0 < len(rows); c0 += lossChunk {
		chunk := rows[c0:min(c0+lossChunk, len(rows))]
		n := len(chunk)
		for r, t := range chunk {
			copy(hc[r*D:(r+1)*D], h[t*D:(t+1)*D])
		}
		lmHeadLogits(logits[:n*V], hc[:n*D], E, n, V, D)
		parallelFor(n, func(lo, hi int) {
			for r := lo; r < hi; r++ {
				row := logits[r*V : (r+1)*V]
				tgt := targets[chunk[r]]
				mx := row[0]
				for _, v := range row {
					if v > mx {
						mx = v
					}
				}
				m := float64(mx)
				target := float64(row[tgt])
				// One exp per logit: keep exp(v - max) in the row, then
				// scale it into the gradient (softmax - onehot)/normalizer.
				s := expShift(row, mx)
				rowLoss[r] = m + math.Log(s) - target
				if dh == nil {
					continue
				}
				inv := float32(1 / (s * normalizer))
				for i := range row {
					row[i] *= inv
				}
				row[tgt] -= float32(1 / normalizer)
			}
		})
		for r := 0; r < n; r++ {
			sum += rowLoss[r]
		}
		count += n
		if dh != nil {
			clear(dhc[:n*D])
			lmHeadBackward(dhc[:n*D], logits[:n*V], E, n, V, D)
			for r, t := range chunk {
				axpy(dh[t*D:(t+1)*D], 1, dhc[r*D:(r+1)*D])
			}
		}
	}
	return sum, count
}

// lmHeadLogits computes logits[n×V] = h[n×D]·Eᵀ, the product that dominates
// training a small model over Gemma's 262k vocabulary.
func lmHeadLogits(logits, h, E []float32, n, V, D int) {
	Matmul(logits, h, E, n, V, D, false)
}

// matmulNT is Matmul on the AVX2 kernel dotStrip2x4: jobs are (block of 512
// rows of w, pair of rows of x), numbered block-major so a goroutine's run
// of jobs reuses each block of w from cache (for the lm_head each block of
// the embedding is read from memory once per chunk of tokens). Which code
// computes an element depends only on its position, never on the number of
// cores.
func matmulNT(out, x, w []float32, T, N, K int, accumulate bool) {
	const nBlock = 512
	blocks, pairs := (N+nBlock-1)/nBlock, (T+1)/2
	parallelFor(blocks*pairs, func(lo, hi int) {
		tmp := make([]float32, 2*nBlock)
		for job := lo; job < hi; job++ {
			b, p := job/pairs, job%pairs
			n0, n1 := b*nBlock, min((b+1)*nBlock, N)
			t0, t1 := 2*p, min(2*p+1, T-1)
			r0, r1 := tmp[:n1-n0], tmp[nBlock:nBlock+n1-n0]
			direct := !accumulate && t1 != t0
			if direct {
				r0, r1 = out[t0*N+n0:t0*N+n1], out[t1*N+n0:t1*N+n1]
			}
			n4 := (n1 - n0) &^ 3
			if n4 > 0 {
				dotStrip2x4(&x[t0*K], &x[t1*K], &w[n0*K], K, n4, &r0[0], &r1[0])
			}
			for n := n0 + n4; n < n1; n++ {
				r0[n-n0] = dot(x[t0*K:(t0+1)*K], w[n*K:(n+1)*K])
				r1[n-n0] = dot(x[t1*K:(t1+1)*K], w[n*K:(n+1)*K])
			}
			if direct {
				continue
			}
			for i, t := range []int{t0, t1} {
				if i == 1 && t1 == t0 {
					break
				}
				row, res := out[t*N+n0:t*N+n1], r0
				if i == 1 {
					res = r1
				}
				if accumulate {
					for j, v := range res {
						row[j] += v
					}
				} else {
					copy(row, res)
				}
			}
		}
	})
}

// lmHeadBackward adds g[n×V]·E[V×D] to dh[n×D], the lm_head's input
// gradient, with the AVX2 kernel when D is a multiple of 64 (every Gemma 3
// width is). Each element is summed over the vocabulary in order.
func lmHeadBackward(dh, g, E []float32, n, V, D int) {
	if !hasFMA || D%64 != 0 {
		MatmulBackwardInput(dh, g, E, n, V, D)
		return
	}
	const vBlock = 256
	parallelFor(n, func(lo, hi int) {
		for v0 := 0; v0 < V; v0 += vBlock {
			nb := min(vBlock, V-v0)
			for r := lo; r < hi; r++ {
				axpyRows64(&g[r*V+v0], &E[v0*D], D, nb, &dh[r*D])
			}
		}
	})
}

// scratch recycles the lm_head's logits buffers (lossChunk × vocabulary
// floats, 128 MiB for Gemma's vocabulary) between calls; every element is
// written before it is read, so reused memory needs no clearing.
var scratch sync.Pool

func getScratch(n int) *[]float32 {
	if b, ok := scratch.Get().(*[]float32); ok && cap(*b) >= n {
		*b = (*b)[:n]
		return b
	}
	b := make([]float32, n)
	return &b
}

// expShift replaces each x by exp(x - shift) and returns their sum. With
// AVX2 it uses the float32 kernel expBlock (about 1 ulp) on blocks of 1024,
// summing the blocks' float32 sums in float64; otherwise math.Exp.
func expShift(x []float32, shift float32) float64 {
	var s float64
	i := 0
	if hasFMA {
		const block = 1024
		for ; i+block <= len(x); i += block {
			s += float64(expBlock(&x[i], block, shift))
		}
		if n8 := (len(x) - i) &^ 7; n8 > 0 {
			s += float64(expBlock(&x[i], n8, shift))
			i += n8
		}
	}
	for ; i < len(x); i++ {
		e := math.Exp(float64(x[i]) - float64(shift))
		s += e
		x[i] = float32(e)
	}
	return s
}
