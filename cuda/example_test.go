package cuda_test

import (
	"errors"
	"fmt"
	"log"

	"gemmaft/cuda"
	"gemmaft/internal/half"
)

// A typical use: open the GPU or fall back to the CPU, then do all device
// work inside Do, where the context is current on the device's own thread.
func ExampleDevice_Do() {
	dev, err := cuda.Open(0)
	if errors.Is(err, cuda.ErrUnavailable) {
		fmt.Println("using the CPU:", err)
		return
	}
	if err != nil {
		log.Fatal(err)
	}
	defer dev.Close()

	const m, n, k = 4, 3, 2
	a := half.BF16s([]float32{1, 2, 3, 4, 5, 6, 7, 8}) // 4×2
	b := half.BF16s([]float32{1, 0, 1, 0, 1, 1})       // 2×3
	out := make([]float32, m*n)
	err = dev.Do(func(c *cuda.Ctx) error {
		da, err := c.Alloc(int64(len(a)) * 2)
		if err != nil {
			return err
		}
		defer c.Free(da)
		db, err := c.Alloc(int64(len(b)) * 2)
		if err != nil {
			return err
		}
		defer c.Free(db)
		dc, err := c.Alloc(int64(len(out)) * 4)
		if err != nil {
			return err
		}
		defer c.Free(dc)
		if err := cuda.Upload(c, da.Ptr, a); err != nil {
			return err
		}
		if err := cuda.Upload(c, db.Ptr, b); err != nil {
			return err
		}
		g := cuda.GEMM{M: m, N: n, K: k, AType: cuda.BF16, BType: cuda.BF16, CType: cuda.F32}
		if err := c.Matmul(g, 1, da.Ptr, db.Ptr, 0, dc.Ptr, nil); err != nil {
			return err
		}

		// A kernel of the package's own, compiled once per machine.
		src, err := cuda.BuiltinSource("elementwise.cu")
		if err != nil {
			return err
		}
		mod, err := c.Compile(src)
		if err != nil {
			return err
		}
		axpby, err := mod.Function("axpby_f32")
		if err != nil {
			return err
		}
		// scaled = 2·product + 0·scaled.
		scaled, err := c.Alloc(int64(len(out)) * 4)
		if err != nil {
			return err
		}
		defer c.Free(scaled)
		if err := c.MemsetD32Async(scaled.Ptr, 0, int64(len(out)), nil); err != nil {
			return err
		}
		if err := c.Launch(axpby, cuda.Grid1D(len(out), 256), float32(2), dc, float32(0), scaled, int64(len(out))); err != nil {
			return err
		}
		return cuda.Download(c, out, scaled.Ptr)
	})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(out)
}
