package cuda

import "testing"

func TestRoundSize(t *testing.T) {
	for _, tc := range []struct{ n, want int64 }{
		{1, 512}, {512, 512}, {513, 1024}, {1 << 20, 1 << 20},
		{1<<20 + 1, 1<<20 + 1<<17}, {3 << 20, 3 << 20}, {(3 << 20) + 1, 3<<20 + 1<<18},
	} {
		if got := roundSize(tc.n); got != tc.want {
			t.Errorf("roundSize(%d) = %d, want %d", tc.n, got, tc.want)
		}
	}
	for n := int64(1); n < 1<<34; n = n*3 + 7 {
		r := roundSize(n)
		if r < n || float64(r-n) > 0.125*float64(n)+512 {
			t.Errorf("roundSize(%d) = %d wastes too much", n, r)
		}
	}
}

// TestDeviceBytes: blocks under 2 MiB hold their rounded size; larger
// ones whole 2 MiB pages.
func TestDeviceBytes(t *testing.T) {
	for _, tc := range []struct{ n, want int64 }{
		{1, 512}, {1 << 20, 1 << 20}, {1<<20 + 1, 1<<20 + 1<<17}, {2 << 20, 2 << 20},
		{2<<20 + 1, 4 << 20}, {3 << 20, 4 << 20}, {11 << 20, 12 << 20}, {1 << 30, 1 << 30},
	} {
		if got := DeviceBytes(tc.n); got != tc.want {
			t.Errorf("DeviceBytes(%d) = %d, want %d", tc.n, got, tc.want)
		}
	}
}

// TestWholeBytes: AllocWhole's blocks take whole 2 MiB pages from 2 MiB
// up, Alloc's sizes below.
func TestWholeBytes(t *testing.T) {
	for _, tc := range []struct{ n, want int64 }{
		{1, 512}, {1<<20 + 1, 1<<20 + 1<<17}, {2 << 20, 2 << 20}, {2<<20 + 1, 4 << 20},
		{2013757440, 2015363072}, // a Gemma 3 embedding (262,208 × 3,840 bf16): DeviceBytes 2 GiB
	} {
		if got := WholeBytes(tc.n); got != tc.want {
			t.Errorf("WholeBytes(%d) = %d, want %d", tc.n, got, tc.want)
		}
	}
}

func TestGEMMNormalized(t *testing.T) {
	g, err := GEMM{M: 7, N: 5, K: 3, TransA: true, AType: BF16, BType: BF16, CType: F32, Batch: 4}.Normalized()
	if err != nil {
		t.Fatal(err)
	}
	if g.LDA != 7 || g.LDB != 5 || g.LDC != 5 || g.StrideA != 21 || g.StrideB != 15 || g.StrideC != 35 {
		t.Errorf("normalized: %+v", g)
	}
	for _, bad := range []GEMM{
		{M: 0, N: 1, K: 1},
		{M: 2, N: 2, K: 2, AType: F32, BType: BF16},
		{M: 2, N: 2, K: 2, AType: F32, BType: F32, CType: BF16},
		{M: 2, N: 4, K: 3, LDB: 3},
	} {
		if _, err := bad.Normalized(); err == nil {
			t.Errorf("%+v accepted", bad)
		}
	}
}
