package cuda

import (
	"fmt"
	"math"
	"time"
	"unsafe"

	"gemmaft/internal/half"
)

// SelfTest checks on c's device the three things training needs: a built-in
// kernel compiles with NVRTC (or loads from the kernel cache), it runs and
// computes what the CPU computes, and cuBLASLt multiplies bfloat16 matrices
// as a float64 CPU reference does. It returns a line for each check passed,
// for people to read, and stops at the first failure with an error that
// names the check.
func SelfTest(c *Ctx) ([]string, error) {
	var passed []string
	src, err := BuiltinSource("elementwise.cu")
	if err != nil {
		return passed, err
	}
	m, err := c.Compile(src)
	if err != nil {
		return passed, fmt.Errorf("compiling %s: %w", src.Name, err)
	}
	how := "compiled"
	if m.FromCache {
		how = "from cache"
	}
	passed = append(passed, fmt.Sprintf("NVRTC kernel for %s: %s in %v", m.Target, how, m.LoadTime.Round(time.Millisecond/10)))
	if err := selfTestKernel(c, m); err != nil {
		return passed, fmt.Errorf("kernel launch (axpby_f32): %w", err)
	}
	passed = append(passed, "kernel launch: ok")
	g := GEMM{M: 67, N: 45, K: 32, AType: BF16, BType: BF16, CType: F32}
	if err := selfTestGEMM(c, g); err != nil {
		return passed, fmt.Errorf("cuBLASLt GEMM %s: %w", g, err)
	}
	passed = append(passed, fmt.Sprintf("cuBLASLt bf16 GEMM %dx%dx%d: ok", g.M, g.N, g.K))
	return passed, nil
}

// selfTestKernel runs y = 2x + 3y over a small array and compares with the
// host, exactly: every value involved is representable.
func selfTestKernel(c *Ctx, m *Module) error {
	f, err := m.Function("axpby_f32")
	if err != nil {
		return err
	}
	const n = 1000
	x, y := make([]float32, n), make([]float32, n)
	for i := range x {
		x[i], y[i] = float32(i%17)-8.5, float32(i%5)+0.25
	}
	bufs, err := uploadAll(c, x, y)
	defer freeAll(c, bufs)
	if err != nil {
		return err
	}
	if err := c.Launch(f, Grid1D(n, 128), float32(2), bufs[0], float32(3), bufs[1], int64(n)); err != nil {
		return err
	}
	got := make([]float32, n)
	if err := Download(c, got, bufs[1].Ptr); err != nil {
		return err
	}
	for i := range got {
		if want := 2*x[i] + 3*y[i]; got[i] != want {
			return fmt.Errorf("element %d is %v, want %v", i, got[i], want)
		}
	}
	return nil
}

// selfTestGEMM multiplies row-major bf16 matrices of small integers and
// halves (exact in bfloat16 and in a float32 sum) into a float32 product.
func selfTestGEMM(c *Ctx, g GEMM) error {
	a, b := make([]uint16, g.M*g.K), make([]uint16, g.K*g.N)
	for i := range a {
		a[i] = half.BF16(float32(i%7) - 3)
	}
	for i := range b {
		b[i] = half.BF16(float32(i%5)*0.5 - 1)
	}
	bufs, err := uploadAll(c, a, b)
	defer freeAll(c, bufs)
	if err != nil {
		return err
	}
	got := make([]float32, g.M*g.N)
	out, err := c.Alloc(int64(len(got)) * 4)
	if err != nil {
		return err
	}
	defer c.Free(out)
	if err := c.Matmul(g, 1, bufs[0].Ptr, bufs[1].Ptr, 0, out.Ptr, nil); err != nil {
		return err
	}
	if err := Download(c, got, out.Ptr); err != nil {
		return err
	}
	for i := range g.M {
		for j := range g.N {
			var want float64
			for p := range g.K {
				want += float64(half.FromBF16(a[i*g.K+p])) * float64(half.FromBF16(b[p*g.N+j]))
			}
			if v := got[i*g.N+j]; math.Abs(float64(v)-want) > 1e-3 {
				return fmt.Errorf("element (%d,%d) is %v, want %v", i, j, v, want)
			}
		}
	}
	return nil
}

// uploadAll copies each host slice (all of one element type) into a device
// buffer of its own; on failure it returns the buffers made so far, which
// the caller frees as on success.
func uploadAll[T Elem](c *Ctx, host ...[]T) ([]Buffer, error) {
	var bufs []Buffer
	for _, h := range host {
		var zero T
		b, err := c.Alloc(int64(len(h)) * int64(unsafe.Sizeof(zero)))
		if err != nil {
			return bufs, err
		}
		bufs = append(bufs, b)
		if err := Upload(c, b.Ptr, h); err != nil {
			return bufs, err
		}
	}
	return bufs, nil
}

func freeAll(c *Ctx, bufs []Buffer) {
	for _, b := range bufs {
		c.Free(b)
	}
}
