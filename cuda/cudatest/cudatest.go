// Package cudatest is the harness for GPU kernel tests: it opens the GPU or
// skips the test, draws fresh random inputs for every check (never zeros),
// poisons outputs before each launch, and compares results with float64
// CPU references under per-dtype tolerances where NaN never passes.
package cudatest

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"
	"time"

	"gemmaft/cuda"
	"gemmaft/internal/half"
)

var (
	devOnce sync.Once
	dev     *cuda.Device
	devErr  error
)

// Device returns device 0, opened once per test binary, or skips t when the
// machine has no usable GPU. Any other failure to open fails the test.
func Device(t testing.TB) *cuda.Device {
	t.Helper()
	devOnce.Do(func() { dev, devErr = cuda.Open(0) })
	if errors.Is(devErr, cuda.ErrUnavailable) {
		t.Skipf("no GPU: %v", devErr)
	}
	if devErr != nil {
		t.Fatalf("opening the GPU: %v", devErr)
	}
	return dev
}

// Do runs f on the test device and fails t on error.
func Do(t testing.TB, f func(c *cuda.Ctx) error) {
	t.Helper()
	if err := Device(t).Do(f); err != nil {
		t.Fatal(err)
	}
}

// Rand returns a generator with a fresh seed, logged so that a failure can
// be replayed with RandSeeded.
func Rand(t testing.TB) *rand.Rand {
	t.Helper()
	seed := uint64(time.Now().UnixNano())
	t.Logf("random seed %d", seed)
	return RandSeeded(seed)
}

// RandSeeded returns a generator for a given seed.
func RandSeeded(seed uint64) *rand.Rand {
	return rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
}

// Uniform returns n values uniform in [-scale, scale], none of them zero.
func Uniform(rng *rand.Rand, n int, scale float64) []float32 {
	out := make([]float32, n)
	for i := range out {
		for out[i] == 0 {
			out[i] = float32((2*rng.Float64() - 1) * scale)
		}
	}
	return out
}

// UniformBF16 returns n bfloat16 values uniform in [-scale, scale], none of
// them zero after rounding.
func UniformBF16(rng *rand.Rand, n int, scale float64) []uint16 {
	out := make([]uint16, n)
	for i := range out {
		for out[i]&0x7fff == 0 {
			out[i] = half.BF16(float32((2*rng.Float64() - 1) * scale))
		}
	}
	return out
}

// Poison fills b with 0xFF bytes: NaN as float32 and as bfloat16, so any
// element a kernel fails to write makes the comparison fail.
func Poison(c *cuda.Ctx, b cuda.Buffer) error {
	if err := c.MemsetD8Async(b.Ptr, 0xff, b.Size, nil); err != nil {
		return err
	}
	return c.Stream().Synchronize()
}

// Tolerance bounds the relative error ‖got − want‖₂ / ‖want‖₂.
type Tolerance struct {
	Name string
	Rel  float64
}

// Tolerances by the precision of the result.
var (
	F32  = Tolerance{"float32", 1e-6}
	BF16 = Tolerance{"bfloat16", 1e-2}
)

// F32Sum is the float32 tolerance for results that each sum n rounded
// terms (a dot product of length n, a row reduction over n columns): the
// rounding error of a float32 sum grows about as the square root of n.
func F32Sum(n int) Tolerance {
	return Tolerance{fmt.Sprintf("float32 sum of %d terms", n), F32.Rel * max(1, math.Sqrt(float64(n)/16))}
}

// Result is a comparison's outcome.
type Result struct {
	RelErr   float64 // ‖got − want‖₂ / ‖want‖₂
	MaxAbs   float64 // largest |got − want|
	MaxIndex int
}

// Compare checks got against the float64 reference want. Any NaN or
// infinity in got (or want) fails, whatever the tolerance.
func Compare(got, want []float64, tol Tolerance) (Result, error) {
	var r Result
	if len(got) != len(want) {
		return r, fmt.Errorf("length %d, want %d", len(got), len(want))
	}
	var diff2, ref2 float64
	for i := range got {
		g, w := got[i], want[i]
		if math.IsNaN(g) || math.IsInf(g, 0) {
			return r, fmt.Errorf("element %d is %v (want %v): unwritten or overflowed", i, g, w)
		}
		if math.IsNaN(w) || math.IsInf(w, 0) {
			return r, fmt.Errorf("reference element %d is %v", i, w)
		}
		d := g - w
		diff2 += d * d
		ref2 += w * w
		if math.Abs(d) > r.MaxAbs || i == 0 {
			r.MaxAbs, r.MaxIndex = math.Abs(d), i
		}
	}
	if len(got) == 0 {
		return r, nil
	}
	if ref2 == 0 {
		r.RelErr = math.Sqrt(diff2)
	} else {
		r.RelErr = math.Sqrt(diff2 / ref2)
	}
	if !(r.RelErr <= tol.Rel) {
		return r, fmt.Errorf("relative error %.3g over the %s tolerance %.0g (largest |diff| %.3g at %d: got %v, want %v)",
			r.RelErr, tol.Name, tol.Rel, r.MaxAbs, r.MaxIndex, got[r.MaxIndex], want[r.MaxIndex])
	}
	return r, nil
}

// F64 widens float32 values.
func F64(xs []float32) []float64 {
	out := make([]float64, len(xs))
	for i, x := range xs {
		out[i] = float64(x)
	}
	return out
}

// F64FromBF16 widens bfloat16 values.
func F64FromBF16(xs []uint16) []float64 {
	out := make([]float64, len(xs))
	for i, x := range xs {
		out[i] = float64(half.FromBF16(x))
	}
	return out
}

// MedianMs runs op warmup times, then times each of iters runs of it with
// events on c's working stream, and returns the median in milliseconds:
// device time, for benchmarks.
func MedianMs(c *cuda.Ctx, warmup, iters int, op func() error) (float64, error) {
	for range warmup {
		if err := op(); err != nil {
			return 0, err
		}
	}
	evs := make([]*cuda.Event, iters+1)
	for i := range evs {
		e, err := c.NewEvent()
		if err != nil {
			return 0, err
		}
		defer e.Destroy()
		evs[i] = e
	}
	if err := evs[0].Record(nil); err != nil {
		return 0, err
	}
	for i := 1; i <= iters; i++ {
		if err := op(); err != nil {
			return 0, err
		}
		if err := evs[i].Record(nil); err != nil {
			return 0, err
		}
	}
	if err := evs[iters].Synchronize(); err != nil {
		return 0, err
	}
	ms := make([]float64, iters)
	for i := 1; i <= iters; i++ {
		d, err := evs[i].Elapsed(evs[i-1])
		if err != nil {
			return 0, err
		}
		ms[i-1] = float64(d)
	}
	slices.Sort(ms)
	return ms[iters/2], nil
}
