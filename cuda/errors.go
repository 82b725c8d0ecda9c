package cuda

import (
	"errors"
	"fmt"
)

// ErrUnavailable is wrapped by every error that means "no usable GPU here":
// a library is missing, no device is present, or the driver refuses to
// start. Callers fall back to the CPU when errors.Is(err, ErrUnavailable).
var ErrUnavailable = errors.New("CUDA unavailable")

// ErrOutsideDo is returned by Ctx methods called after their Device.Do
// callback returned, from a goroutine that does not own the context.
var ErrOutsideDo = errors.New("cuda: Ctx used outside Device.Do")

// ErrClosed is returned by Device methods after Close.
var ErrClosed = errors.New("cuda: device is closed")

// Result is a CUresult, the status code of every driver API call.
type Result int32

// Driver results this package names itself. The driver's own
// cuGetErrorName is used when available; this table covers errors raised
// before the driver is loaded and keeps messages stable in tests.
var resultNames = map[Result]string{
	0:   "CUDA_SUCCESS",
	1:   "CUDA_ERROR_INVALID_VALUE",
	2:   "CUDA_ERROR_OUT_OF_MEMORY",
	3:   "CUDA_ERROR_NOT_INITIALIZED",
	4:   "CUDA_ERROR_DEINITIALIZED",
	34:  "CUDA_ERROR_STUB_LIBRARY",
	46:  "CUDA_ERROR_DEVICE_UNAVAILABLE",
	100: "CUDA_ERROR_NO_DEVICE",
	101: "CUDA_ERROR_INVALID_DEVICE",
	200: "CUDA_ERROR_INVALID_IMAGE",
	201: "CUDA_ERROR_INVALID_CONTEXT",
	209: "CUDA_ERROR_NO_BINARY_FOR_GPU",
	218: "CUDA_ERROR_INVALID_PTX",
	222: "CUDA_ERROR_UNSUPPORTED_PTX_VERSION",
	300: "CUDA_ERROR_INVALID_SOURCE",
	301: "CUDA_ERROR_FILE_NOT_FOUND",
	400: "CUDA_ERROR_INVALID_HANDLE",
	500: "CUDA_ERROR_NOT_FOUND",
	600: "CUDA_ERROR_NOT_READY",
	700: "CUDA_ERROR_ILLEGAL_ADDRESS",
	701: "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES",
	702: "CUDA_ERROR_LAUNCH_TIMEOUT",
	709: "CUDA_ERROR_CONTEXT_IS_DESTROYED",
	710: "CUDA_ERROR_ASSERT",
	715: "CUDA_ERROR_ILLEGAL_INSTRUCTION",
	716: "CUDA_ERROR_MISALIGNED_ADDRESS",
	719: "CUDA_ERROR_LAUNCH_FAILED",
	800: "CUDA_ERROR_NOT_PERMITTED",
	801: "CUDA_ERROR_NOT_SUPPORTED",
	802: "CUDA_ERROR_SYSTEM_NOT_READY",
	803: "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH",
	804: "CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE",
	900: "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED",
	901: "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED",
	905: "CUDA_ERROR_STREAM_CAPTURE_UNMATCHED",
	906: "CUDA_ERROR_STREAM_CAPTURE_UNJOINED",
	999: "CUDA_ERROR_UNKNOWN",
}

// Name returns the CUresult's symbolic name, as cuda.h spells it.
func (r Result) Name() string {
	if n := driverErrorName(r); n != "" {
		return n
	}
	if n, ok := resultNames[r]; ok {
		return n
	}
	return fmt.Sprintf("CUresult(%d)", int32(r))
}

// DriverError is a failed driver API call.
type DriverError struct {
	Call   string // the driver function, e.g. "cuMemAlloc_v2"
	Result Result
}

func (e *DriverError) Error() string {
	msg := fmt.Sprintf("cuda: %s: %s", e.Call, e.Result.Name())
	if s := driverErrorString(e.Result); s != "" {
		msg += " (" + s + ")"
	}
	return msg
}

// Is makes errors.Is(err, ErrUnavailable) true for the results that mean
// the machine has no usable GPU, so callers fall back instead of failing.
func (e *DriverError) Is(target error) bool {
	if target != ErrUnavailable {
		return false
	}
	switch e.Result {
	case 34, 46, 100, 101, 803, 804, 999:
		return true
	}
	return false
}

// NVRTCResult is an nvrtcResult status code.
type NVRTCResult int32

var nvrtcNames = [...]string{
	"NVRTC_SUCCESS",
	"NVRTC_ERROR_OUT_OF_MEMORY",
	"NVRTC_ERROR_PROGRAM_CREATION_FAILURE",
	"NVRTC_ERROR_INVALID_INPUT",
	"NVRTC_ERROR_INVALID_PROGRAM",
	"NVRTC_ERROR_INVALID_OPTION",
	"NVRTC_ERROR_COMPILATION",
	"NVRTC_ERROR_BUILTIN_OPERATION_FAILURE",
	"NVRTC_ERROR_NO_NAME_EXPRESSIONS_AFTER_COMPILATION",
	"NVRTC_ERROR_NO_LOWERED_NAMES_BEFORE_COMPILATION",
	"NVRTC_ERROR_NAME_EXPRESSION_NOT_VALID",
	"NVRTC_ERROR_INTERNAL_ERROR",
	"NVRTC_ERROR_TIME_FILE_WRITE_FAILED",
}

// Name returns the nvrtcResult's symbolic name.
func (r NVRTCResult) Name() string {
	if r >= 0 && int(r) < len(nvrtcNames) {
		return nvrtcNames[r]
	}
	return fmt.Sprintf("nvrtcResult(%d)", int32(r))
}

// NVRTCError is a failed NVRTC call. For a compilation error, Log holds the
// compiler's diagnostics with file names and line numbers.
type NVRTCError struct {
	Call   string
	Result NVRTCResult
	Source string // the program's name
	Log    string
}

func (e *NVRTCError) Error() string {
	msg := fmt.Sprintf("nvrtc: %s", e.Call)
	if e.Source != "" {
		msg += " " + e.Source
	}
	msg += ": " + e.Result.Name()
	if e.Log != "" {
		msg += "\n" + e.Log
	}
	return msg
}

// BLASStatus is a cublasStatus_t.
type BLASStatus int32

var blasNames = map[BLASStatus]string{
	0:  "CUBLAS_STATUS_SUCCESS",
	1:  "CUBLAS_STATUS_NOT_INITIALIZED",
	3:  "CUBLAS_STATUS_ALLOC_FAILED",
	7:  "CUBLAS_STATUS_INVALID_VALUE",
	8:  "CUBLAS_STATUS_ARCH_MISMATCH",
	11: "CUBLAS_STATUS_MAPPING_ERROR",
	13: "CUBLAS_STATUS_EXECUTION_FAILED",
	14: "CUBLAS_STATUS_INTERNAL_ERROR",
	15: "CUBLAS_STATUS_NOT_SUPPORTED",
	16: "CUBLAS_STATUS_LICENSE_ERROR",
}

// Name returns the cublasStatus_t's symbolic name.
func (s BLASStatus) Name() string {
	if n, ok := blasNames[s]; ok {
		return n
	}
	return fmt.Sprintf("cublasStatus(%d)", int32(s))
}

// BLASError is a failed cuBLASLt call.
type BLASError struct {
	Call   string
	Status BLASStatus
	Detail string // the operation, e.g. the GEMM's shape
}

func (e *BLASError) Error() string {
	msg := fmt.Sprintf("cublasLt: %s: %s", e.Call, e.Status.Name())
	if e.Detail != "" {
		msg += " [" + e.Detail + "]"
	}
	return msg
}
