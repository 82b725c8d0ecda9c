package cuda_test

// Benchmarks for scripts/bench-gpu.py, which runs PyTorch's equivalents on
// the same GPU. Device work is timed with events around each iteration
// after a warm-up (cudatest.MedianMs), and the median is reported as a
// custom metric.

import (
	"sync"
	"testing"
	"time"

	"gemmaft/cuda"
	"gemmaft/cuda/cudatest"
)

var (
	gemmOnce sync.Once
	gemmA    []uint16
	gemmB    []uint16
)

const gemmSize = 8192

func BenchmarkMatmulBF16_8192(b *testing.B) {
	cudatest.Device(b)
	gemmOnce.Do(func() {
		rng := cudatest.RandSeeded(uint64(time.Now().UnixNano()))
		gemmA = cudatest.UniformBF16(rng, gemmSize*gemmSize, 1)
		gemmB = cudatest.UniformBF16(rng, gemmSize*gemmSize, 1)
	})
	g := cuda.GEMM{M: gemmSize, N: gemmSize, K: gemmSize, AType: cuda.BF16, BType: cuda.BF16, CType: cuda.BF16}
	cudatest.Do(b, func(c *cuda.Ctx) error {
		bytes := int64(gemmSize * gemmSize * 2)
		var bufs [3]cuda.Buffer
		for i := range bufs {
			var err error
			if bufs[i], err = c.Alloc(bytes); err != nil {
				return err
			}
			defer c.Free(bufs[i])
		}
		if err := cuda.Upload(c, bufs[0].Ptr, gemmA); err != nil {
			return err
		}
		if err := cuda.Upload(c, bufs[1].Ptr, gemmB); err != nil {
			return err
		}
		b.ResetTimer()
		ms, err := cudatest.MedianMs(c, 5, max(b.N, 1), func() error {
			return c.Matmul(g, 1, bufs[0].Ptr, bufs[1].Ptr, 0, bufs[2].Ptr, nil)
		})
		if err != nil {
			return err
		}
		b.ReportMetric(2*float64(gemmSize*gemmSize)*gemmSize/(ms*1e-3)/1e12, "TFLOP/s")
		b.ReportMetric(ms, "ms/gemm")
		return nil
	})
}

const copyBytes = 1 << 30

func BenchmarkCopyDtoD_1GiB(b *testing.B) {
	cudatest.Do(b, func(c *cuda.Ctx) error {
		src, err := c.Alloc(copyBytes)
		if err != nil {
			return err
		}
		defer c.Free(src)
		dst, err := c.Alloc(copyBytes)
		if err != nil {
			return err
		}
		defer c.Free(dst)
		if err := c.MemsetD32Async(src.Ptr, 0x3f8a5a5a, copyBytes/4, nil); err != nil {
			return err
		}
		b.ResetTimer()
		ms, err := cudatest.MedianMs(c, 3, max(b.N, 1), func() error {
			return c.CopyDtoDAsync(dst.Ptr, src.Ptr, copyBytes, nil)
		})
		if err != nil {
			return err
		}
		b.ReportMetric(2*copyBytes/(ms*1e-3)/1e9, "GB/s") // bytes read plus bytes written
		return nil
	})
}

const noopSource = `extern "C" __global__ void noop(float* p, int n) { if (n < 0) p[0] = 0.0f; }`

const launchesPerRep = 1000

// BenchmarkLaunch measures one kernel launch from Go: the host's cost per
// cuLaunchKernel call through purego, and the device's time per kernel
// when launches come back to back from the host.
func BenchmarkLaunch(b *testing.B) {
	cudatest.Do(b, func(c *cuda.Ctx) error {
		m, err := c.Compile(cuda.Source{Name: "noop.cu", Code: noopSource})
		if err != nil {
			return err
		}
		f, err := m.Function("noop")
		if err != nil {
			return err
		}
		cfg := cuda.LaunchConfig{Grid: cuda.Dim3{X: 1}, Block: cuda.Dim3{X: 32}}
		var host time.Duration
		b.ResetTimer()
		ms, err := cudatest.MedianMs(c, 2, max(b.N, 1), func() error {
			start := time.Now()
			for range launchesPerRep {
				if err := c.Launch(f, cfg, cuda.DevicePtr(0), int32(1)); err != nil {
					return err
				}
			}
			host += time.Since(start)
			return nil
		})
		if err != nil {
			return err
		}
		b.ReportMetric(float64(host.Nanoseconds())/float64((max(b.N, 1)+2)*launchesPerRep), "host-ns/launch")
		b.ReportMetric(ms*1e3/launchesPerRep, "device-us/kernel")
		return c.Synchronize()
	})
}

// BenchmarkLaunchGraph replays the same 1000 launches as one CUDA graph.
func BenchmarkLaunchGraph(b *testing.B) {
	cudatest.Do(b, func(c *cuda.Ctx) error {
		m, err := c.Compile(cuda.Source{Name: "noop.cu", Code: noopSource})
		if err != nil {
			return err
		}
		f, err := m.Function("noop")
		if err != nil {
			return err
		}
		s, err := c.NewStream()
		if err != nil {
			return err
		}
		defer s.Destroy()
		cfg := cuda.LaunchConfig{Grid: cuda.Dim3{X: 1}, Block: cuda.Dim3{X: 32}, Stream: s}
		g, err := c.Capture(s, func() error {
			for range launchesPerRep {
				if err := c.Launch(f, cfg, cuda.DevicePtr(0), int32(1)); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			return err
		}
		defer g.Destroy()
		b.ResetTimer()
		ms, err := cudatest.MedianMs(c, 2, max(b.N, 1), func() error { return g.Launch(nil) })
		if err != nil {
			return err
		}
		b.ReportMetric(ms*1e3/launchesPerRep, "device-us/kernel")
		return c.Synchronize()
	})
}

// BenchmarkDo measures the hand-off of an empty function to the device's
// locked thread and back: the fixed cost of one Device.Do.
func BenchmarkDo(b *testing.B) {
	dev := cudatest.Device(b)
	const calls = 1000
	b.ResetTimer()
	start := time.Now()
	for range b.N {
		for range calls {
			if err := dev.Do(func(*cuda.Ctx) error { return nil }); err != nil {
				b.Fatal(err)
			}
		}
	}
	b.ReportMetric(float64(time.Since(start).Nanoseconds())/float64(b.N*calls), "ns/Do")
}
