// Elementwise kernels. Each thread walks the array with a grid stride, so
// any grid size covers any length.
#include "common.cuh"

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
