package cuda_test

// Tests that need a GPU. Each skips cleanly (cudatest.Device) where none is
// usable; scripts/gpu-build.sh builds them for a GPU machine.

import (
	"bytes"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"strings"
	"sync"
	"testing"
	"time"
	"unsafe"

	"gemmaft/cuda"
	"gemmaft/cuda/cudatest"
	"gemmaft/internal/half"
)

// operand is one GEMM buffer's host values: bfloat16 bits or float32.
type operand struct {
	t    cuda.DType
	bf16 []uint16
	f32  []float32
}

func randomOperand(rng *rand.Rand, t cuda.DType, n int64) operand {
	if t == cuda.BF16 {
		return operand{t: t, bf16: cudatest.UniformBF16(rng, int(n), 1)}
	}
	return operand{t: t, f32: cudatest.Uniform(rng, int(n), 1)}
}

func (o operand) f64() []float64 {
	if o.t == cuda.BF16 {
		return cudatest.F64FromBF16(o.bf16)
	}
	return cudatest.F64(o.f32)
}

func (o operand) upload(c *cuda.Ctx) (cuda.Buffer, error) {
	n := int64(len(o.f32))*4 + int64(len(o.bf16))*2
	b, err := c.Alloc(n)
	if err != nil {
		return b, err
	}
	if o.t == cuda.BF16 {
		return b, cuda.Upload(c, b.Ptr, o.bf16)
	}
	return b, cuda.Upload(c, b.Ptr, o.f32)
}

func download(c *cuda.Ctx, t cuda.DType, p cuda.DevicePtr, n int64) ([]float64, error) {
	if t == cuda.BF16 {
		h := make([]uint16, n)
		err := cuda.Download(c, h, p)
		return cudatest.F64FromBF16(h), err
	}
	h := make([]float32, n)
	err := cuda.Download(c, h, p)
	return cudatest.F64(h), err
}

// gemmRef computes the GEMM in float64 on the host, row-major, writing
// only the logical elements of out (which starts as C).
func gemmRef(g cuda.GEMM, a, b, c []float64, alpha, beta float64) []float64 {
	out := append([]float64(nil), c...)
	for bt := 0; bt < g.Batch; bt++ {
		oa, ob, oc := int64(bt)*g.StrideA, int64(bt)*g.StrideB, int64(bt)*g.StrideC
		for i := 0; i < g.M; i++ {
			for j := 0; j < g.N; j++ {
				var s float64
				for k := 0; k < g.K; k++ {
					var x, y float64
					if g.TransA {
						x = a[oa+int64(k*g.LDA+i)]
					} else {
						x = a[oa+int64(i*g.LDA+k)]
					}
					if g.TransB {
						y = b[ob+int64(j*g.LDB+k)]
					} else {
						y = b[ob+int64(k*g.LDB+j)]
					}
					s += x * y
				}
				idx := oc + int64(i*g.LDC+j)
				out[idx] = alpha*s + beta*c[idx]
			}
		}
	}
	return out
}

// logical lists the indices of C's elements (not the padding between rows).
func logical(g cuda.GEMM) []int64 {
	var idx []int64
	for bt := 0; bt < g.Batch; bt++ {
		for i := 0; i < g.M; i++ {
			for j := 0; j < g.N; j++ {
				idx = append(idx, int64(bt)*g.StrideC+int64(i*g.LDC+j))
			}
		}
	}
	return idx
}

func TestGEMMAgainstCPU(t *testing.T) {
	cudatest.Device(t)
	shapes := []struct {
		name        string
		g           cuda.GEMM
		alpha, beta float32
	}{
		{"1x1x1", cuda.GEMM{M: 1, N: 1, K: 1}, 1, 0},
		{"7x13x5", cuda.GEMM{M: 7, N: 13, K: 5}, 1, 0},
		{"127x129x255 At", cuda.GEMM{M: 127, N: 129, K: 255, TransA: true}, 1, 0},
		{"33x65x17 Bt", cuda.GEMM{M: 33, N: 65, K: 17, TransB: true}, 1, 0},
		{"61x47x93 At Bt", cuda.GEMM{M: 61, N: 47, K: 93, TransA: true, TransB: true}, 0.75, 0},
		{"lora down 1000x32x1536 Bt", cuda.GEMM{M: 1000, N: 32, K: 1536, TransB: true}, 1, 0},
		{"lora up 1000x1536x32 Bt", cuda.GEMM{M: 1000, N: 1536, K: 32, TransB: true}, 2, 0},
		{"k32 333x517x32", cuda.GEMM{M: 333, N: 517, K: 32}, 1, 0},
		{"lora grad 32x1536x999 At", cuda.GEMM{M: 32, N: 1536, K: 999, TransA: true}, 1, 0},
		{"batch 3 of 45x37x29", cuda.GEMM{M: 45, N: 37, K: 29, Batch: 3}, 1, 0},
		{"batch 5 of 17x9x32 At, padded strides", cuda.GEMM{M: 17, N: 9, K: 32, TransA: true, Batch: 5,
			StrideA: 32*17 + 3, StrideB: 32*9 + 5, StrideC: 17*9 + 7}, 1, 0},
		{"batch 2 of 3x96x80 Bt, shared A, apart", cuda.GEMM{M: 3, N: 96, K: 80, TransB: true, Batch: 2, SharedA: true,
			StrideC: 3*96 + 40}, 1, 0},
		{"padded rows 50x40x30", cuda.GEMM{M: 50, N: 40, K: 30, LDA: 37, LDB: 45, LDC: 41}, 1, 0},
		{"accumulate 129x31x77 beta 1", cuda.GEMM{M: 129, N: 31, K: 77}, 0.5, 1},
	}
	types := []struct{ in, out cuda.DType }{{cuda.BF16, cuda.BF16}, {cuda.BF16, cuda.F32}, {cuda.F32, cuda.F32}}
	for _, sh := range shapes {
		for _, ty := range types {
			t.Run(fmt.Sprintf("%s %s-%s", sh.name, ty.in, ty.out), func(t *testing.T) {
				g := sh.g
				g.AType, g.BType, g.CType = ty.in, ty.in, ty.out
				g, err := g.Normalized()
				if err != nil {
					t.Fatal(err)
				}
				na, nb, nc := g.Elements()
				rng := cudatest.Rand(t)
				a, b := randomOperand(rng, ty.in, na), randomOperand(rng, ty.in, nb)
				var c operand
				if sh.beta != 0 {
					c = randomOperand(rng, ty.out, nc)
				}
				var got []float64
				cudatest.Do(t, func(ctx *cuda.Ctx) error {
					da, err := a.upload(ctx)
					if err != nil {
						return err
					}
					defer ctx.Free(da)
					db, err := b.upload(ctx)
					if err != nil {
						return err
					}
					defer ctx.Free(db)
					dc, err := ctx.Alloc(nc * int64(ty.out.Size()))
					if err != nil {
						return err
					}
					defer ctx.Free(dc)
					if sh.beta != 0 {
						if dc, err = c.upload(ctx); err != nil {
							return err
						}
						defer ctx.Free(dc)
					} else if err := cudatest.Poison(ctx, dc); err != nil {
						return err
					}
					if err := ctx.Matmul(g, sh.alpha, da.Ptr, db.Ptr, sh.beta, dc.Ptr, nil); err != nil {
						return err
					}
					got, err = download(ctx, ty.out, dc.Ptr, nc)
					return err
				})
				cInit := make([]float64, nc)
				if sh.beta != 0 {
					cInit = c.f64()
				}
				want := gemmRef(g, a.f64(), b.f64(), cInit, float64(sh.alpha), float64(sh.beta))
				idx := logical(g)
				gotL, wantL := make([]float64, len(idx)), make([]float64, len(idx))
				inside := make(map[int64]bool, len(idx))
				for i, k := range idx {
					gotL[i], wantL[i] = got[k], want[k]
					inside[k] = true
				}
				tol := cudatest.BF16
				if ty.out == cuda.F32 {
					tol = cudatest.F32Sum(g.K)
				}
				res, err := cudatest.Compare(gotL, wantL, tol)
				if err != nil {
					t.Fatal(err)
				}
				t.Logf("relative error %.2e (tolerance %.0e)", res.RelErr, tol.Rel)
				if sh.beta == 0 {
					for k := range got {
						if !inside[int64(k)] && !math.IsNaN(got[k]) {
							t.Fatalf("element %d outside C's rows was written: %v", k, got[k])
						}
					}
				}
			})
		}
	}
}

// TestGEMMTuning: with tuning on, a plan's first call times several
// algorithms on a scratch copy of the output, reports the outcome, and
// still computes the call's own result once (here an accumulation, which
// a stray timed run would have added to again).
func TestGEMMTuning(t *testing.T) {
	cudatest.Device(t)
	g, err := cuda.GEMM{M: 1000, N: 3072, K: 32, TransB: true, AType: cuda.BF16, BType: cuda.BF16, CType: cuda.BF16}.Normalized()
	if err != nil {
		t.Fatal(err)
	}
	na, nb, nc := g.Elements()
	rng := cudatest.Rand(t)
	a, b, c := randomOperand(rng, cuda.BF16, na), randomOperand(rng, cuda.BF16, nb), randomOperand(rng, cuda.BF16, nc)
	var lines []string
	var got []float64
	cudatest.Do(t, func(ctx *cuda.Ctx) error {
		if err := ctx.SetGEMMTuning(8, func(l string) { lines = append(lines, l) }); err != nil {
			return err
		}
		defer ctx.SetGEMMTuning(0, nil)
		bufs := make([]cuda.Buffer, 3)
		for i, o := range []operand{a, b, c} {
			if bufs[i], err = o.upload(ctx); err != nil {
				return err
			}
			defer ctx.Free(bufs[i])
		}
		if err := ctx.Matmul(g, 2, bufs[0].Ptr, bufs[1].Ptr, 1, bufs[2].Ptr, nil); err != nil {
			return err
		}
		got, err = download(ctx, cuda.BF16, bufs[2].Ptr, nc)
		return err
	})
	want := gemmRef(g, a.f64(), b.f64(), c.f64(), 2, 1)
	res, err := cudatest.Compare(got, want, cudatest.BF16)
	if err != nil {
		t.Fatal(err)
	}
	if len(lines) != 1 || !strings.Contains(lines[0], g.String()) {
		t.Fatalf("tuning reported %q, want one line on %s", lines, g)
	}
	t.Logf("%s; relative error %.2e", lines[0], res.RelErr)
}

func TestGEMMRejectsBadShapes(t *testing.T) {
	cudatest.Do(t, func(c *cuda.Ctx) error {
		err := c.Matmul(cuda.GEMM{M: 4, N: 4, K: 0, AType: cuda.BF16, BType: cuda.BF16}, 1, 0, 0, 0, 0, nil)
		if err == nil {
			t.Error("K = 0 accepted")
		}
		return nil
	})
}

// launch1D runs a grid-stride elementwise kernel; the grid is capped so
// that large sizes exercise the stride loop.
func launch1D(c *cuda.Ctx, f *cuda.Function, n int, args ...any) error {
	cfg := cuda.Grid1D(n, 256)
	cfg.Grid.X = min(cfg.Grid.X, 512)
	return c.Launch(f, cfg, args...)
}

// kernel compiles a built-in file and looks up one of its kernels. It runs
// inside Do, so it returns errors rather than stopping the test (FailNow
// must not run on the device's goroutine).
func kernel(c *cuda.Ctx, file, name string) (*cuda.Function, error) {
	src, err := cuda.BuiltinSource(file)
	if err != nil {
		return nil, err
	}
	m, err := c.Compile(src)
	if err != nil {
		return nil, err
	}
	return m.Function(name)
}

// kernels looks up several kernels of one file.
func kernels(c *cuda.Ctx, file string, names ...string) ([]*cuda.Function, error) {
	out := make([]*cuda.Function, len(names))
	for i, n := range names {
		f, err := kernel(c, file, n)
		if err != nil {
			return nil, err
		}
		out[i] = f
	}
	return out, nil
}

var elementwiseSizes = []int{1, 2, 7, 31, 32, 33, 255, 256, 257, 1000, 4097, 65537, 1<<20 + 3, 3 << 20}

func TestElementwiseKernels(t *testing.T) {
	cudatest.Device(t)
	for _, n := range elementwiseSizes {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			rng := cudatest.Rand(t)
			x := cudatest.Uniform(rng, n, 4)
			y0 := cudatest.Uniform(rng, n, 4)
			xb := cudatest.UniformBF16(rng, n, 4)
			a, b := float32(rng.Float64()*2-1), float32(rng.Float64()*2-1)
			var axpby []float32
			var conv []uint16
			var back []float32
			cudatest.Do(t, func(c *cuda.Ctx) error {
				fs, err := kernels(c, "elementwise.cu", "convert_f32_bf16", "axpby_f32", "convert_bf16_f32")
				if err != nil {
					return err
				}
				bufs := make([]cuda.Buffer, 6)
				for i, size := range []int64{4, 4, 4, 2, 2, 2} {
					var err error
					if bufs[i], err = c.Alloc(int64(n) * size); err != nil {
						return err
					}
					defer c.Free(bufs[i])
				}
				dx, dy, dz, dxb, dyb, dconv := bufs[0], bufs[1], bufs[2], bufs[3], bufs[4], bufs[5]
				if err := cuda.Upload(c, dx.Ptr, x); err != nil {
					return err
				}
				if err := cuda.Upload(c, dxb.Ptr, xb); err != nil {
					return err
				}
				for _, p := range []cuda.Buffer{dy, dyb, dconv} {
					if err := cudatest.Poison(c, p); err != nil {
						return err
					}
				}
				n64 := int64(n)
				if err := launch1D(c, fs[0], n, dx, dconv, n64); err != nil {
					return err
				}
				conv = make([]uint16, n)
				if err := cuda.Download(c, conv, dconv.Ptr); err != nil {
					return err
				}
				// axpby reads and writes y, so it starts from fresh values.
				if err := cuda.Upload(c, dz.Ptr, y0); err != nil {
					return err
				}
				if err := launch1D(c, fs[1], n, a, dx, b, dz, n64); err != nil {
					return err
				}
				axpby = make([]float32, n)
				if err := cuda.Download(c, axpby, dz.Ptr); err != nil {
					return err
				}
				if err := cudatest.Poison(c, dy); err != nil {
					return err
				}
				if err := launch1D(c, fs[2], n, dxb, dy, n64); err != nil {
					return err
				}
				back = make([]float32, n)
				return cuda.Download(c, back, dy.Ptr)
			})
			wantAxpby := make([]float64, n)
			for i := range n {
				wantAxpby[i] = float64(a)*float64(x[i]) + float64(b)*float64(y0[i])
			}
			if _, err := cudatest.Compare(cudatest.F64(axpby), wantAxpby, cudatest.F32); err != nil {
				t.Errorf("axpby_f32: %v", err)
			}
			for i := range n {
				if want := half.BF16(x[i]); conv[i] != want {
					t.Fatalf("convert_f32_bf16[%d]: %#04x, host rounding gives %#04x (x = %v)", i, conv[i], want, x[i])
				}
				if back[i] != half.FromBF16(xb[i]) {
					t.Fatalf("convert_bf16_f32[%d]: %v, want %v", i, back[i], half.FromBF16(xb[i]))
				}
			}
		})
	}
}

// Rounding ties and special values must convert on the GPU exactly as the
// host does.
func TestConvertSpecialValues(t *testing.T) {
	vals := []float32{float32(math.Inf(1)), float32(math.Inf(-1)), float32(math.NaN()), 0, float32(math.Copysign(0, -1)),
		math.Float32frombits(0x3f808000), math.Float32frombits(0x3f818000), math.Float32frombits(0x7f7fffff),
		math.Float32frombits(0x00000001), math.Float32frombits(0x7f800001)}
	got := make([]uint16, len(vals))
	cudatest.Do(t, func(c *cuda.Ctx) error {
		f, err := kernel(c, "elementwise.cu", "convert_f32_bf16")
		if err != nil {
			return err
		}
		dx, err := c.Alloc(int64(len(vals)) * 4)
		if err != nil {
			return err
		}
		defer c.Free(dx)
		dy, err := c.Alloc(int64(len(vals)) * 2)
		if err != nil {
			return err
		}
		defer c.Free(dy)
		if err := cuda.Upload(c, dx.Ptr, vals); err != nil {
			return err
		}
		if err := launch1D(c, f, len(vals), dx, dy, int64(len(vals))); err != nil {
			return err
		}
		return cuda.Download(c, got, dy.Ptr)
	})
	for i, v := range vals {
		if want := half.BF16(v); got[i] != want {
			t.Errorf("%#08x: GPU %#04x, host %#04x", math.Float32bits(v), got[i], want)
		}
	}
}

func TestRowReductions(t *testing.T) {
	cudatest.Device(t)
	shapes := []struct{ rows, cols, block int }{
		{1, 1, 256}, {3, 7, 256}, {17, 31, 32}, {2, 32, 32}, {5, 33, 64}, {64, 1000, 256},
		{7, 3840, 256}, {3, 4097, 1024}, {2, 262144, 1024}, {1000, 256, 128}, {4099, 1152, 256},
	}
	for _, sh := range shapes {
		t.Run(fmt.Sprintf("%dx%d block %d", sh.rows, sh.cols, sh.block), func(t *testing.T) {
			rng := cudatest.Rand(t)
			n := sh.rows * sh.cols
			x := cudatest.Uniform(rng, n, 2)
			sums := make([]float32, sh.rows)
			cudatest.Do(t, func(c *cuda.Ctx) error {
				fs, err := kernels(c, "reduce.cu", "row_sum_f32")
				if err != nil {
					return err
				}
				dx, err := c.Alloc(int64(n) * 4)
				if err != nil {
					return err
				}
				defer c.Free(dx)
				ds, err := c.Alloc(int64(sh.rows) * 4)
				if err != nil {
					return err
				}
				defer c.Free(ds)
				if err := cuda.Upload(c, dx.Ptr, x); err != nil {
					return err
				}
				if err := cudatest.Poison(c, ds); err != nil {
					return err
				}
				cfg := cuda.LaunchConfig{Grid: cuda.Dim3{X: sh.rows}, Block: cuda.Dim3{X: sh.block}}
				if err := c.Launch(fs[0], cfg, dx, ds, int32(sh.rows), int32(sh.cols)); err != nil {
					return err
				}
				return cuda.Download(c, sums, ds.Ptr)
			})
			wantSum := make([]float64, sh.rows)
			for r := range sh.rows {
				var s float64
				for j := range sh.cols {
					s += float64(x[r*sh.cols+j])
				}
				wantSum[r] = s
			}
			res, err := cudatest.Compare(cudatest.F64(sums), wantSum, cudatest.F32Sum(sh.cols))
			if err != nil {
				t.Errorf("row_sum_f32: %v", err)
			}
			t.Logf("row_sum relative error %.2e", res.RelErr)
		})
	}
}

func TestNVRTCCacheColdAndWarm(t *testing.T) {
	dir := t.TempDir()
	comp, err := cuda.NewCompiler(dir)
	if err != nil {
		t.Fatal(err)
	}
	cudatest.Do(t, func(c *cuda.Ctx) error {
		src, err := cuda.BuiltinSource("elementwise.cu")
		if err != nil {
			return err
		}
		// Earlier tests may have loaded this source: drop it from the
		// context so the next Compile goes to the (empty) disk cache.
		loaded, err := c.Compile(src)
		if err != nil {
			return err
		}
		if err := loaded.Unload(); err != nil {
			return err
		}
		previous := c.Compiler()
		defer c.SetCompiler(previous)
		if err := c.SetCompiler(comp); err != nil {
			return err
		}
		cold, err := c.Compile(src)
		if err != nil {
			return err
		}
		coldTime, coldTarget := cold.LoadTime, cold.Target
		if cold.FromCache {
			t.Error("first compile into an empty cache claims to come from it")
		}
		if err := cold.Unload(); err != nil {
			return err
		}
		warm, err := c.Compile(src)
		if err != nil {
			return err
		}
		if !warm.FromCache {
			t.Error("second compile did not use the disk cache")
		}
		if want := c.Device().Info.ComputeCapLabel; coldTarget != want {
			t.Errorf("compiled for %s, the device is %s", coldTarget, want)
		}
		files, _ := os.ReadDir(dir)
		if len(files) != 1 {
			t.Errorf("cache holds %d files, want 1", len(files))
		}
		t.Logf("NVRTC elementwise.cu for %s: cold %v, from disk cache %v", coldTarget, coldTime, warm.LoadTime)
		fmt.Printf("RESULT nvrtc_compile_cold_ms %.2f\nRESULT nvrtc_compile_cached_ms %.3f\n",
			float64(coldTime.Microseconds())/1000, float64(warm.LoadTime.Microseconds())/1000)
		// A damaged cache file is recompiled, not loaded.
		if err := warm.Unload(); err != nil {
			return err
		}
		if err := os.WriteFile(dir+"/"+files[0].Name(), []byte("garbage"), 0o644); err != nil {
			return err
		}
		again, err := c.Compile(src)
		if err != nil {
			return fmt.Errorf("a damaged cache entry broke compilation: %w", err)
		}
		if again.FromCache {
			t.Error("a damaged cache entry was used")
		}
		return nil
	})
}

func TestNVRTCErrorShowsLog(t *testing.T) {
	cudatest.Do(t, func(c *cuda.Ctx) error {
		_, err := c.Compile(cuda.Source{Name: "broken.cu", Code: "extern \"C\" __global__ void k(float* y) {\n  y[0] = no_such_function();\n}\n"})
		var ne *cuda.NVRTCError
		if !errors.As(err, &ne) {
			t.Errorf("want an NVRTCError, got %v", err)
			return nil
		}
		if ne.Result.Name() != "NVRTC_ERROR_COMPILATION" || !strings.Contains(ne.Log, "broken.cu(2)") || !strings.Contains(ne.Log, "no_such_function") {
			t.Errorf("error lacks NVRTC's log: %v", err)
		}
		return nil
	})
}

func TestLaunchChecksArguments(t *testing.T) {
	var noParamInfo bool
	defer func() {
		if noParamInfo {
			t.Skip("this driver cannot report kernel parameters")
		}
	}()
	cudatest.Do(t, func(c *cuda.Ctx) error {
		f, err := kernel(c, "elementwise.cu", "axpby_f32")
		if err != nil {
			return err
		}
		if f.ParamSizes == nil {
			noParamInfo = true
			return nil
		}
		if got := fmt.Sprint(f.ParamSizes); got != "[4 8 4 8 8]" {
			t.Errorf("axpby_f32 parameter sizes %s", got)
		}
		cfg := cuda.Grid1D(1, 32)
		for _, args := range [][]any{
			{float32(1), cuda.DevicePtr(0), float32(1), cuda.DevicePtr(0)},           // too few
			{float32(1), cuda.DevicePtr(0), float32(1), cuda.DevicePtr(0), int32(1)}, // int32 for long long
			{float32(1), cuda.DevicePtr(0), float32(1), cuda.DevicePtr(0), 1},        // Go int
			{float64(1), cuda.DevicePtr(0), float32(1), cuda.DevicePtr(0), int64(1)}, // double for float
			{float32(1), cuda.DevicePtr(0), float32(1), cuda.DevicePtr(0), "one"},    // unsupported
		} {
			if err := c.Launch(f, cfg, args...); err == nil {
				t.Errorf("launch with %v accepted", args)
			}
		}
		return c.Synchronize()
	})
}

func TestAllocatorCachesAndCounts(t *testing.T) {
	cudatest.Do(t, func(c *cuda.Ctx) error {
		before := c.MemStats()
		a, err := c.Alloc(3<<20 + 5)
		if err != nil {
			return err
		}
		if err := c.Free(a); err != nil {
			return err
		}
		b, err := c.Alloc(3<<20 + 100) // same size class
		if err != nil {
			return err
		}
		after := c.MemStats()
		if b.Ptr != a.Ptr || after.CacheHits != before.CacheHits+1 {
			t.Errorf("a freed block of the same class was not reused: %+v -> %+v", before, after)
		}
		if after.InUse-before.InUse < 3<<20 || after.PeakInUse < after.InUse {
			t.Errorf("in-use accounting off: %+v", after)
		}
		if err := c.Free(b); err != nil {
			return err
		}
		if err := c.Free(b); err == nil {
			t.Error("double free accepted")
		}
		if _, err := c.Alloc(0); err == nil {
			t.Error("Alloc(0) accepted")
		}
		if err := c.EmptyCache(); err != nil {
			return err
		}
		if s := c.MemStats(); s.Cached != 0 {
			t.Errorf("cache not emptied: %+v", s)
		}
		return nil
	})
}

// TestAllocWhole: a lasting buffer's block is its size in whole pages
// (what memory plans count, WholeBytes), and the device's free memory falls
// by about that much, not by Alloc's size class.
func TestAllocWhole(t *testing.T) {
	cudatest.Do(t, func(c *cuda.Ctx) error {
		const n = 33<<20 + 5 // Alloc's class: 36 MiB; whole pages: 34 MiB
		if err := c.EmptyCache(); err != nil {
			return err
		}
		free0, _, err := c.MemInfo()
		if err != nil {
			return err
		}
		before := c.MemStats()
		b, err := c.AllocWhole(n)
		if err != nil {
			return err
		}
		free1, _, err := c.MemInfo()
		if err != nil {
			return err
		}
		if got := c.MemStats().InUse - before.InUse; got != cuda.WholeBytes(n) || got != 34<<20 {
			t.Errorf("AllocWhole(%d) holds %d bytes, want %d", n, got, cuda.WholeBytes(n))
		}
		if took := free0 - free1; took < 34<<20 || took >= 36<<20 {
			t.Errorf("AllocWhole(%d) took %d bytes of the device's free memory, want 34 MiB (less than the 36 of Alloc's class)", n, took)
		}
		if _, err := c.AllocWhole(0); err == nil {
			t.Error("AllocWhole(0) accepted")
		}
		return c.Free(b)
	})
}

func TestCtxRefusedOutsideDo(t *testing.T) {
	var leaked *cuda.Ctx
	cudatest.Do(t, func(c *cuda.Ctx) error { leaked = c; return nil })
	if _, err := leaked.Alloc(16); !errors.Is(err, cuda.ErrOutsideDo) {
		t.Errorf("Alloc outside Do: %v", err)
	}
}

// Many goroutines share one device; every driver call still lands on the
// device's own thread.
func TestConcurrentDo(t *testing.T) {
	dev := cudatest.Device(t)
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := cudatest.RandSeeded(uint64(g) + 1)
			for range 40 {
				x := cudatest.Uniform(rng, 1+rng.IntN(5000), 1)
				back := make([]float32, len(x))
				err := dev.Do(func(c *cuda.Ctx) error {
					b, err := c.Alloc(int64(len(x)) * 4)
					if err != nil {
						return err
					}
					defer c.Free(b)
					if err := cuda.Upload(c, b.Ptr, x); err != nil {
						return err
					}
					return cuda.Download(c, back, b.Ptr)
				})
				if err == nil && !equalF32(back, x) {
					err = errors.New("data came back changed")
				}
				if err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func equalF32(a, b []float32) bool {
	for i := range a {
		if math.Float32bits(a[i]) != math.Float32bits(b[i]) {
			return false
		}
	}
	return len(a) == len(b)
}

func TestPinnedAsyncCopies(t *testing.T) {
	rng := cudatest.Rand(t)
	const n = 64 << 20
	cudatest.Do(t, func(c *cuda.Ctx) error {
		src, err := c.AllocHost(n)
		if err != nil {
			return err
		}
		defer c.FreeHost(src)
		dst, err := c.AllocHost(n)
		if err != nil {
			return err
		}
		defer c.FreeHost(dst)
		for i := range src.Bytes {
			src.Bytes[i] = byte(rng.Uint32())
		}
		for i := range dst.Bytes {
			dst.Bytes[i] = 0xa5
		}
		d1, err := c.Alloc(n)
		if err != nil {
			return err
		}
		defer c.Free(d1)
		d2, err := c.Alloc(n)
		if err != nil {
			return err
		}
		defer c.Free(d2)
		s, err := c.NewStream()
		if err != nil {
			return err
		}
		defer s.Destroy()
		if err := c.CopyHtoDAsync(d1.Ptr, src, s); err != nil {
			return err
		}
		if err := c.CopyDtoDAsync(d2.Ptr, d1.Ptr, n, s); err != nil {
			return err
		}
		if err := c.CopyDtoHAsync(dst, d2.Ptr, s); err != nil {
			return err
		}
		if err := s.Synchronize(); err != nil {
			return err
		}
		if !bytes.Equal(src.Bytes, dst.Bytes) {
			t.Error("bytes changed on the way through the device")
		}
		return nil
	})
}

// TestMappedHostMemory: a kernel reads and writes mapped host memory at
// its Dev address, and a Sub view copies only its part of a buffer.
func TestMappedHostMemory(t *testing.T) {
	const n = 1 << 20
	cudatest.Do(t, func(c *cuda.Ctx) error {
		f, err := kernel(c, "elementwise.cu", "axpby_f32")
		if err != nil {
			return err
		}
		x, err := c.AllocMapped(4 * n)
		if err != nil {
			return err
		}
		defer c.FreeHost(x)
		y, err := c.AllocMapped(4 * n)
		if err != nil {
			return err
		}
		defer c.FreeHost(y)
		if x.Dev == 0 || y.Dev == 0 {
			t.Fatal("a mapped buffer without a device address")
		}
		xs, ys := f32s(x.Bytes), f32s(y.Bytes)
		for i := range xs {
			xs[i], ys[i] = float32(i), float32(3*i)
		}
		if err := c.Launch(f, cuda.Grid1D(n, 256), float32(2), x.Dev, float32(-1), y.Dev, int64(n)); err != nil {
			return err
		}
		if err := c.Synchronize(); err != nil {
			return err
		}
		for i, v := range ys {
			if v != float32(-i) {
				t.Fatalf("y[%d] = %v after y = 2x − y in mapped memory, want %v", i, v, float32(-i))
			}
		}
		// The second quarter of x through the device into the first of y.
		d, err := c.Alloc(n)
		if err != nil {
			return err
		}
		defer c.Free(d)
		if err := c.CopyHtoDAsync(d.Ptr, x.Sub(n, n), nil); err != nil {
			return err
		}
		if err := c.CopyDtoHAsync(y.Sub(0, n), d.Ptr, nil); err != nil {
			return err
		}
		if err := c.Synchronize(); err != nil {
			return err
		}
		for i := 0; i < n/4; i++ {
			if ys[i] != xs[n/4+i] {
				t.Fatalf("y[%d] = %v after copying x's second quarter, want %v", i, ys[i], xs[n/4+i])
			}
		}
		if ys[n/4] != float32(-n/4) {
			t.Errorf("the copy of a Sub view wrote past it: y[%d] = %v", n/4, ys[n/4])
		}
		if err := c.FreeHost(x.Sub(0, 4)); err == nil {
			t.Error("FreeHost of a Sub view accepted")
		}
		return nil
	})
}

func f32s(b []byte) []float32 { return unsafe.Slice((*float32)(unsafe.Pointer(&b[0])), len(b)/4) }

// TestGraphReplaysLaunches: a captured graph, replayed twice, does the
// work twice; captured on a stream of its own (Capture) or from the
// working stream (CaptureWorking, which leaves the working stream as it
// was).
func TestGraphReplaysLaunches(t *testing.T) {
	for _, working := range []bool{false, true} {
		t.Run(fmt.Sprintf("working=%v", working), func(t *testing.T) { testGraphReplaysLaunches(t, working) })
	}
}

func testGraphReplaysLaunches(t *testing.T, working bool) {
	rng := cudatest.Rand(t)
	const n, steps = 100003, 10
	x := cudatest.Uniform(rng, n, 1)
	y := cudatest.Uniform(rng, n, 1)
	got := make([]float32, n)
	cudatest.Do(t, func(c *cuda.Ctx) error {
		f, err := kernel(c, "elementwise.cu", "axpby_f32")
		if err != nil {
			return err
		}
		dx, err := c.Alloc(n * 4)
		if err != nil {
			return err
		}
		defer c.Free(dx)
		dy, err := c.Alloc(n * 4)
		if err != nil {
			return err
		}
		defer c.Free(dy)
		if err := cuda.Upload(c, dx.Ptr, x); err != nil {
			return err
		}
		if err := cuda.Upload(c, dy.Ptr, y); err != nil {
			return err
		}
		var s *cuda.Stream // nil: the working stream
		if !working {
			if s, err = c.NewStream(); err != nil {
				return err
			}
			defer s.Destroy()
		}
		launches := func() error {
			for range steps {
				cfg := cuda.Grid1D(n, 256)
				cfg.Stream = s
				if err := c.Launch(f, cfg, float32(1), dx, float32(1), dy, int64(n)); err != nil {
					return err
				}
			}
			return nil
		}
		before := c.Stream()
		var g *cuda.Graph
		if working {
			g, err = c.CaptureWorking(launches)
		} else {
			g, err = c.Capture(s, launches)
		}
		if err != nil {
			return err
		}
		defer g.Destroy()
		if c.Stream() != before {
			t.Error("the working stream changed")
		}
		for range 2 {
			if err := g.Launch(s); err != nil {
				return err
			}
		}
		if s != nil {
			if err := s.Synchronize(); err != nil {
				return err
			}
		}
		return cuda.Download(c, got, dy.Ptr)
	})
	want := make([]float64, n)
	for i := range want {
		want[i] = float64(y[i]) + 2*steps*float64(x[i])
	}
	if _, err := cudatest.Compare(cudatest.F64(got), want, cudatest.F32Sum(2*steps)); err != nil {
		t.Error(err)
	}
}

// Do calls racing with Close either run or report ErrClosed; none hangs.
func TestDoRacingClose(t *testing.T) {
	cudatest.Device(t)
	d, err := cuda.Open(0) // a second handle on the same primary context
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				err := d.Do(func(c *cuda.Ctx) error {
					b, err := c.Alloc(4096)
					if err != nil {
						return err
					}
					return c.Free(b)
				})
				if errors.Is(err, cuda.ErrClosed) {
					return
				}
				if err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	time.Sleep(20 * time.Millisecond)
	d.Close()
	finished := make(chan struct{})
	go func() { wg.Wait(); close(finished) }()
	select {
	case <-finished:
	case <-time.After(10 * time.Second):
		t.Fatal("Do calls still waiting 10 s after Close")
	}
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if err := d.Do(func(*cuda.Ctx) error { return nil }); !errors.Is(err, cuda.ErrClosed) {
		t.Errorf("Do after Close: %v", err)
	}
}
