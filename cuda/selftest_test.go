package cuda_test

import (
	"strings"
	"testing"

	"gemmaft/cuda"
	"gemmaft/cuda/cudatest"
)

// TestSelfTest runs the check doctor runs: it passes on a working GPU and
// says what it checked.
func TestSelfTest(t *testing.T) {
	cudatest.Do(t, func(c *cuda.Ctx) error {
		passed, err := cuda.SelfTest(c)
		if err != nil {
			return err
		}
		got := strings.Join(passed, "\n")
		for _, want := range []string{"NVRTC kernel for ", "kernel launch: ok", "cuBLASLt bf16 GEMM 67x45x32: ok"} {
			if !strings.Contains(got, want) {
				t.Errorf("self-test lines lack %q:\n%s", want, got)
			}
		}
		return nil
	})
}
