// Elementwise kernels. Each thread walks the array with a grid stride, so
// any grid size covers any length.
#include "common.cuh"

// tanh-approximate GELU, as Gemma's MLP uses it:
// 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
// Computed as x / (1 + exp(-2z)), the same function: for negative x the
// textbook form subtracts nearly equal numbers in 1 + tanh(z) and loses up
// to 1e-3 relative accuracy in float32 (at x = -4), this form stays within a
// few units in the last place of the float64 value.
__device__ __forceinline__ float gelu_tanh(float x) {
    const float k = 0.7978845608028654f;             // sqrt(2/pi)
    const float kc = 0.7978845608028654f * 0.044715f; // sqrt(2/pi) * 0.044715
    const float z = x * fmaf(kc * x, x, k);
    return x / (1.0f + expf(-2.0f * z));
}

// x and y may be the same array (in place).
extern "C" __global__ void gelu_tanh_f32(const float* x, float* y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        y[i] = gelu_tanh(x[i]);
    }
}

extern "C" __global__ void gelu_tanh_bf16(const bf16_t* x, bf16_t* y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        y[i] = f32_to_bf16(gelu_tanh(bf16_to_f32(x[i])));
    }
}

// y = a x + b y
extern "C" __global__ void axpby_f32(float a, const float* __restrict__ x, float b, float* __restrict__ y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        y[i] = a * x[i] + b * y[i];
    }
}

extern "C" __global__ void convert_f32_bf16(const float* __restrict__ x, bf16_t* __restrict__ y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        y[i] = f32_to_bf16(x[i]);
    }
}

extern "C" __global__ void convert_bf16_f32(const bf16_t* __restrict__ x, float* __restrict__ y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        y[i] = bf16_to_f32(x[i]);
    }
}
