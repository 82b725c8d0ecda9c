// Gemma's RMSNorm, y = x / sqrt(mean(x²) + eps) · (1 + w), and its
// backward pass for a frozen weight. One block per row; the block size is
// a multiple of 32. Reference: trainer.RMSNorm, trainer.RMSNormBackward.
#include "gemma.cuh"

// out = norm(x) or, with res, res + norm(x), rounded to an activation once.
// rstd receives each row's 1/sqrt(mean(x²) + eps).
extern "C" __global__ void rms_norm_fwd(const act_t* __restrict__ x, const float* __restrict__ w, const act_t* res,
                                        act_t* out, float* __restrict__ rstd, int rows, int cols, float eps) {
    __shared__ float scratch[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const long long base = (long long)r * cols;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
        const float v = to_f32(x[base + j]);
        ss += v * v;
    }
    ss = block_sum(ss, scratch);
    const float inv = 1.0f / sqrtf(ss / (float)cols + eps);
    if (threadIdx.x == 0) rstd[r] = inv;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
        float y = to_f32(x[base + j]) * inv * (1.0f + w[j]);
        if (res != nullptr) y += to_f32(res[base + j]);
        out[base + j] = to_act(y);
    }
}

// The gradient of norm(x) given dy, for row r:
//   g = dy·(1 + w),  dx = rstd·g − rstd³·mean(g·x)·x.
// grad_coef returns rstd³·mean(g·x) of the block's row.
__device__ __forceinline__ float grad_coef(const float* dy, const act_t* x, const float* w, float rs, long long base,
                                           int cols, float* scratch) {
    float gx = 0.0f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) gx += dy[base + j] * (1.0f + w[j]) * to_f32(x[base + j]);
    gx = block_sum(gx, scratch);
    return rs * rs * rs * gx / (float)cols;
}

// rms_norm_bwd_act writes dx as activations (it feeds a GEMM).
extern "C" __global__ void rms_norm_bwd_act(const float* __restrict__ dy, const act_t* __restrict__ x, const float* __restrict__ w,
                                            const float* __restrict__ rstd, act_t* __restrict__ dx, int rows, int cols) {
    __shared__ float scratch[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const long long base = (long long)r * cols;
    const float rs = rstd[r];
    const float c = grad_coef(dy, x, w, rs, base, cols, scratch);
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
        dx[base + j] = to_act(rs * dy[base + j] * (1.0f + w[j]) - c * to_f32(x[base + j]));
    }
}

// rms_norm_bwd_f32 writes dx = res + gradient in float32 (res may be null,
// and dx may be res itself: each element is read before it is written by
// the same thread).
extern "C" __global__ void rms_norm_bwd_f32(const float* dy, const act_t* __restrict__ x, const float* __restrict__ w,
                                            const float* __restrict__ rstd, const float* res, float* dx, int rows, int cols) {
    __shared__ float scratch[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const long long base = (long long)r * cols;
    const float rs = rstd[r];
    const float c = grad_coef(dy, x, w, rs, base, cols, scratch);
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
        float v = rs * dy[base + j] * (1.0f + w[j]) - c * to_f32(x[base + j]);
        if (res != nullptr) v += res[base + j];
        dx[base + j] = v;
    }
}
