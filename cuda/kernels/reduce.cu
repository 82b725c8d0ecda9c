// Row reductions: one block per row, the block's threads striding over the
// columns. Launch with a block size that is a multiple of 32.
#include "common.cuh"

// out[r] = sum of x[r, :]
extern "C" __global__ void row_sum_f32(const float* __restrict__ x, float* __restrict__ out, int rows, int cols) {
    __shared__ float scratch[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const float* row = x + (long long)r * cols;
    float s = 0.0f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) s += row[j];
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) out[r] = s;
}

// Gemma's RMSNorm in float32: y = x / sqrt(mean(x^2) + eps) * (1 + w).
extern "C" __global__ void rms_norm_f32(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y,
                                        int rows, int cols, float eps) {
    __shared__ float scratch[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const float* xr = x + (long long)r * cols;
    float* yr = y + (long long)r * cols;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) ss += xr[j] * xr[j];
    ss = block_sum(ss, scratch);
    const float inv = rsqrtf(ss / (float)cols + eps);
    for (int j = threadIdx.x; j < cols; j += blockDim.x) yr[j] = xr[j] * inv * (1.0f + w[j]);
}
