package trainer_test

import (
	"context"
	"testing"

	"gemmaft/trainer"
	"gemmaft/trainer/backendtest"
)

// TestCPUBackendConformance runs the backend conformance suite on the CPU
// reference itself: against the float64 goldens within float32 rounding,
// and bit for bit against itself.
func TestCPUBackendConformance(t *testing.T) {
	backendtest.Run(t, "testdata/reference", func(t *testing.T, cfg trainer.SessionConfig) trainer.Session {
		s, err := trainer.OpenSession(context.Background(), "cpu", cfg)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}, backendtest.Tolerance{Loss: 1e-5, Grad: 1e-4})
}
