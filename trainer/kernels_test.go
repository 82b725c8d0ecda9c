package trainer

import (
	"math"
	"math/rand/v2"
	"os"
	"testing"
)

// TestLMHeadKernels compares the lm_head products (AVX2 kernels where the
// CPU has them) with plain float64 sums, over sizes with ragged edges.
func TestLMHeadKernels(t *testing.T) {
	if hasFMA {
		t.Run("portable", func(t *testing.T) {
			hasFMA = false
			defer func() { hasFMA = true }()
			checkLMHeadKernels(t)
		})
	}
	checkLMHeadKernels(t)
}

func checkLMHeadKernels(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	randn := func(n int) []float32 {
		v := make([]float32, n)
		for i := range v {
			v[i] = float32(rng.NormFloat64())
		}
		return v
	}
	for _, sz := range []struct{ n, V, D int }{{5, 1030, 64}, {4, 513, 128}, {1, 7, 64}, {3, 600, 72}, {2, 64, 20}} {
		h, E, g := randn(sz.n*sz.D), randn(sz.V*sz.D), randn(sz.n*sz.V)
		logits := make([]float32, sz.n*sz.V)
		lmHeadLogits(logits, h, E, sz.n, sz.V, sz.D)
		for r := 0; r < sz.n; r++ {
			for v := 0; v < sz.V; v++ {
				var want float64
				for k := 0; k < sz.D; k++ {
					want += float64(h[r*sz.D+k]) * float64(E[v*sz.D+k])
				}
				if math.Abs(float64(logits[r*sz.V+v])-want) > 1e-4*math.Sqrt(float64(sz.D)) {
					t.Fatalf("%+v: logit[%d][%d] = %v, want %v", sz, r, v, logits[r*sz.V+v], want)
				}
			}
		}
		dh := randn(sz.n * sz.D)
		base := append([]float32(nil), dh...)
		lmHeadBackward(dh, g, E, sz.n, sz.V, sz.D)
		for r := 0; r < sz.n; r++ {
			for k := 0; k < sz.D; k++ {
				want := float64(base[r*sz.D+k])
				for v := 0; v < sz.V; v++ {
					want += float64(g[r*sz.V+v]) * float64(E[v*sz.D+k])
				}
				if math.Abs(float64(dh[r*sz.D+k])-want) > 1e-5*math.Sqrt(float64(sz.V))*10 {
					t.Fatalf("%+v: dh[%d][%d] = %v, want %v", sz, r, k, dh[r*sz.D+k], want)
				}
			}
		}
	}
}

func TestExpBlock(t *testing.T) {
	if !hasFMA {
		t.Skip("no AVX2+FMA")
	}
	const n = 4096
	x := make([]float32, n)
	for i := range x {
		x[i] = -90 + 95*float32(i)/n // spans the clamp, shift 5 makes the top 0
	}
	orig := append([]float32(nil), x...)
	sum := expBlock(&x[0], n, 5)
	var want float64
	worst := 0.0
	for i, v := range orig {
		e := math.Exp(float64(v) - 5)
		want += e
		if float64(v)-5 < -80 {
			continue
		}
		rel := math.Abs(float64(x[i])-e) / e
		worst = max(worst, rel)
	}
	if worst > 3e-7 {
		t.Errorf("worst relative error %.3g", worst)
	}
	if math.Abs(float64(sum)-want)/want > 1e-5 {
		t.Errorf("sum %v, want %v", sum, want)
	}
}

// TestMatmulAccumulate checks Matmul's accumulate mode on both paths.
func TestMatmulAccumulate(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	T, N, K := 7, 1030, 24
	x, w, out := make([]float32, T*K), make([]float32, N*K), make([]float32, T*N)
	for _, v := range [][]float32{x, w, out} {
		for i := range v {
			v[i] = float32(rng.NormFloat64())
		}
	}
	for _, fma := range []bool{hasFMA, false} {
		saved := hasFMA
		hasFMA = fma
		got := append([]float32(nil), out...)
		Matmul(got, x, w, T, N, K, true)
		hasFMA = saved
		for r := 0; r < T; r++ {
			for n := 0; n < N; n++ {
				want := float64(out[r*N+n])
				for k := 0; k < K; k++ {
					want += float64(x[r*K+k]) * float64(w[n*K+k])
				}
				if math.Abs(float64(got[r*N+n])-want) > 1e-4 {
					t.Fatalf("fma=%v: out[%d][%d] = %v, want %v", fma, r, n, got[r*N+n], want)
				}
			}
		}
	}
}

// TestMain lets GEMMAFT_PORTABLE=1 run every test on the portable code
// that machines without AVX2 and FMA use.
func TestMain(m *testing.M) {
	if os.Getenv("GEMMAFT_PORTABLE") == "1" {
		hasFMA = false
	}
	os.Exit(m.Run())
}
