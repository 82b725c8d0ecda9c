package cuda

import (
	"errors"
	"fmt"
	"strings"
	"testing"
)

func isUnavailable(err error) bool { return errors.Is(err, ErrUnavailable) }

func TestErrorNames(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want string
	}{
		{&DriverError{Call: "cuMemAlloc_v2", Result: 2}, "cuMemAlloc_v2: CUDA_ERROR_OUT_OF_MEMORY"},
		{&DriverError{Call: "cuCtxSetCurrent", Result: 201}, "CUDA_ERROR_INVALID_CONTEXT"},
		{&DriverError{Call: "cuInit", Result: 12345}, "CUresult(12345)"},
		{&NVRTCError{Call: "nvrtcCompileProgram", Result: 6, Source: "k.cu", Log: "k.cu(3): error: x"}, "nvrtcCompileProgram k.cu: NVRTC_ERROR_COMPILATION\nk.cu(3): error: x"},
		{&NVRTCError{Call: "nvrtcVersion", Result: 99}, "nvrtcResult(99)"},
		{&BLASError{Call: "cublasLtMatmul", Status: 15, Detail: "7x5x3"}, "cublasLtMatmul: CUBLAS_STATUS_NOT_SUPPORTED [7x5x3]"},
		{&BLASError{Call: "cublasLtCreate", Status: 42}, "cublasStatus(42)"},
	} {
		if got := tc.err.Error(); !strings.Contains(got, tc.want) {
			t.Errorf("%#v: %q does not contain %q", tc.err, got, tc.want)
		}
	}
}

func TestUnavailableResults(t *testing.T) {
	noDevice := fmt.Errorf("opening: %w", &DriverError{Call: "cuInit", Result: 100})
	if !errors.Is(noDevice, ErrUnavailable) {
		t.Error("CUDA_ERROR_NO_DEVICE should mean unavailable")
	}
	if errors.Is(&DriverError{Call: "cuMemAlloc_v2", Result: 2}, ErrUnavailable) {
		t.Error("out of memory is a real error, not a missing GPU")
	}
}
