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
