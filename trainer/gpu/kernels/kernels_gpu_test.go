package kernels

// Each kernel against the CPU reference operation it replaces, on fresh
// random inputs of several shapes (odd sizes and Gemma 3's real widths),
// in both precisions. Inputs are rounded to the activation type first, so
// the reference sees exactly what the kernel sees; the float32 results must
// match within float32 rounding, the bfloat16 ones within bfloat16
// rounding of the output. The weight and optimizer kernels must match bit
// for bit. Every test skips without a GPU.

import (
	"bytes"
	"cmp"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"

	"gemmaft/cuda"
	"gemmaft/cuda/cudatest"
	"gemmaft/internal/half"
	"gemmaft/trainer"
	"gemmaft/trainer/safetensors"
)

var (
	loadedMu sync.Mutex
	loaded   = map[[2]int]*Kernels{}
)

// kernelsFor returns the kernels of a precision and head dimension, loaded
// once per test binary.
func kernelsFor(t testing.TB, p Precision, headDim int) *Kernels {
	t.Helper()
	dev := cudatest.Device(t)
	loadedMu.Lock()
	defer loadedMu.Unlock()
	key := [2]int{int(p), headDim}
	if k := loaded[key]; k != nil {
		return k
	}
	var k *Kernels
	if err := dev.Do(func(c *cuda.Ctx) error {
		var err error
		k, err = Load(c, p, headDim)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	loaded[key] = k
	return k
}

var precisions = []Precision{F32, BF16}

// tol is the tolerance of a result of precision p whose elements each sum
// about n terms.
func tol(p Precision, n int) cudatest.Tolerance {
	if p == BF16 {
		return cudatest.Tolerance{Name: "bfloat16 output", Rel: 8e-3}
	}
	return cudatest.Tolerance{Name: fmt.Sprintf("float32 sum of %d terms", n), Rel: 2e-6 * math.Max(1, math.Sqrt(float64(n)/16))}
}

// roundAct rounds values to what activations of p store.
func roundAct(p Precision, v []float32) []float32 {
	if p == BF16 {
		for i := range v {
			v[i] = half.FromBF16(half.BF16(v[i]))
		}
	}
	return v
}

// dev is a test's device memory: buffers it allocates are freed at the end.
type dev struct {
	t    *testing.T
	c    *cuda.Ctx
	k    *Kernels
	bufs []cuda.Buffer
}

func run(t *testing.T, k *Kernels, f func(d *dev) error) {
	t.Helper()
	cudatest.Do(t, func(c *cuda.Ctx) error {
		d := &dev{t: t, c: c, k: k}
		defer func() {
			for _, b := range d.bufs {
				c.Free(b)
			}
		}()
		if err := f(d); err != nil {
			return err
		}
		return c.Synchronize()
	})
}

func (d *dev) alloc(n int64) cuda.DevicePtr {
	b, err := d.c.Alloc(max(n, 1))
	if err != nil {
		panic(err)
	}
	d.bufs = append(d.bufs, b)
	if err := cudatest.Poison(d.c, b); err != nil {
		panic(err)
	}
	return b.Ptr
}

// act uploads v as activations.
func (d *dev) act(v []float32) cuda.DevicePtr {
	p := d.alloc(int64(len(v)) * d.k.Prec.Size())
	var err error
	if d.k.Prec == BF16 {
		err = cuda.Upload(d.c, p, half.BF16s(v))
	} else {
		err = cuda.Upload(d.c, p, v)
	}
	if err != nil {
		panic(err)
	}
	return p
}

func (d *dev) f32(v []float32) cuda.DevicePtr {
	p := d.alloc(4 * int64(len(v)))
	if err := cuda.Upload(d.c, p, v); err != nil {
		panic(err)
	}
	return p
}

// u8 uploads bytes (NF4 codes, absmax codes).
func (d *dev) u8(v []byte) cuda.DevicePtr {
	p := d.alloc(int64(len(v)))
	if err := cuda.Upload(d.c, p, v); err != nil {
		panic(err)
	}
	return p
}

func (d *dev) i32(v []int32) cuda.DevicePtr {
	p := d.alloc(4 * int64(len(v)))
	if err := cuda.Upload(d.c, p, v); err != nil {
		panic(err)
	}
	return p
}

// readAct and readF32 download n values.
func (d *dev) readAct(p cuda.DevicePtr, n int) []float32 {
	if d.k.Prec == BF16 {
		h := make([]uint16, n)
		if err := cuda.Download(d.c, h, p); err != nil {
			panic(err)
		}
		return half.FromBF16s(h)
	}
	return d.readF32(p, n)
}

func (d *dev) readF32(p cuda.DevicePtr, n int) []float32 {
	h := make([]float32, n)
	if err := cuda.Download(d.c, h, p); err != nil {
		panic(err)
	}
	return h
}

func (d *dev) check(what string, got, want []float32, tl cudatest.Tolerance) {
	d.t.Helper()
	r, err := cudatest.Compare(cudatest.F64(got), cudatest.F64(want), tl)
	if err != nil {
		d.t.Errorf("%s: %v", what, err)
		return
	}
	d.t.Logf("%s: relative error %.3g", what, r.RelErr)
}

func uniform(rng *rand.Rand, n int, scale float64) []float32 { return cudatest.Uniform(rng, n, scale) }

func TestRMSNorm(t *testing.T) {
	for _, p := range precisions {
		k := kernelsFor(t, p, 256)
		for _, sh := range [][2]int{{7, 32}, {33, 1152}, {5, 3840}, {3, 5376}, {4, 100}} {
			rows, cols := sh[0], sh[1]
			t.Run(fmt.Sprintf("%s/%dx%d", p, rows, cols), func(t *testing.T) {
				rng := cudatest.Rand(t)
				x := roundAct(p, uniform(rng, rows*cols, 2))
				res := roundAct(p, uniform(rng, rows*cols, 1))
				w := uniform(rng, cols, 0.5)
				dy := uniform(rng, rows*cols, 1)
				prev := uniform(rng, rows*cols, 1)
				eps := 1e-6
				want, rstd := make([]float32, rows*cols), make([]float32, rows)
				trainer.RMSNorm(want, x, w, rstd, rows, cols, eps)
				wantRes := make([]float32, rows*cols)
				for i := range wantRes {
					wantRes[i] = res[i] + want[i]
				}
				dx := make([]float32, rows*cols)
				trainer.RMSNormBackward(dx, dy, x, w, rstd, rows, cols)
				dxRes := append([]float32(nil), prev...)
				trainer.RMSNormBackward(dxRes, dy, x, w, rstd, rows, cols)
				run(t, k, func(d *dev) error {
					xp, wp, resp := d.act(x), d.f32(w), d.act(res)
					out, out2, rs := d.alloc(int64(rows*cols)*p.Size()), d.alloc(int64(rows*cols)*p.Size()), d.alloc(4*int64(rows))
					if err := k.RMSNorm(d.c, xp, wp, 0, out, rs, rows, cols, eps); err != nil {
						return err
					}
					if err := k.RMSNorm(d.c, xp, wp, resp, out2, rs, rows, cols, eps); err != nil {
						return err
					}
					d.check("forward", d.readAct(out, rows*cols), want, tol(p, cols))
					d.check("forward with residual", d.readAct(out2, rows*cols), wantRes, tol(p, cols))
					d.check("rstd", d.readF32(rs, rows), rstd, tol(F32, cols))
					// The pair is RMSNorm with a residual and RMSNorm again on
					// the stored result, bit for bit.
					w2p := d.f32(uniform(rng, cols, 0.5))
					twice, rs2 := d.alloc(int64(rows*cols)*p.Size()), d.alloc(4*int64(rows))
					if err := k.RMSNorm(d.c, out2, w2p, 0, twice, rs2, rows, cols, eps); err != nil {
						return err
					}
					mid, pair, prs1, prs2 := d.alloc(int64(rows*cols)*p.Size()), d.alloc(int64(rows*cols)*p.Size()), d.alloc(4*int64(rows)), d.alloc(4*int64(rows))
					if err := k.RMSNormPair(d.c, xp, wp, resp, mid, prs1, w2p, pair, prs2, rows, cols, eps); err != nil {
						return err
					}
					if !slices.Equal(d.readAct(mid, rows*cols), d.readAct(out2, rows*cols)) || !slices.Equal(d.readAct(pair, rows*cols), d.readAct(twice, rows*cols)) ||
						!slices.Equal(d.readF32(prs1, rows), d.readF32(rs, rows)) || !slices.Equal(d.readF32(prs2, rows), d.readF32(rs2, rows)) {
						return fmt.Errorf("RMSNormPair differs from RMSNorm twice")
					}
					dyp := d.f32(dy)
					dxa, dxf := d.alloc(int64(rows*cols)*p.Size()), d.f32(prev)
					if err := k.RMSNormBackwardAct(d.c, dyp, xp, wp, rs, dxa, rows, cols); err != nil {
						return err
					}
					if err := k.RMSNormBackwardF32(d.c, dyp, xp, wp, rs, dxf, dxf, rows, cols); err != nil {
						return err
					}
					d.check("backward", d.readAct(dxa, rows*cols), dx, tol(p, cols))
					d.check("backward plus residual gradient", d.readF32(dxf, rows*cols), dxRes, tol(F32, cols))
					return nil
				})
			})
		}
	}
}

func TestQKNormRope(t *testing.T) {
	for _, p := range precisions {
		k := kernelsFor(t, p, 256)
		// 6 and 512 take the kernels' element forms, the rest their vector
		// forms (and 6 F32ToActRows' element form).
		for _, dim := range []int{6, 8, 16, 128, 256, 512} {
			t.Run(fmt.Sprintf("%s/head_dim_%d", p, dim), func(t *testing.T) {
				rng := cudatest.Rand(t)
				tokens := 37
				pos := make([]int32, tokens)
				for i := range pos {
					pos[i] = int32(rng.IntN(5000))
				}
				cos, sin := trainer.RopeTables(pos, trainer.RopeInvFreq(trainer.Rope{Theta: 1e6, Type: "linear", Factor: 8}, dim))
				// One side as the host computes it: the norm, then RoPE.
				type side struct {
					heads                int
					x, w, want, rstd, dy []float32
				}
				newSide := func(heads int) side {
					n := tokens * heads * dim
					sd := side{heads: heads, x: roundAct(p, uniform(rng, n, 2)), w: uniform(rng, dim, 0.5), dy: uniform(rng, n, 1)}
					sd.want, sd.rstd = make([]float32, n), make([]float32, tokens*heads)
					trainer.RMSNorm(sd.want, sd.x, sd.w, sd.rstd, tokens*heads, dim, 1e-6)
					trainer.ApplyRope(sd.want, cos, sin, tokens, heads, dim, false)
					return sd
				}
				q, kv := newSide(3), newSide(2)
				backward := func(sd side) []float32 {
					g := append([]float32(nil), sd.dy...)
					trainer.ApplyRope(g, cos, sin, tokens, sd.heads, dim, true)
					dx := make([]float32, len(sd.x))
					trainer.RMSNormBackward(dx, g, sd.x, sd.w, sd.rstd, tokens*sd.heads, dim)
					return dx
				}
				dxq, dxk := backward(q), backward(kv)
				dv := uniform(rng, tokens*kv.heads*dim, 1)
				run(t, k, func(d *dev) error {
					cp, sp := d.f32(cos), d.f32(sin)
					on := func(sd side) Heads {
						n := len(sd.x)
						return Heads{X: d.act(sd.x), W: d.f32(sd.w), Out: d.alloc(int64(n) * p.Size()), Rstd: d.alloc(4 * int64(tokens*sd.heads)), Heads: sd.heads}
					}
					qh, kh := on(q), on(kv)
					if err := k.QKNormRope(d.c, qh, kh, cp, sp, tokens, dim, 1e-6); err != nil {
						return err
					}
					d.check("forward q", d.readAct(qh.Out, len(q.x)), q.want, tol(p, dim))
					d.check("forward k", d.readAct(kh.Out, len(kv.x)), kv.want, tol(p, dim))
					// The gradients packed, and side by side in one matrix as
					// the projections' GEMM reads them (q, k, then v,
					// converted by F32ToActRows), its rows ld apart.
					ld := (q.heads + 2*kv.heads) * dim
					columns := func(m []float32, from, n int) []float32 {
						out := make([]float32, 0, tokens*n)
						for tok := 0; tok < tokens; tok++ {
							out = append(out, m[tok*ld+from:tok*ld+from+n]...)
						}
						return out
					}
					grad := func(sd side, h Heads, dx cuda.DevicePtr, ld int) HeadsGrad {
						return HeadsGrad{DY: d.f32(sd.dy), X: h.X, W: h.W, Rstd: h.Rstd, DX: dx, Heads: sd.heads, LD: ld}
					}
					dqp, dkp := d.alloc(int64(len(q.x))*p.Size()), d.alloc(int64(len(kv.x))*p.Size())
					if err := k.QKNormRopeBackward(d.c, grad(q, qh, dqp, 0), grad(kv, kh, dkp, 0), cp, sp, tokens, dim); err != nil {
						return err
					}
					d.check("backward q, packed", d.readAct(dqp, len(q.x)), dxq, tol(p, dim))
					d.check("backward k, packed", d.readAct(dkp, len(kv.x)), dxk, tol(p, dim))
					m := d.alloc(int64(tokens*ld) * p.Size())
					at := func(col int) cuda.DevicePtr { return m.Add(int64(col) * p.Size()) }
					if err := k.QKNormRopeBackward(d.c, grad(q, qh, at(0), ld), grad(kv, kh, at(q.heads*dim), ld), cp, sp, tokens, dim); err != nil {
						return err
					}
					if err := k.F32ToActRows(d.c, d.f32(dv), at((q.heads+kv.heads)*dim), tokens, kv.heads*dim, ld); err != nil {
						return err
					}
					all := d.readAct(m, tokens*ld)
					d.check("backward q, side by side", columns(all, 0, q.heads*dim), dxq, tol(p, dim))
					d.check("backward k, side by side", columns(all, q.heads*dim, kv.heads*dim), dxk, tol(p, dim))
					d.check("v converted, side by side", columns(all, (q.heads+kv.heads)*dim, kv.heads*dim), roundAct(p, dv), cudatest.Tolerance{Name: "exact"})
					return nil
				})
			})
		}
	}
}

// segmentStarts lays out examples of the given lengths end to end.
func segmentStarts(lengths ...int) []int32 {
	var out []int32
	start := 0
	for _, l := range lengths {
		for j := 0; j < l; j++ {
			out = append(out, int32(start))
		}
		start += l
	}
	return out
}

func lastQueries(lo []int32) []int32 {
	hi := make([]int32, len(lo))
	for j := range hi {
		for i := len(lo) - 1; i >= 0; i-- {
			if int(lo[i]) <= j {
				hi[j] = int32(i)
				break
			}
		}
	}
	return hi
}

func TestAttention(t *testing.T) {
	type shape struct {
		dim, heads, kv, window int
		segs                   []int
	}
	shapes := []shape{
		{8, 4, 2, 0, []int{20, 30, 17}}, {8, 4, 2, 5, []int{20, 30, 17}},
		{16, 4, 1, 3, []int{9, 40}}, {128, 4, 2, 0, []int{33, 70}},
		{256, 2, 1, 0, []int{45, 3, 51}}, {256, 4, 2, 7, []int{45, 3, 51}},
		{256, 2, 1, 64, []int{300}}, {128, 2, 2, 0, []int{1, 1, 1, 129}},
	}
	for _, p := range precisions {
		for _, sh := range shapes {
			k := kernelsFor(t, p, sh.dim)
			t.Run(fmt.Sprintf("%s/d%d_h%d_kv%d_w%d_%v", p, sh.dim, sh.heads, sh.kv, sh.window, sh.segs), func(t *testing.T) {
				rng := cudatest.Rand(t)
				seg := segmentStarts(sh.segs...)
				T, H, KV, D := len(seg), sh.heads, sh.kv, sh.dim
				lo := trainer.AttentionSpans(seg, sh.window)
				hi := lastQueries(lo)
				q := roundAct(p, uniform(rng, T*H*D, 1))
				kk := roundAct(p, uniform(rng, T*KV*D, 1))
				v := roundAct(p, uniform(rng, T*KV*D, 1))
				dout := uniform(rng, T*H*D, 1)
				scale := 1 / math.Sqrt(float64(D))
				out, lse := make([]float32, T*H*D), make([]float32, T*H)
				trainer.Attention(out, lse, q, kk, v, lo, T, H, KV, D, scale)
				dq, dk, dv := make([]float32, T*H*D), make([]float32, T*KV*D), make([]float32, T*KV*D)
				trainer.AttentionBackward(dq, dk, dv, dout, out, lse, q, kk, v, lo, T, H, KV, D, scale)
				// bf16 runs both kernels: CUDA cores, whose dV sums float32
				// products, and tensor cores, which round P and dO to bf16.
				modes := map[Precision][]string{F32: {""}, BF16: {"cuda-cores", "tensor-cores"}}[p]
				for _, mode := range modes {
					t.Setenv("PIPELINE_ATTENTION", mode)
					run(t, k, func(d *dev) error {
						qp, kp, vp, lop, hip := d.act(q), d.act(kk), d.act(v), d.i32(lo), d.i32(hi)
						doutp := d.f32(dout)
						if got, want := k.TensorCoreAttention(qp, kp, vp, doutp), mode == "tensor-cores" && D%16 == 0; got != want {
							t.Errorf("PIPELINE_ATTENTION=%q, head dimension %d: tensor-core backward %v, want %v", mode, D, got, want)
						}
						op, lp := d.alloc(int64(T*H*D)*p.Size()), d.alloc(4*int64(T*H))
						if err := k.Attention(d.c, qp, kp, vp, lop, op, lp, T, H, KV, scale); err != nil {
							return err
						}
						d.check(mode+" out", d.readAct(op, T*H*D), out, tol(p, T))
						d.check(mode+" lse", d.readF32(lp, T*H), lse, tol(F32, T))
						dqp, dkp, dvp, delta := d.alloc(4*int64(T*H*D)), d.alloc(4*int64(T*KV*D)), d.alloc(4*int64(T*KV*D)), d.alloc(4*int64(T*H))
						if err := k.AttentionBackward(d.c, qp, kp, vp, doutp, lp, lop, hip, delta, dqp, dkp, dvp, T, H, KV, scale); err != nil {
							return err
						}
						bt, vt := tol(p, T*D), tol(F32, T)
						if mode == "tensor-cores" {
							vt = bt
						}
						d.check(mode+" dq", d.readF32(dqp, T*H*D), dq, bt)
						d.check(mode+" dk", d.readF32(dkp, T*KV*D), dk, bt)
						d.check(mode+" dv", d.readF32(dvp, T*KV*D), dv, vt)
						return nil
					})
				}
			})
		}
	}
}

// TestTensorCoreAttention: the tensor-core kernels, forward and backward, against the CUDA-core ones and the float64 reference at
// the lengths and windows of real rows: a 4096-token row of examples of
// 100 to 1,500 tokens, on global and sliding (1,024) layers, with Gemma's
// head dimensions and grouped heads.
func TestTensorCoreAttention(t *testing.T) {
	for _, sh := range []struct{ dim, heads, kv, window int }{{256, 8, 4, 0}, {256, 8, 4, 1024}, {128, 4, 2, 1024}} {
		k := kernelsFor(t, BF16, sh.dim)
		t.Run(fmt.Sprintf("d%d_h%d_kv%d_w%d", sh.dim, sh.heads, sh.kv, sh.window), func(t *testing.T) {
			rng := cudatest.Rand(t)
			var lens []int
			for n := 0; n < 4096; {
				l := min(100+rng.IntN(1400), 4096-n)
				lens, n = append(lens, l), n+l
			}
			seg := segmentStarts(lens...)
			T, H, KV, D := len(seg), sh.heads, sh.kv, sh.dim
			lo := trainer.AttentionSpans(seg, sh.window)
			q := roundAct(BF16, uniform(rng, T*H*D, 1))
			kk := roundAct(BF16, uniform(rng, T*KV*D, 1))
			v := roundAct(BF16, uniform(rng, T*KV*D, 1))
			scale := 1 / math.Sqrt(float64(D))
			out, lse := make([]float32, T*H*D), make([]float32, T*H)
			trainer.Attention(out, lse, q, kk, v, lo, T, H, KV, D, scale)
			dout := uniform(rng, T*H*D, 1)
			dq, dk, dv := make([]float32, T*H*D), make([]float32, T*KV*D), make([]float32, T*KV*D)
			trainer.AttentionBackward(dq, dk, dv, dout, out, lse, q, kk, v, lo, T, H, KV, D, scale)
			hi := lastQueries(lo)
			run(t, k, func(d *dev) error {
				qp, kp, vp, lop := d.act(q), d.act(kk), d.act(v), d.i32(lo)
				t.Setenv("PIPELINE_ATTENTION", "")
				if !k.TensorCoreAttention(qp, kp, vp) {
					t.Fatal("the tensor-core kernel is not the default for bf16 activations")
				}
				var outs [2][]float32
				for i, mode := range []string{"tensor-cores", "cuda-cores"} {
					t.Setenv("PIPELINE_ATTENTION", mode)
					op, lp := d.alloc(int64(T*H*D)*2), d.alloc(4*int64(T*H))
					if err := k.Attention(d.c, qp, kp, vp, lop, op, lp, T, H, KV, scale); err != nil {
						return err
					}
					outs[i] = d.readAct(op, T*H*D)
					d.check(mode+" out", outs[i], out, tol(BF16, T))
					d.check(mode+" lse", d.readF32(lp, T*H), lse, tol(F32, T))
				}
				d.check("tensor cores vs CUDA cores", outs[0], outs[1], tol(BF16, T))

				// The backward pass, both ways, from the same forward.
				op, lp := d.alloc(int64(T*H*D)*2), d.alloc(4*int64(T*H))
				if err := k.Attention(d.c, qp, kp, vp, lop, op, lp, T, H, KV, scale); err != nil {
					return err
				}
				doutp, hip := d.f32(dout), d.i32(hi)
				var grads [2][3][]float32
				for i, mode := range []string{"tensor-cores", "cuda-cores"} {
					t.Setenv("PIPELINE_ATTENTION", mode)
					dqp, dkp, dvp, delta := d.alloc(4*int64(T*H*D)), d.alloc(4*int64(T*KV*D)), d.alloc(4*int64(T*KV*D)), d.alloc(4*int64(T*H))
					if err := k.AttentionBackward(d.c, qp, kp, vp, doutp, lp, lop, hip, delta, dqp, dkp, dvp, T, H, KV, scale); err != nil {
						return err
					}
					grads[i] = [3][]float32{d.readF32(dqp, T*H*D), d.readF32(dkp, T*KV*D), d.readF32(dvp, T*KV*D)}
					for j, want := range [][]float32{dq, dk, dv} {
						d.check(fmt.Sprintf("%s d%c", mode, "qkv"[j]), grads[i][j], want, tol(BF16, T*D))
					}
				}
				for j := range 3 {
					d.check(fmt.Sprintf("d%c: tensor cores vs CUDA cores", "qkv"[j]), grads[0][j], grads[1][j], tol(BF16, T*D))
				}
				return nil
			})
		})
	}
}

func TestGeGLU(t *testing.T) {
	for _, p := range precisions {
		k := kernelsFor(t, p, 256)
		// Whole 16-byte vectors take the vector kernels; an odd count the
		// one-element ones.
		for _, n := range []int{100003, 100000} {
			t.Run(fmt.Sprintf("%s/%d", p, n), func(t *testing.T) {
				rng := cudatest.Rand(t)
				gate := roundAct(p, uniform(rng, n, 5))
				up := roundAct(p, uniform(rng, n, 2))
				dout := uniform(rng, n, 1)
				want := make([]float32, n)
				trainer.GeGLU(want, gate, up)
				dg, du := make([]float32, n), make([]float32, n)
				trainer.GeGLUBackward(dg, du, dout, gate, up)
				run(t, k, func(d *dev) error {
					gp, upp := d.act(gate), d.act(up)
					out := d.alloc(int64(n) * p.Size())
					if err := k.GeGLU(d.c, gp, upp, out, int64(n)); err != nil {
						return err
					}
					d.check("forward", d.readAct(out, n), want, tol(p, 1))
					// In place, as the backward pass runs it.
					if err := k.GeGLUBackward(d.c, d.f32(dout), gp, upp, gp, upp, int64(n)); err != nil {
						return err
					}
					d.check("dgate", d.readAct(gp, n), dg, tol(p, 4))
					d.check("dup", d.readAct(upp, n), du, tol(p, 4))
					return nil
				})
			})
		}
	}
}

func TestEmbedGatherScatter(t *testing.T) {
	for _, p := range precisions {
		k := kernelsFor(t, p, 256)
		t.Run(p.String(), func(t *testing.T) {
			rng := cudatest.Rand(t)
			V, D, T := 1000, 96, 77
			table := roundAct(p, uniform(rng, V*D, 1))
			ids := make([]int32, T)
			for i := range ids {
				ids[i] = int32(rng.IntN(V))
			}
			scale := half.RoundBF16(float32(math.Sqrt(float64(D))))
			want := make([]float32, T*D)
			trainer.Embed(want, table, ids, D, scale)
			roundAct(p, want)
			idx := []int32{5, 0, 76, 33}
			run(t, k, func(d *dev) error {
				out := d.alloc(int64(T*D) * p.Size())
				if err := k.Embed(d.c, d.i32(ids), d.act(table), scale, out, T, D); err != nil {
					return err
				}
				got := d.readAct(out, T*D)
				d.check("embed", got, want, cudatest.Tolerance{Name: "exact", Rel: 0})
				g := d.alloc(int64(len(idx)*D) * p.Size())
				if err := k.GatherRows(d.c, out, d.i32(idx), g, len(idx), D); err != nil {
					return err
				}
				rows := d.readAct(g, len(idx)*D)
				src := uniform(rng, len(idx)*D, 1)
				dst := make([]float32, T*D)
				dp := d.f32(dst)
				if err := k.ScatterRows(d.c, d.f32(src), d.i32(idx), dp, len(idx), D); err != nil {
					return err
				}
				back := d.readF32(dp, T*D)
				for r, i := range idx {
					for j := 0; j < D; j++ {
						if rows[r*D+j] != got[int(i)*D+j] {
							return fmt.Errorf("gather: row %d element %d: %v, want %v", r, j, rows[r*D+j], got[int(i)*D+j])
						}
						if back[int(i)*D+j] != src[r*D+j] {
							return fmt.Errorf("scatter: row %d element %d: %v, want %v", i, j, back[int(i)*D+j], src[r*D+j])
						}
					}
				}
				return nil
			})
		})
	}
}

func TestCrossEntropy(t *testing.T) {
	for _, p := range precisions {
		k := kernelsFor(t, p, 256)
		for _, V := range []int{1000, 262208} {
			t.Run(fmt.Sprintf("%s/vocab_%d", p, V), func(t *testing.T) {
				rng := cudatest.Rand(t)
				rows := 5
				logits := uniform(rng, rows*V, 8)
				targets := make([]int32, rows)
				for i := range targets {
					targets[i] = int32(rng.IntN(V))
				}
				normalizer := 37.0
				wantLoss := make([]float64, rows)
				wantGrad := make([]float32, rows*V)
				for r := 0; r < rows; r++ {
					row := logits[r*V : (r+1)*V]
					m := math.Inf(-1)
					for _, x := range row {
						m = math.Max(m, float64(x))
					}
					var s float64
					for _, x := range row {
						s += math.Exp(float64(x) - m)
					}
					wantLoss[r] = m + math.Log(s) - float64(row[targets[r]])
					for j, x := range row {
						g := math.Exp(float64(x)-m) / s / normalizer
						if j == int(targets[r]) {
							g -= 1 / normalizer
						}
						wantGrad[r*V+j] = float32(g)
					}
				}
				run(t, k, func(d *dev) error {
					loss, grad := d.alloc(8*int64(rows)), d.alloc(int64(rows*V)*p.Size())
					if err := k.CrossEntropy(d.c, d.f32(logits), d.i32(targets), rows, V, normalizer, loss, grad); err != nil {
						return err
					}
					got := make([]float64, rows)
					if err := cuda.Download(d.c, got, loss); err != nil {
						return err
					}
					if _, err := cudatest.Compare(got, wantLoss, tol(F32, V)); err != nil {
						return fmt.Errorf("loss: %w", err)
					}
					d.check("gradient", d.readAct(grad, rows*V), wantGrad, tol(p, V))
					sum := d.alloc(8)
					if err := k.SumDouble(d.c, loss, rows, sum); err != nil {
						return err
					}
					var s [1]float64
					if err := cuda.Download(d.c, s[:], sum); err != nil {
						return err
					}
					var ws float64
					for _, x := range got {
						ws += x
					}
					if math.Abs(s[0]-ws) > 1e-9*math.Abs(ws) {
						return fmt.Errorf("sum %v, want %v", s[0], ws)
					}
					return nil
				})
			})
		}
	}
}

// TestArgmaxRows: each row's first largest value, as the host's greedy
// pick takes it, on random rows, rows with ties (the lowest index wins),
// NaN (never chosen) and -Inf.
func TestArgmaxRows(t *testing.T) {
	k := kernelsFor(t, F32, 256)
	rng := cudatest.Rand(t)
	const V = 262208
	var rows [][]float32
	for range 4 {
		rows = append(rows, uniform(rng, V, 8))
	}
	tie := uniform(rng, V, 1)
	tie[70000], tie[5000], tie[200000] = 3, 3, 3
	nan := uniform(rng, V, 1)
	nan[7], nan[9] = float32(math.NaN()), 2
	inf := make([]float32, V)
	for i := range inf {
		inf[i] = float32(math.Inf(-1))
	}
	inf[V-1] = -1e30
	rows = append(rows, tie, nan, inf)
	var flat []float32
	want := make([]int32, len(rows))
	for r, row := range rows {
		flat = append(flat, row...)
		for j, x := range row {
			if x > row[want[r]] || math.IsNaN(float64(row[want[r]])) && !math.IsNaN(float64(x)) {
				want[r] = int32(j)
			}
		}
	}
	run(t, k, func(d *dev) error {
		best := d.alloc(4 * int64(len(rows)))
		if err := k.ArgmaxRows(d.c, d.f32(flat), len(rows), V, best); err != nil {
			return err
		}
		got := make([]int32, len(rows))
		if err := cuda.Download(d.c, got, best); err != nil {
			return err
		}
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("argmax %v, want %v", got, want)
		}
		return nil
	})
}

// TestTopCandidates: each row's candidates are exactly its logits at or
// above the threshold, the k-th largest of its chunks' maxima (as the host
// computes it), so they hold the row's k largest, ties at the threshold
// included; NaN is never a candidate; a row with more than the capacity
// says so. Rows of Gemma's vocabulary and of one that leaves a short last
// chunk, random, with ties at the top, with NaN, and nearly all -Inf.
func TestTopCandidates(t *testing.T) {
	k := kernelsFor(t, F32, 256)
	const capacity = 1024
	for _, V := range []int{262144, 262208, 128} {
		length, chunks := TopChunking(V)
		for _, topK := range []int{1, 4, 64, chunks} {
			if topK > chunks || topK == 4 && chunks == 4 {
				continue
			}
			t.Run(fmt.Sprintf("V%d/k%d", V, topK), func(t *testing.T) {
				rng := cudatest.Rand(t)
				var rows [][]float32
				for range 3 {
					rows = append(rows, uniform(rng, V, 4))
				}
				ties := uniform(rng, V, 4)
				for range min(100, V/2) {
					ties[rng.IntN(V)] = 5
				}
				nan := uniform(rng, V, 4)
				for range 50 {
					nan[rng.IntN(V)] = float32(math.NaN())
				}
				nan[3] = float32(math.NaN())
				inf := make([]float32, V)
				for i := range inf {
					inf[i] = float32(math.Inf(-1))
				}
				inf[V/2] = 1
				rows = append(rows, ties, nan, inf)
				var flat []float32
				for _, r := range rows {
					flat = append(flat, r...)
				}
				words := TopRecordWords(capacity)
				recs := make([]uint32, len(rows)*words)
				run(t, k, func(d *dev) error {
					out := d.alloc(4 * int64(len(recs)))
					if err := k.TopCandidates(d.c, d.f32(flat), len(rows), V, topK, d.alloc(4*int64(len(rows))*TopChunks), capacity, out); err != nil {
						return err
					}
					return cuda.Download(d.c, recs, out)
				})
				for r, row := range rows {
					rec := recs[r*words : (r+1)*words]
					// The threshold from the chunks' maxima, NaN skipped.
					maxima := make([]float32, chunks)
					for c := range maxima {
						maxima[c] = float32(math.Inf(-1))
						for j := c * length; j < min(V, (c+1)*length); j++ {
							if row[j] > maxima[c] {
								maxima[c] = row[j]
							}
						}
					}
					slices.SortFunc(maxima, func(a, b float32) int { return cmp.Compare(b, a) })
					thr := maxima[topK-1]
					want := map[int32]bool{}
					for j, x := range row {
						if x >= thr {
							want[int32(j)] = true
						}
					}
					if got := math.Float32frombits(rec[1]); got != thr {
						t.Errorf("row %d: threshold %v, want %v", r, got, thr)
					}
					count := int(rec[0])
					if count != len(want) {
						t.Errorf("row %d: %d candidates, want %d", r, count, len(want))
						continue
					}
					if count > capacity {
						continue // reported; the records hold only some
					}
					if count < topK {
						t.Errorf("row %d: %d candidates for the top %d", r, count, topK)
					}
					seen := map[int32]bool{}
					for i := range count {
						id, v := int32(rec[2+i]), math.Float32frombits(rec[2+capacity+i])
						if !want[id] || seen[id] || math.Float32bits(v) != math.Float32bits(row[id]) {
							t.Errorf("row %d: candidate %d (%v) is not one of the row's, or repeats (row's value %v)", r, id, v, row[id])
							break
						}
						seen[id] = true
					}
				}
				// With k > 1 the row of -Inf has a threshold of -Inf: every
				// value is a candidate.
				if n := int(recs[5*words]); topK > 1 && V > capacity && n <= capacity {
					t.Errorf("the row of -Inf gave %d candidates, not more than the capacity", n)
				}
			})
		}
	}
}

// TestDropout: the recorded mask keeps the elements the host's Philox
// draw keeps, and the replay and the gradient read it back exactly.
func TestDropout(t *testing.T) {
	for _, p := range precisions {
		k := kernelsFor(t, p, 256)
		// The last count passes more mask bytes than the grid has
		// threads, so that each thread takes several.
		for _, n := range []int{10007, 10000, 8<<20 + 8} {
			t.Run(fmt.Sprintf("%s/%d", p, n), func(t *testing.T) {
				rng := cudatest.Rand(t)
				x := roundAct(p, uniform(rng, n, 1))
				y := roundAct(p, uniform(rng, n, 1))
				drop := trainer.NewDropout(0.05, rng.Uint64())
				stream := trainer.DropoutStream(11, trainer.UpProj)
				want, wantY := make([]float32, n), make([]float32, n)
				add := uniform(rng, n, 1)
				wantAdd := append([]float32(nil), add...)
				for i := range x {
					if drop.Keep(stream, uint64(i)) {
						want[i] = x[i] * drop.Scale
						wantY[i] = y[i] * drop.Scale
						wantAdd[i] += y[i] * drop.Scale
					}
				}
				roundAct(p, want)
				roundAct(p, wantY)
				run(t, k, func(d *dev) error {
					xp, yp, dst := d.act(x), d.act(y), d.f32(add)
					out, outY := d.alloc(int64(n)*p.Size()), d.alloc(int64(n)*p.Size())
					mask := d.alloc(MaskBytes(int64(n)))
					if err := k.DropoutRecord(d.c, xp, out, mask, int64(n), drop, stream); err != nil {
						return err
					}
					if err := k.DropoutReplay(d.c, yp, outY, mask, int64(n), drop.Scale); err != nil {
						return err
					}
					if err := k.DropoutAdd(d.c, yp, dst, mask, int64(n), drop.Scale); err != nil {
						return err
					}
					got, gotY, gotAdd := d.readAct(out, n), d.readAct(outY, n), d.readF32(dst, n)
					for i := range got {
						if got[i] != want[i] || gotY[i] != wantY[i] || gotAdd[i] != wantAdd[i] {
							return fmt.Errorf("element %d: %v, %v and %v, want %v, %v and %v (the masks differ)",
								i, got[i], gotY[i], gotAdd[i], want[i], wantY[i], wantAdd[i])
						}
					}
					return nil
				})
			})
		}
	}
}

// TestLoRADropoutGrad checks the fused gradient through the LoRA products
// and dropout of a group against the host: for each part in order, the
// product dxa·A rounded to bfloat16 (as the GEMM into activations rounds
// it), scaled and added where the mask keeps (as DropoutAdd adds it).
func TestLoRADropoutGrad(t *testing.T) {
	k := kernelsFor(t, BF16, 256)
	// Row counts that end inside a block's and a warp's rows; ranks of one
	// and of several k steps, one not whole.
	// Without add, dx holds NaNs: a read of it would show in every element.
	for _, c := range []struct {
		T, n, r, parts int
		add            bool
	}{{1000, 192, 32, 3, true}, {77, 64, 8, 1, true}, {130, 128, 64, 2, true}, {256, 3840, 16, 3, true}, {1000, 192, 32, 3, false}, {77, 64, 8, 1, false}} {
		t.Run(fmt.Sprintf("T%d_n%d_r%d_parts%d_add%v", c.T, c.n, c.r, c.parts, c.add), func(t *testing.T) {
			rng := cudatest.Rand(t)
			const scale = float32(1 / 0.95)
			dx := uniform(rng, c.T*c.n, 1)
			want := append([]float32(nil), dx...)
			if !c.add {
				for i := range dx {
					dx[i], want[i] = float32(math.NaN()), 0
				}
			}
			type part struct {
				dxa, a []float32
				mask   []uint8
			}
			ps := make([]part, c.parts)
			for p := range ps {
				ps[p].dxa = roundAct(BF16, uniform(rng, c.T*c.r, 1))
				ps[p].a = roundAct(BF16, uniform(rng, c.r*c.n, 0.2))
				ps[p].mask = make([]uint8, MaskBytes(int64(c.T*c.n)))
				for i := range ps[p].mask {
					ps[p].mask[i] = uint8(rng.Uint32())
				}
				for t0 := 0; t0 < c.T; t0++ {
					for i := 0; i < c.n; i++ {
						e := t0*c.n + i
						if ps[p].mask[e/8]>>(e%8)&1 == 0 {
							continue
						}
						var sum float64
						for q := 0; q < c.r; q++ {
							sum += float64(ps[p].dxa[t0*c.r+q]) * float64(ps[p].a[q*c.n+i])
						}
						want[e] += float32(half.RoundBF16(float32(sum)) * scale) // rounded apart, as the kernel does
					}
				}
			}
			run(t, k, func(d *dev) error {
				dxp := d.f32(dx)
				var parts []LoRAGradPart
				for _, p := range ps {
					m := d.alloc(int64(len(p.mask)))
					if err := cuda.Upload(d.c, m, p.mask); err != nil {
						return err
					}
					parts = append(parts, LoRAGradPart{DXA: d.act(p.dxa), A: d.act(p.a), Mask: m})
				}
				if !k.FusesLoRADropoutGrad(parts, dxp, c.n, c.r) {
					return fmt.Errorf("width %d, rank %d not taken", c.n, c.r)
				}
				if err := k.LoRADropoutGrad(d.c, parts, dxp, c.T, c.n, c.r, scale, c.add); err != nil {
					return err
				}
				got := d.readF32(dxp, len(dx))
				// The product's float32 sum may round to the other
				// neighbouring bfloat16 now and then; nothing else differs.
				differ := 0
				for i := range got {
					if got[i] != want[i] {
						differ++
					}
				}
				if differ > len(got)/500 {
					return fmt.Errorf("%d of %d elements differ from the host's", differ, len(got))
				}
				// Those few, each off by one bfloat16 step of a product (up
				// to ~2 here, against dx's RMS of ~0.6), move the relative
				// error up to sqrt(1/500)·2⁻⁸·3 ≈ 5e-4; a wrong mask bit or
				// product moves it by orders more. (1e-5 failed on one
				// random seed: 1.27e-5, one product rounded the other way.)
				d.check("dx", got, want, cudatest.Tolerance{Name: "a bfloat16 product rounded the other way, now and then", Rel: 1e-3})
				return nil
			})
		})
	}
}

// TestFoldLoRAColumns: a widened weight's LoRA columns take scale·B,
// exactly for a power-of-two scale, and its padding columns zeros, the
// other columns untouched; CopyActRows moves rows between strides.
func TestFoldLoRAColumns(t *testing.T) {
	for _, p := range precisions {
		k := kernelsFor(t, p, 256)
		t.Run(p.String(), func(t *testing.T) {
			rng := cudatest.Rand(t)
			const rows, in, r, scale = 300, 40, 8, float32(2)
			ld := in + 2*r
			b := roundAct(p, uniform(rng, rows*r, 1))
			base := roundAct(p, uniform(rng, rows*ld, 1))
			run(t, k, func(d *dev) error {
				w := d.act(base)
				if err := k.FoldLoRAColumns(d.c, w, rows, ld, in+r, in, d.act(b), r, scale); err != nil {
					return err
				}
				got := d.readAct(w, rows*ld)
				for row := 0; row < rows; row++ {
					for j := 0; j < ld; j++ {
						want := base[row*ld+j]
						switch {
						case j >= in && j < in+r:
							want = 0
						case j >= in+r:
							want = scale * b[row*r+j-in-r]
						}
						if got[row*ld+j] != want {
							return fmt.Errorf("row %d, column %d: %v, want %v", row, j, got[row*ld+j], want)
						}
					}
				}
				// Widths of whole 16-byte units and not.
				for _, cols := range []int{in, in - 3} {
					src := roundAct(p, uniform(rng, rows*cols, 1))
					dst := d.act(base)
					if err := k.CopyActRows(d.c, d.act(src), cols, dst, ld, rows, cols); err != nil {
						return err
					}
					got = d.readAct(dst, rows*ld)
					for row := 0; row < rows; row++ {
						for j := 0; j < ld; j++ {
							want := base[row*ld+j]
							if j < cols {
								want = src[row*cols+j]
							}
							if got[row*ld+j] != want {
								return fmt.Errorf("%d copied columns: row %d, column %d: %v, want %v", cols, row, j, got[row*ld+j], want)
							}
						}
					}
				}
				return nil
			})
		})
	}
}

// storedBytes encodes v as a checkpoint tensor of dtype dt.
func storedBytes(t *testing.T, dt safetensors.DType, v []float32) []byte {
	b, err := safetensors.EncodeFloat32(dt, v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestNF4MatchesHost(t *testing.T) {
	dtypes := map[safetensors.DType]int{safetensors.BF16: StoredBF16, safetensors.F16: StoredF16, safetensors.F32: StoredF32}
	names := map[safetensors.DType]string{safetensors.BF16: "bfloat16", safetensors.F16: "float16", safetensors.F32: "float32"}
	rounds := map[safetensors.DType]int{safetensors.BF16: RoundBF16, safetensors.F16: RoundF16, safetensors.F32: RoundNone}
	for _, p := range precisions {
		k := kernelsFor(t, p, 256)
		for dt, code := range dtypes {
			// {2304, 7561} is more tiles of nf4_dequantize8 than its grid
			// has blocks on a card of up to 132 multiprocessors, the last
			// one partial; {1000, 33} ends inside a thread's units, {3, 5}
			// takes the one-weight kernel.
			for _, sh := range [][2]int{{200, 96}, {256, 640}, {1000, 33}, {3, 5}, {2304, 7561}} {
				if sh[0]*sh[1] > 1<<20 && dt != safetensors.BF16 {
					continue // the tile loop is the same for every rounding
				}
				t.Run(fmt.Sprintf("%s/%s/%dx%d", p, dt, sh[0], sh[1]), func(t *testing.T) {
					rng := cudatest.Rand(t)
					n := sh[0] * sh[1]
					w := make([]float32, n)
					for i := range w {
						w[i] = float32(rng.NormFloat64() * 0.02 * (1 + float64(i/640%7)))
					}
					raw := storedBytes(t, dt, w)
					stored, _ := safetensors.DecodeFloat32(dt, raw)
					ref, err := trainer.QuantizeNF4(stored, []int{sh[0], sh[1]}, names[dt])
					if err != nil {
						t.Fatal(err)
					}
					deq := ref.Dequantize()
					blocks := (n + 63) / 64
					run(t, k, func(d *dev) error {
						src := d.alloc(int64(len(raw)))
						if err := cuda.Upload(d.c, src, raw); err != nil {
							return err
						}
						packed, absmax := d.alloc(int64((n+1)/2)), d.alloc(4*int64(blocks))
						if err := k.NF4QuantizeBlocks(d.c, src, code, int64(n), packed, absmax); err != nil {
							return err
						}
						gotPacked := make([]uint8, (n+1)/2)
						gotAbsmax := make([]float32, blocks)
						if err := cuda.Download(d.c, gotPacked, packed); err != nil {
							return err
						}
						if err := cuda.Download(d.c, gotAbsmax, absmax); err != nil {
							return err
						}
						for i := range gotPacked {
							if gotPacked[i] != ref.Packed[i] {
								return fmt.Errorf("packed byte %d: %#x, host %#x", i, gotPacked[i], ref.Packed[i])
							}
						}
						q, a2, off := trainer.DoubleQuantize(gotAbsmax)
						if off != ref.Offset {
							return fmt.Errorf("offset %v, host %v", off, ref.Offset)
						}
						aq, a2p := d.alloc(int64(len(q))), d.f32(a2)
						if err := cuda.Upload(d.c, aq, q); err != nil {
							return err
						}
						out := d.alloc(int64(n) * p.Size())
						if err := k.NF4Dequantize(d.c, packed, aq, a2p, off, int64(n), rounds[dt], out); err != nil {
							return err
						}
						got := d.readAct(out, n)
						want := roundAct(p, append([]float32(nil), deq...))
						for i := range got {
							if got[i] != want[i] {
								return fmt.Errorf("weight %d: %v, host %v", i, got[i], want[i])
							}
						}
						// Rows 16 apart more than their length: the same
						// values, the columns between untouched.
						if rows, in := sh[0], sh[1]; in%8 == 0 {
							ld := in + 16
							sentinel := make([]float32, rows*ld)
							for i := range sentinel {
								sentinel[i] = 7
							}
							wide := d.act(sentinel)
							if err := k.NF4DequantizeRows(d.c, packed, aq, a2p, off, rows, in, ld, rounds[dt], wide); err != nil {
								return err
							}
							gw := d.readAct(wide, rows*ld)
							for r := 0; r < rows; r++ {
								for j := 0; j < ld; j++ {
									w := float32(7)
									if j < in {
										w = want[r*in+j]
									}
									if gw[r*ld+j] != w {
										return fmt.Errorf("rows %d apart: row %d, column %d: %v, want %v", ld, r, j, gw[r*ld+j], w)
									}
								}
							}
						}
						// Stored tensors converted as they are.
						f, a := d.alloc(4*int64(n)), d.alloc(int64(n)*p.Size())
						if err := k.StoredToF32(d.c, src, code, int64(n), f); err != nil {
							return err
						}
						if err := k.StoredToAct(d.c, src, code, int64(n), a); err != nil {
							return err
						}
						gf, ga := d.readF32(f, n), d.readAct(a, n)
						wa := roundAct(p, append([]float32(nil), stored...))
						for i := range gf {
							if gf[i] != stored[i] || ga[i] != wa[i] {
								return fmt.Errorf("stored element %d: %v and %v, want %v and %v", i, gf[i], ga[i], stored[i], wa[i])
							}
						}
						return nil
					})
				})
			}
		}
	}
}

// TestNF4GEMV checks the decoding product against float64 sums over the
// weights NF4Dequantize writes, and the tensor-core kernel also against
// its own definition (nf4BlockScaled), for each checkpoint dtype's
// rounding, every token count it takes, rows not a multiple of a warp's
// four, rows whose 64-blocks do not fill the warps' passes evenly (an odd
// count among them) and rows of 32 (the CUDA-core kernel); nothing past
// the T rows of the output is written.
func TestNF4GEMV(t *testing.T) {
	rounds := map[string]int{"bfloat16": RoundBF16, "float16": RoundF16, "float32": RoundNone}
	for _, p := range precisions {
		k := kernelsFor(t, p, 256)
		// The bfloat16 kernel's speed rests on registers alone: a spill to
		// local memory would cost more than the weights it reads.
		var r cuda.Resources
		cudatest.Do(t, func(*cuda.Ctx) (err error) { r, err = k.Resources("nf4_gemv_mma"); return err })
		t.Logf("%s nf4_gemv_mma: %d registers, %d bytes of local memory a thread", p, r.Registers, r.LocalBytes)
		if p == BF16 && r.LocalBytes != 0 {
			t.Errorf("nf4_gemv_mma spills: %d bytes of local memory a thread", r.LocalBytes)
		}
		for dtype, round := range rounds {
			for _, sh := range [][2]int{{37, 32}, {256, 1152}, {130, 2560}, {40, 1216}} {
				for _, T := range []int{1, 3, GEMVTokens} {
					rows, in := sh[0], sh[1]
					t.Run(fmt.Sprintf("%s/%s/%dx%d/T%d", p, dtype, rows, in, T), func(t *testing.T) {
						rng := cudatest.Rand(t)
						w := make([]float32, rows*in)
						for i := range w {
							w[i] = float32(rng.NormFloat64() * 0.02 * (1 + float64(i/192%5)))
						}
						nf, err := trainer.QuantizeNF4(w, []int{rows, in}, dtype)
						if err != nil {
							t.Fatal(err)
						}
						deq := roundAct(p, nf.Dequantize())
						x := roundAct(p, uniform(rng, T*in, 1))
						want := make([]float32, T*rows)
						for tok := 0; tok < T; tok++ {
							for o := 0; o < rows; o++ {
								var s float64
								for i := 0; i < in; i++ {
									s += float64(deq[o*in+i]) * float64(x[tok*in+i])
								}
								want[tok*rows+o] = float32(s)
							}
						}
						// The tensor-core kernel's own definition: bfloat16 codes,
						// each 64-block's sum times its scale.
						var exact []float32
						if p == BF16 && in%64 == 0 {
							exact = nf4BlockScaled(nf, x, T, rows, in)
						}
						run(t, k, func(d *dev) error {
							packed, aq := d.u8(nf.Packed), d.u8(nf.AbsmaxQ)
							out := d.alloc(int64((T+1)*rows) * p.Size())
							if err := k.NF4GEMV(d.c, packed, aq, d.f32(nf.Absmax2), nf.Offset, round, d.act(x), T, rows, in, out); err != nil {
								return err
							}
							got := d.readAct(out, (T+1)*rows)
							d.check("x·Wᵀ", got[:T*rows], want, tol(p, in))
							if exact != nil {
								d.check("x·Wᵀ by 64-blocks", got[:T*rows], exact, cudatest.Tolerance{Name: "bfloat16 rounding of the output", Rel: 4e-3})
							}
							for i, v := range got[T*rows:] {
								if !math.IsNaN(float64(v)) {
									return fmt.Errorf("output element %d past the %d tokens was written (%v)", T*rows+i, T, v)
								}
							}
							return nil
						})
					})
				}
			}
		}
	}
}

// firstBitDiff is the first index where a and b (of one length) differ in
// any bit, or -1.
func firstBitDiff(a, b []float32) int {
	for i := range a {
		if math.Float32bits(a[i]) != math.Float32bits(b[i]) {
			return i
		}
	}
	return -1
}

// TestNF4GEMVPair: two matrices of one input in one launch (k and v,
// gate and up) give each output exactly as its own launch does, for row
// counts that leave the first matrix's last tile part empty; and in bf16
// the same again from NF4RepackTiles' copies (nf4_gemv_mma_tiled).
func TestNF4GEMVPair(t *testing.T) {
	for _, p := range precisions {
		k := kernelsFor(t, p, 256)
		for _, sh := range [][3]int{{40, 70, 1216}, {256, 128, 1152}} {
			rows1, rows2, in := sh[0], sh[1], sh[2]
			t.Run(fmt.Sprintf("%s/%d+%dx%d", p, rows1, rows2, in), func(t *testing.T) {
				rng := cudatest.Rand(t)
				quantize := func(rows int, scale float64) *trainer.NF4Tensor {
					w := make([]float32, rows*in)
					for i := range w {
						w[i] = float32(rng.NormFloat64() * scale)
					}
					nf, err := trainer.QuantizeNF4(w, []int{rows, in}, "bfloat16")
					if err != nil {
						t.Fatal(err)
					}
					return nf
				}
				nf1, nf2 := quantize(rows1, 0.02), quantize(rows2, 0.05)
				x := roundAct(p, uniform(rng, GEMVTokens*in, 1))
				run(t, k, func(d *dev) error {
					matrix := func(nf *trainer.NF4Tensor, rows int) NF4Matrix {
						return NF4Matrix{Packed: d.u8(nf.Packed), AbsmaxQ: d.u8(nf.AbsmaxQ), Absmax2: d.f32(nf.Absmax2),
							Offset: nf.Offset, Rows: rows, Out: d.alloc(int64(GEMVTokens*rows) * p.Size())}
					}
					m1, m2 := matrix(nf1, rows1), matrix(nf2, rows2)
					xd := d.act(x)
					// In bf16, the same matrices again from NF4RepackTiles' copies
					// (no tensor-core product, no tile copy to read in float32).
					var tiled []NF4Matrix
					if p == BF16 {
						tiled = []NF4Matrix{m1, m2}
						for i := range tiled {
							m := &tiled[i]
							codes, absmax := NF4TileBytes(m.Rows, in)
							m.TileCodes, m.TileAbsmaxQ = d.alloc(codes), d.alloc(absmax)
							if err := k.NF4RepackTiles(d.c, m.Packed, m.AbsmaxQ, m.Rows, in, m.TileCodes, m.TileAbsmaxQ); err != nil {
								return err
							}
						}
					}
					for _, T := range []int{1, GEMVTokens} {
						if err := k.NF4GEMVPair(d.c, m1, m2, RoundBF16, xd, T, in); err != nil {
							return err
						}
						pair1, pair2 := d.readAct(m1.Out, T*rows1), d.readAct(m2.Out, T*rows2)
						for i, m := range []NF4Matrix{m1, m2} {
							if err := k.NF4GEMV(d.c, m.Packed, m.AbsmaxQ, m.Absmax2, m.Offset, RoundBF16, xd, T, m.Rows, in, m.Out); err != nil {
								return err
							}
							alone, paired := d.readAct(m.Out, T*m.Rows), [][]float32{pair1, pair2}[i]
							if j := firstBitDiff(alone, paired); j >= 0 {
								return fmt.Errorf("T %d, matrix %d, element %d: %v in the pair, %v alone", T, i+1, j, paired[j], alone[j])
							}
						}
						if tiled == nil {
							continue
						}
						// From the tile copies: the same products, bit for bit.
						if err := k.NF4GEMVPair(d.c, tiled[0], tiled[1], RoundBF16, xd, T, in); err != nil {
							return err
						}
						for i, m := range tiled {
							got, want := d.readAct(m.Out, T*m.Rows), [][]float32{pair1, pair2}[i]
							if j := firstBitDiff(got, want); j >= 0 {
								return fmt.Errorf("T %d, matrix %d, element %d: %v from the tile copy, %v from the codes", T, i+1, j, got[j], want[j])
							}
						}
					}
					return nil
				})
			})
		}
	}
}

// nf4BlockScaled is x·Wᵀ as nf4_gemv_mma defines it, in float64: the codes
// rounded to bfloat16, each 64-block's sum times the block's scale.
func nf4BlockScaled(nf *trainer.NF4Tensor, x []float32, T, rows, in int) []float32 {
	code := trainer.NF4Code()
	for i := range code {
		code[i] = half.FromBF16(half.BF16(code[i]))
	}
	scale := nf.Absmax()
	out := make([]float32, T*rows)
	for tok := 0; tok < T; tok++ {
		for o := 0; o < rows; o++ {
			var s float64
			for b := 0; b < in/trainer.NF4BlockSize; b++ {
				var blk float64
				for i := b * trainer.NF4BlockSize; i < (b+1)*trainer.NF4BlockSize; i++ {
					q := nf.Packed[(o*in+i)/2] >> 4
					if i%2 == 1 {
						q = nf.Packed[(o*in+i)/2] & 0xf
					}
					blk += float64(code[q]) * float64(x[tok*in+i])
				}
				s += blk * float64(scale[(o*in)/trainer.NF4BlockSize+b])
			}
			out[tok*rows+o] = float32(s)
		}
	}
	return out
}

// TestTokenKernelRegisters checks that decode_token and decode_token_lora
// keep everything in registers at Gemma 3's head dims. They run at the
// register file's edge (512 threads a block, 128 registers a thread), and a
// spill there is paid at every reload on a phase's path: a build with 48
// bytes of local memory in the lm_head's loop lost the speed its change
// had gained (trainer/gpu/NOTES.md, "divisions off the phases' paths").
// The one allowance is decode_token's 8 bytes at head dim 128, measured:
// with them (flat passes and XH) a 27B NF4 token is 5.9% faster than
// without them and the spill ("flat passes and XH at head dim 128").
func TestTokenKernelRegisters(t *testing.T) {
	for _, hd := range []int{256, 128} {
		k := kernelsFor(t, BF16, hd)
		for _, name := range []string{"decode_token", "decode_token_lora"} {
			var r cuda.Resources
			cudatest.Do(t, func(*cuda.Ctx) (err error) { r, err = k.Resources(name); return err })
			t.Logf("head dim %d %s: %d registers, %d bytes of local memory a thread", hd, name, r.Registers, r.LocalBytes)
			allowed := 0
			if hd == 128 && name == "decode_token" {
				allowed = 8
			}
			if r.LocalBytes > allowed {
				t.Errorf("head dim %d: %s spills: %d bytes of local memory a thread (%d allowed)", hd, name, r.LocalBytes, allowed)
			}
		}
	}
}

// TestGEMV checks the decoding product from dense weights against float64
// sums, for uneven row counts, 1 to GEMVTokens tokens and two matrices
// stacked (k and v, gate and up) whose outputs go to places apart; and
// that nothing else of the output buffer is written.
func TestGEMV(t *testing.T) {
	k := kernelsFor(t, BF16, 256)
	// Its speed rests on many loads in flight in registers; a spill to
	// local memory would cost more than the weights it reads.
	var r cuda.Resources
	cudatest.Do(t, func(*cuda.Ctx) (err error) { r, err = k.Resources("gemv_mma"); return err })
	t.Logf("gemv_mma: %d registers, %d bytes of local memory a thread", r.Registers, r.LocalBytes)
	if r.LocalBytes != 0 {
		t.Errorf("gemv_mma spills: %d bytes of local memory a thread", r.LocalBytes)
	}
	for _, sh := range [][3]int{{37, 32, 1}, {256, 1152, 1}, {130, 2560, 1}, {2 * 72, 1152, 2}} {
		for _, T := range []int{1, 3, GEMVTokens} {
			rows, in, parts := sh[0], sh[1], sh[2]
			t.Run(fmt.Sprintf("%dx%d/parts%d/T%d", rows, in, parts, T), func(t *testing.T) {
				rng := cudatest.Rand(t)
				w := roundAct(BF16, uniform(rng, rows*in, 0.05))
				x := roundAct(BF16, uniform(rng, T*in, 1))
				partRows := rows / parts
				stride := int64(T*partRows + 5) // a gap between the parts' outputs
				size := int(stride)*(parts-1) + T*partRows + 5
				want := make([]float32, size)
				for i := range want {
					want[i] = float32(math.NaN())
				}
				for tok := 0; tok < T; tok++ {
					for o := 0; o < rows; o++ {
						var s float64
						for i := 0; i < in; i++ {
							s += float64(w[o*in+i]) * float64(x[tok*in+i])
						}
						want[o/partRows*int(stride)+tok*partRows+o%partRows] = float32(s)
					}
				}
				run(t, k, func(d *dev) error {
					out := d.alloc(int64(size) * 2)
					if err := k.GEMV(d.c, d.act(w), d.act(x), T, rows, in, partRows, stride, out); err != nil {
						return err
					}
					got := d.readAct(out, size)
					var gotV, wantV []float32
					for i := range want {
						if math.IsNaN(float64(want[i])) {
							if !math.IsNaN(float64(got[i])) {
								return fmt.Errorf("output element %d, outside the product, was written (%v)", i, got[i])
							}
							continue
						}
						gotV, wantV = append(gotV, got[i]), append(wantV, want[i])
					}
					d.check("x·Wᵀ", gotV, wantV, tol(BF16, in))
					return nil
				})
			})
		}
	}
}

// optimizerParams are flat parameters laid out as the backend lays them:
// tensors at offsets aligned to 256 elements.
func optimizerParams(rng *rand.Rand, sizes []int) (params []trainer.Param, offsets []int, total int) {
	for i, n := range sizes {
		p := trainer.Param{Name: fmt.Sprintf("p%d", i), Data: make([]float32, n), Grad: make([]float32, n)}
		for j := range p.Data {
			p.Data[j] = float32(rng.NormFloat64() * 0.1)
		}
		params = append(params, p)
		offsets = append(offsets, total)
		total += (n + 255) / 256 * 256
	}
	return params, offsets, total
}

func flat(params []trainer.Param, offsets []int, total int, grad bool) []float32 {
	out := make([]float32, total)
	for i, p := range params {
		src := p.Data
		if grad {
			src = p.Grad
		}
		copy(out[offsets[i]:], src)
	}
	return out
}

func TestOptimizersMatchHostBitForBit(t *testing.T) {
	k := kernelsFor(t, F32, 256)
	rng := cudatest.Rand(t)
	sizes := []int{trainer.Adam8MinSize + 300, 3000, 256 * 20}
	params, offsets, total := optimizerParams(rng, sizes)
	const lr, b1, b2, eps, wd = 1e-3, 0.9, 0.999, 1e-8, 0.01
	ref := trainer.NewAdamW(params, b1, b2, eps, wd)
	ref8Params := make([]trainer.Param, len(params))
	for i, p := range params {
		ref8Params[i] = trainer.Param{Name: p.Name, Data: append([]float32(nil), p.Data...), Grad: make([]float32, len(p.Grad))}
	}
	ref8 := trainer.NewAdamW8bit(ref8Params, b1, b2, eps, wd)
	// The 8-bit blocks of the large tensors; the small one keeps float32 moments.
	var starts []int64
	var lens []int32
	for i, n := range sizes {
		if n < trainer.Adam8MinSize {
			continue
		}
		for b := 0; b < n; b += 256 {
			starts = append(starts, int64(offsets[i]+b))
			lens = append(lens, int32(min(256, n-b)))
		}
	}
	run(t, k, func(d *dev) error {
		p32, g32 := d.f32(flat(params, offsets, total, false)), d.f32(make([]float32, total))
		m, v := d.f32(make([]float32, total)), d.f32(make([]float32, total))
		p8 := d.f32(flat(ref8Params, offsets, total, false))
		m8, v8 := d.f32(make([]float32, total)), d.f32(make([]float32, total))
		q1, q2 := d.alloc(int64(total)), d.alloc(int64(total))
		if err := d.c.MemsetD8Async(q1, 0, int64(total), nil); err != nil {
			return err
		}
		if err := d.c.MemsetD8Async(q2, 0, int64(total), nil); err != nil {
			return err
		}
		am1, am2 := d.f32(make([]float32, len(starts))), d.f32(make([]float32, len(starts)))
		st := d.alloc(8 * int64(len(starts)))
		if err := cuda.Upload(d.c, st, starts); err != nil {
			return err
		}
		ln := d.i32(lens)
		for step := 1; step <= 3; step++ {
			for i := range params {
				for j := range params[i].Grad {
					g := float32(rng.NormFloat64())
					params[i].Grad[j], ref8Params[i].Grad[j] = g, g
				}
			}
			if err := cuda.Upload(d.c, g32, flat(params, offsets, total, true)); err != nil {
				return err
			}
			scale := float32(0.5)
			for i := range params {
				for j := range params[i].Grad {
					params[i].Grad[j] *= scale
					ref8Params[i].Grad[j] *= scale
				}
			}
			if err := ref.Update(params, lr); err != nil {
				return err
			}
			if err := ref8.Update(ref8Params, lr); err != nil {
				return err
			}
			if err := k.AdamW(d.c, p32, g32, m, v, int64(total), scale, trainer.AdamWStep(b1, b2, eps, wd, lr, step)); err != nil {
				return err
			}
			k8 := trainer.Adam8Step(b1, b2, eps, wd, lr, step)
			if err := k.Adam8(d.c, p8, g32, q1, q2, am1, am2, st, ln, len(starts), scale, k8); err != nil {
				return err
			}
			small := offsets[1]
			if err := k.Adam8F32(d.c, p8+cuda.DevicePtr(4*small), g32+cuda.DevicePtr(4*small), m8+cuda.DevicePtr(4*small), v8+cuda.DevicePtr(4*small), int64(sizes[1]), scale, k8); err != nil {
				return err
			}
			got, got8 := d.readF32(p32, total), d.readF32(p8, total)
			want, want8 := flat(params, offsets, total, false), flat(ref8Params, offsets, total, false)
			for i := range got {
				if got[i] != want[i] {
					return fmt.Errorf("adamw step %d element %d: %v, host %v", step, i, got[i], want[i])
				}
				if got8[i] != want8[i] {
					return fmt.Errorf("adamw_8bit step %d element %d: %v, host %v", step, i, got8[i], want8[i])
				}
			}
		}
		// The quantised moments too.
		st8 := ref8.State()
		gq1 := make([]uint8, total)
		if err := cuda.Download(d.c, gq1, q1); err != nil {
			return err
		}
		for _, tns := range st8.Tensors {
			if tns.Name == "p0.state1" {
				for j, b := range tns.Data {
					if gq1[j] != b {
						return fmt.Errorf("state1[%d] = %d, host %d", j, gq1[j], b)
					}
				}
			}
		}
		// The gradient norm in float64.
		scratch := d.alloc(8 * (NormPartials + 1))
		g := flat(params, offsets, total, true)
		gp := d.f32(g)
		if err := k.SquaredNorm(d.c, gp, int64(total), scratch); err != nil {
			return err
		}
		var ss [1]float64
		if err := cuda.Download(d.c, ss[:], scratch.Add(8*NormPartials)); err != nil {
			return err
		}
		var want float64
		for _, x := range g {
			want += float64(x) * float64(x)
		}
		if math.Abs(ss[0]-want) > 1e-12*want {
			return fmt.Errorf("squared norm %v, want %v", ss[0], want)
		}
		return nil
	})
}

// TestAttentionCached: keys and values stored by kv_store (a prompt's
// whole run in one launch, a sliding layer's ring keeping the last window
// positions), then attn_cached for each sequence's last token, against the
// float64 softmax over the positions the token sees.
func TestAttentionCached(t *testing.T) {
	for _, p := range precisions {
		for _, sh := range []struct{ dim, heads, kv, window int }{{256, 8, 4, 0}, {256, 8, 4, 64}, {128, 4, 1, 16}, {16, 4, 2, 0}, {4, 2, 1, 16}} {
			k := kernelsFor(t, p, sh.dim)
			t.Run(fmt.Sprintf("%s/d%d_h%d_kv%d_w%d", p, sh.dim, sh.heads, sh.kv, sh.window), func(t *testing.T) {
				rng := cudatest.Rand(t)
				D, H, KV := sh.dim, sh.heads, sh.kv
				lens := []int{1, 70, 300} // each sequence's positions so far
				maxLen := 320
				cacheLen := maxLen
				if sh.window > 0 {
					cacheLen = sh.window
				}
				var seq, pos, from []int32
				for s, n := range lens {
					for j := 0; j < n; j++ {
						seq, pos = append(seq, int32(s)), append(pos, int32(j))
						from = append(from, int32(max(0, n-cacheLen)))
					}
				}
				T := len(seq)
				kr := roundAct(p, uniform(rng, T*KV*D, 1))
				v := roundAct(p, uniform(rng, T*KV*D, 1))
				q := roundAct(p, uniform(rng, len(lens)*H*D, 1))
				scale := 1 / math.Sqrt(float64(D))
				// Reference: the last token of each sequence.
				want := make([]float32, len(lens)*H*D)
				first := 0
				for s, n := range lens {
					last := first + n - 1
					lo := first
					if sh.window > 0 {
						lo = max(first, last-sh.window+1)
					}
					for h := 0; h < H; h++ {
						g := h / (H / KV)
						qv := q[(s*H+h)*D : (s*H+h+1)*D]
						scores := make([]float64, last-lo+1)
						mx := math.Inf(-1)
						for j := lo; j <= last; j++ {
							var dot float64
							for d := 0; d < D; d++ {
								dot += float64(qv[d]) * float64(kr[(j*KV+g)*D+d])
							}
							scores[j-lo] = dot * scale
							mx = math.Max(mx, scores[j-lo])
						}
						var sum float64
						for i := range scores {
							scores[i] = math.Exp(scores[i] - mx)
							sum += scores[i]
						}
						for d := 0; d < D; d++ {
							var acc float64
							for j := lo; j <= last; j++ {
								acc += scores[j-lo] * float64(v[(j*KV+g)*D+d])
							}
							want[(s*H+h)*D+d] = float32(acc / sum)
						}
					}
					first += n
				}
				run(t, k, func(d *dev) error {
					kc, vc := d.alloc(int64(len(lens)*cacheLen*KV*D)*p.Size()), d.alloc(int64(len(lens)*cacheLen*KV*D)*p.Size())
					if err := k.KVStore(d.c, d.act(kr), d.act(v), d.i32(seq), d.i32(pos), d.i32(from), kc, vc, T, KV, cacheLen); err != nil {
						return err
					}
					qseq, qpos := make([]int32, len(lens)), make([]int32, len(lens))
					for s, n := range lens {
						qseq[s], qpos[s] = int32(s), int32(n-1)
					}
					out := d.alloc(int64(len(lens)*H*D) * p.Size())
					// The counters are cleared once; each launch leaves them
					// zero for the next, which must give the same rows.
					part := d.alloc(k.CachedAttentionBytes(len(lens), H, cacheLen, sh.window))
					counters := int64(4 * len(lens) * H)
					if err := d.c.MemsetD8Async(part, 0, counters, nil); err != nil {
						return err
					}
					qp, seqp, posp := d.act(q), d.i32(qseq), d.i32(qpos)
					for launch := 0; launch < 2; launch++ {
						if err := k.AttentionCached(d.c, qp, kc, vc, seqp, posp, part, out, len(lens), H, KV, cacheLen, sh.window, scale); err != nil {
							return err
						}
						d.check(fmt.Sprintf("out of launch %d", launch+1), d.readAct(out, len(lens)*H*D), want, tol(p, 300))
						left := make([]int32, counters/4)
						if err := cuda.Download(d.c, left, part); err != nil {
							return err
						}
						for i, v := range left {
							if v != 0 {
								return fmt.Errorf("launch %d left counter %d at %d", launch+1, i, v)
							}
						}
					}
					return nil
				})
			})
		}
	}
}

// benchMemory hands a benchmark device buffers, filled with 0x3c bytes
// (finite in every float type: the kernels' speed does not depend on the
// values), and frees them all.
type benchMemory struct {
	c    *cuda.Ctx
	bufs []cuda.Buffer
}

func (m *benchMemory) alloc(size int64) cuda.DevicePtr {
	buf, err := m.c.Alloc(size)
	if err != nil {
		panic(err)
	}
	m.bufs = append(m.bufs, buf)
	if err := m.c.MemsetD8Async(buf.Ptr, 0x3c, size, nil); err != nil {
		panic(err)
	}
	return buf.Ptr
}

func (m *benchMemory) free() {
	for _, buf := range m.bufs {
		m.c.Free(buf)
	}
}

// l2Copies is how many copies of a matrix of size bytes, read in turn,
// overflow the L2 cache, as a decoding step's many matrices do.
func l2Copies(size int64) int { return int(min(32, max(1, (256<<20)/size))) }

// benchMatrices runs body for each [rows × in] shape, as a sub-benchmark
// (b) named by the shape, on the device, freeing after it what it
// allocated from m.
func benchMatrices(b *testing.B, shapes [][2]int, body func(b *testing.B, c *cuda.Ctx, m *benchMemory, rows, in int) error) {
	for _, sh := range shapes {
		rows, in := sh[0], sh[1]
		b.Run(fmt.Sprintf("%dx%d", rows, in), func(b *testing.B) {
			cudatest.Do(b, func(c *cuda.Ctx) error {
				m := benchMemory{c: c}
				defer m.free()
				return body(b, c, &m, rows, in)
			})
		})
	}
}

// nf4Weights is an n-weight NF4 tensor's buffers (packed codes, absmax
// codes, second-level scales) and, where asked, a dense bf16 twin.
type nf4Weights struct{ packed, aq, a2, dense cuda.DevicePtr }

// nf4Copies allocates l2Copies(size) copies of an n-weight NF4 tensor's
// buffers, size the bytes a launch reads of one.
func (m *benchMemory) nf4Copies(n, size int64, dense bool) []nf4Weights {
	ws := make([]nf4Weights, l2Copies(size))
	for i := range ws {
		ws[i] = nf4Weights{packed: m.alloc(n / 2), aq: m.alloc(n / 64), a2: m.alloc(4 * (n/64/256 + 1))}
		if dense {
			ws[i].dense = m.alloc(2 * n)
		}
	}
	return ws
}

// launchMicros is the median time of one launch of op, from runs of
// launches back-to-back launches between two events; op gets the
// launch's index in its run.
func launchMicros(b *testing.B, c *cuda.Ctx, launches int, op func(i int) error) (float64, error) {
	ms, err := cudatest.MedianMs(c, 1, max(b.N, 5), func() error {
		for i := range launches {
			if err := op(i); err != nil {
				return err
			}
		}
		return nil
	})
	return ms * 1e3 / float64(launches), err
}

// BenchmarkNF4GEMV times the batch-1 decoding product of Gemma 3 12B's
// projection shapes from the NF4 form (and the same for eight tokens)
// beside cuBLAS's on the dense bf16 weights (the other way a decoder reads
// them), each as the median over runs of 32 back-to-back launches between
// two events, over copies of the weights that overflow the L2 cache, and
// reports the bandwidth each draws from the bytes it must read.
func BenchmarkNF4GEMV(b *testing.B) {
	cudatest.Device(b)
	k := kernelsFor(b, BF16, 256)
	benchMatrices(b, [][2]int{{4096, 3840}, {2048, 3840}, {3840, 4096}, {15360, 3840}, {3840, 15360}}, func(b *testing.B, c *cuda.Ctx, m *benchMemory, rows, in int) error {
		n := int64(rows) * int64(in)
		ws := m.nf4Copies(n, 2*n, true)
		x, out := m.alloc(2*int64(in)*GEMVTokens), m.alloc(2*int64(rows)*GEMVTokens)
		g := cuda.GEMM{M: 1, N: rows, K: in, TransB: true, AType: cuda.BF16, BType: cuda.BF16, CType: cuda.BF16}
		for _, op := range []struct {
			name  string
			bytes int64
			run   func(w nf4Weights) error
		}{
			{"nf4", n/2 + n/64, func(w nf4Weights) error { return k.NF4GEMV(c, w.packed, w.aq, w.a2, 0, RoundBF16, x, 1, rows, in, out) }},
			{"nf4-T8", n/2 + n/64, func(w nf4Weights) error {
				return k.NF4GEMV(c, w.packed, w.aq, w.a2, 0, RoundBF16, x, GEMVTokens, rows, in, out)
			}},
			{"cublas-bf16", 2 * n, func(w nf4Weights) error { return c.Matmul(g, 1, x, w.dense, 0, out, nil) }},
		} {
			us, err := launchMicros(b, c, 32, func(i int) error { return op.run(ws[i%len(ws)]) })
			if err != nil {
				return err
			}
			b.ReportMetric(us, op.name+"-µs")
			b.ReportMetric(float64(op.bytes)/(us*1e-6)/1e9, op.name+"-GB/s")
		}
		return nil
	})
}

// BenchmarkGEMV times the decoding product from dense bf16 weights at
// Gemma 3 1B's and 12B's projection shapes (k and v, gate and up as the
// stacked pairs a step multiplies together), for 1 and 8 tokens, beside
// cuBLAS's on the same weights: medians of 32 back-to-back launches over
// copies of the weights that overflow the L2 cache, and the bandwidth each
// draws from the weights' bytes.
func BenchmarkGEMV(b *testing.B) {
	cudatest.Device(b)
	k := kernelsFor(b, BF16, 256)
	shapes := [][2]int{{1024, 1152}, {512, 1152}, {1152, 1024}, {13824, 1152}, {1152, 6912},
		{4096, 3840}, {3840, 4096}, {30720, 3840}, {3840, 15360}}
	for _, sh := range shapes {
		for _, T := range []int{1, GEMVTokens} {
			rows, in := sh[0], sh[1]
			b.Run(fmt.Sprintf("%dx%d/T%d", rows, in, T), func(b *testing.B) {
				cudatest.Do(b, func(c *cuda.Ctx) error {
					n := int64(rows) * int64(in)
					m := benchMemory{c: c}
					defer m.free()
					ws := make([]cuda.DevicePtr, l2Copies(2*n))
					for i := range ws {
						ws[i] = m.alloc(2 * n)
					}
					x, out := m.alloc(2*int64(in)*GEMVTokens), m.alloc(2*int64(rows)*GEMVTokens)
					g := cuda.GEMM{M: T, N: rows, K: in, TransB: true, AType: cuda.BF16, BType: cuda.BF16, CType: cuda.BF16}
					for _, op := range []struct {
						name string
						run  func(w cuda.DevicePtr) error
					}{
						{"cublas", func(w cuda.DevicePtr) error { return c.Matmul(g, 1, x, w, 0, out, nil) }},
						{"gemv", func(w cuda.DevicePtr) error { return k.GEMV(c, w, x, T, rows, in, rows, 0, out) }},
					} {
						us, err := launchMicros(b, c, 32, func(i int) error { return op.run(ws[i%len(ws)]) })
						if err != nil {
							return err
						}
						b.ReportMetric(us, op.name+"-µs")
						b.ReportMetric(float64(2*n)/(us*1e-6)/1e9, op.name+"-GB/s")
					}
					return nil
				})
			})
		}
	}
}

// BenchmarkDropout times dropout's three kernels on a 12B micro-batch's
// projection inputs (8192 tokens of 3840 and of 15360 values) beside a
// device copy of the input (the bytes the recording kernel reads and,
// but for the mask, writes): the ratio says how far each is from the
// memory bound. Medians of 20 back-to-back launches.
func BenchmarkDropout(b *testing.B) {
	cudatest.Device(b)
	k := kernelsFor(b, BF16, 256)
	drop := trainer.NewDropout(0.05, 7)
	stream := trainer.DropoutStream(3, trainer.GateProj)
	for _, in := range []int{3840, 15360} {
		n := int64(8192) * int64(in)
		b.Run(fmt.Sprintf("8192x%d", in), func(b *testing.B) {
			cudatest.Do(b, func(c *cuda.Ctx) error {
				m := benchMemory{c: c}
				defer m.free()
				x, out, mask, dst := m.alloc(2*n), m.alloc(2*n), m.alloc(MaskBytes(n)), m.alloc(4*n)
				for _, op := range []struct {
					name string
					run  func() error
				}{
					{"record", func() error { return k.DropoutRecord(c, x, out, mask, n, drop, stream) }},
					{"replay", func() error { return k.DropoutReplay(c, x, out, mask, n, drop.Scale) }},
					{"add", func() error { return k.DropoutAdd(c, x, dst, mask, n, drop.Scale) }},
					{"copy", func() error { return c.CopyDtoDAsync(out, x, 2*n, nil) }},
				} {
					us, err := launchMicros(b, c, 20, func(int) error { return op.run() })
					if err != nil {
						return err
					}
					b.ReportMetric(us, op.name+"-µs")
				}
				return nil
			})
		})
	}
}

// BenchmarkNF4Dequantize times the dequantisation of Gemma 3 12B's
// projection shapes to bfloat16 beside a device copy of as many bytes as
// it writes (it also reads a quarter as many): the ratio says how far it
// is from the memory bound. Medians of 20 back-to-back launches over
// copies of the weights that overflow the L2 cache.
func BenchmarkNF4Dequantize(b *testing.B) {
	cudatest.Device(b)
	k := kernelsFor(b, BF16, 256)
	benchMatrices(b, [][2]int{{4096, 3840}, {15360, 3840}}, func(b *testing.B, c *cuda.Ctx, m *benchMemory, rows, in int) error {
		n := int64(rows) * int64(in)
		ws := m.nf4Copies(n, n/2, false)
		out, src := m.alloc(2*n), m.alloc(2*n)
		for _, op := range []struct {
			name string
			run  func(i int) error
		}{
			{"dequantize", func(i int) error {
				w := ws[i%len(ws)]
				return k.NF4Dequantize(c, w.packed, w.aq, w.a2, 0, n, RoundBF16, out)
			}},
			{"copy", func(int) error { return c.CopyDtoDAsync(out, src, 2*n, nil) }},
		} {
			us, err := launchMicros(b, c, 20, op.run)
			if err != nil {
				return err
			}
			b.ReportMetric(us, op.name+"-µs")
		}
		b.ReportMetric(float64(n/2+n/64+2*n)/1e6, "dequantize-MB")
		return nil
	})
}

// TestNF4RepackTiles: nf4_tile_repack writes each 16-row tile's 64-blocks
// as decode_token reads them (lane g·4 + c: rows g and g + 8 at positions
// 16c .. 16c + 15; the absmax codes of rows g and g + 8 side by side),
// rows past the last repeating it, by the byte against the same order
// taken on the host.
func TestNF4RepackTiles(t *testing.T) {
	k := kernelsFor(t, BF16, 256)
	for _, sh := range [][2]int{{37, 64}, {16, 128}, {130, 2560}} {
		rows, in := sh[0], sh[1]
		t.Run(fmt.Sprintf("%dx%d", rows, in), func(t *testing.T) {
			rng := cudatest.Rand(t)
			w := make([]float32, rows*in)
			for i := range w {
				w[i] = float32(rng.NormFloat64())
			}
			nf, err := trainer.QuantizeNF4(w, []int{rows, in}, "bfloat16")
			if err != nil {
				t.Fatal(err)
			}
			blocks, tiles := in/64, (rows+15)/16
			wantCodes := make([]uint8, 0, tiles*blocks*512)
			wantAbsmax := make([]uint8, 0, tiles*blocks*16)
			for tile := range tiles {
				for b := range blocks {
					row := func(r int) int { return min(16*tile+r, rows-1) }
					for lane := range 32 {
						g, c := lane/4, lane%4
						for _, r := range []int{row(g), row(g + 8)} {
							at := (r*blocks+b)*32 + 8*c
							wantCodes = append(wantCodes, nf.Packed[at:at+8]...)
						}
					}
					for g := range 8 {
						wantAbsmax = append(wantAbsmax, nf.AbsmaxQ[row(g)*blocks+b], nf.AbsmaxQ[row(g+8)*blocks+b])
					}
				}
			}
			codes, absmax := NF4TileBytes(rows, in)
			if codes != int64(len(wantCodes)) || absmax != int64(len(wantAbsmax)) {
				t.Fatalf("NF4TileBytes: %d and %d bytes, want %d and %d", codes, absmax, len(wantCodes), len(wantAbsmax))
			}
			run(t, k, func(d *dev) error {
				packed, aq := d.u8(nf.Packed), d.u8(nf.AbsmaxQ)
				tc, ta := d.alloc(codes), d.alloc(absmax)
				if err := k.NF4RepackTiles(d.c, packed, aq, rows, in, tc, ta); err != nil {
					return err
				}
				gotCodes, gotAbsmax := make([]uint8, codes), make([]uint8, absmax)
				if err := cuda.Download(d.c, gotCodes, tc); err != nil {
					return err
				}
				if err := cuda.Download(d.c, gotAbsmax, ta); err != nil {
					return err
				}
				if !bytes.Equal(gotCodes, wantCodes) {
					t.Error("the tiles' codes differ from the host's order")
				}
				if !bytes.Equal(gotAbsmax, wantAbsmax) {
					t.Error("the tiles' absmax codes differ from the host's order")
				}
				return nil
			})
		})
	}
}

// TestLoRAFew: a decoding step's adapter updates, up to three projections
// of one input at once, equal out + scale·round(x·Aᵀ)·Bᵀ computed on the
// host, for rows of A cut into one span or several, every token count up
// to LoRAFewTokens, and outputs of different heights; nothing past an
// output is written.
func TestLoRAFew(t *testing.T) {
	type shape struct {
		in, rank int
		rows     []int
	}
	shapes := []shape{{1152, 16, []int{1024}}, {3840, 8, []int{256, 259}}, {2048, 16, []int{512, 96, 96}}, {9216, 32, []int{64}}, {1152, 6, []int{100, 37}}}
	for _, p := range precisions {
		k := kernelsFor(t, p, 256)
		for _, sh := range shapes {
			for _, T := range []int{1, 5, LoRAFewTokens} {
				t.Run(fmt.Sprintf("%s/in%d/r%d/%dproj/T%d", p, sh.in, sh.rank, len(sh.rows), T), func(t *testing.T) {
					rng := cudatest.Rand(t)
					const scale = 2
					x := roundAct(p, uniform(rng, T*sh.in, 1))
					run(t, k, func(d *dev) error {
						var ps []LoRAProduct
						var wants, outs0 [][]float32
						for _, rows := range sh.rows {
							A := roundAct(p, uniform(rng, sh.rank*sh.in, 0.05))
							B := roundAct(p, uniform(rng, rows*sh.rank, 0.1))
							out0 := roundAct(p, uniform(rng, T*rows+7, 0.5)) // 7 past the output
							want := make([]float32, T*rows)
							for tok := 0; tok < T; tok++ {
								xa := make([]float64, sh.rank)
								for j := range xa {
									var s float64
									for i := 0; i < sh.in; i++ {
										s += float64(A[j*sh.in+i]) * float64(x[tok*sh.in+i])
									}
									xa[j] = float64(roundAct(p, []float32{float32(s)})[0])
								}
								for o := 0; o < rows; o++ {
									var u float64
									for j := range xa {
										u += float64(B[o*sh.rank+j]) * xa[j]
									}
									want[tok*rows+o] = float32(float64(out0[tok*rows+o]) + scale*u)
								}
							}
							ps = append(ps, LoRAProduct{A: d.act(A), B: d.act(B), Out: d.act(out0), Rows: rows})
							wants, outs0 = append(wants, want), append(outs0, out0)
						}
						part := d.alloc(LoRAFewPartBytes(sh.in, sh.rank))
						if err := k.LoRAFew(d.c, d.act(x), T, sh.in, sh.rank, scale, ps, part); err != nil {
							return err
						}
						for i, q := range ps {
							got := d.readAct(q.Out, T*q.Rows+7)
							d.check(fmt.Sprintf("projection %d", i), got[:T*q.Rows], wants[i], tol(p, sh.in))
							for e := T * q.Rows; e < len(got); e++ {
								if got[e] != outs0[i][e] {
									return fmt.Errorf("projection %d: element %d, past the output, changed from %v to %v", i, e, outs0[i][e], got[e])
								}
							}
						}
						return nil
					})
				})
			}
		}
	}
}
