// Gemma 3's q_norm / k_norm (RMSNorm over each head) followed by rotary
// position embedding, fused, and the backward pass. One warp per (token,
// head) row of head_dim values; rows = tokens × heads. cos and sin are
// [tokens × head_dim/2] tables of the layer type's angles, computed on the
// host exactly as the CPU reference computes them (trainer.RopeTables).
// Element i pairs with i + head_dim/2 (transformers' rotate_half layout).
// Reference: trainer.RMSNorm then trainer.ApplyRope.
#include "gemma.cuh"

// Row r of one side (q or k): heads rows a token, one warp a row.
__device__ __forceinline__ void qk_norm_rope_row(const act_t* __restrict__ x, const float* __restrict__ w,
                                                 const float* __restrict__ cosv, const float* __restrict__ sinv,
                                                 act_t* __restrict__ out, float* __restrict__ rstd, int r, int heads,
                                                 int dim, float eps, int lane) {
    const int half = dim / 2;
    const long long base = (long long)r * dim;
    const long long tab = (long long)(r / heads) * half;
    float ss = 0.0f;
    for (int i = lane; i < dim; i += 32) {
        const float v = to_f32(x[base + i]);
        ss += v * v;
    }
    ss = warp_sum(ss);
    const float inv = 1.0f / sqrtf(ss / (float)dim + eps);
    if (lane == 0) rstd[r] = inv;
    for (int i = lane; i < half; i += 32) {
        const float a = to_f32(x[base + i]) * inv * (1.0f + w[i]);
        const float b = to_f32(x[base + i + half]) * inv * (1.0f + w[i + half]);
        const float c = cosv[tab + i], s = sinv[tab + i];
        out[base + i] = to_act(a * c - b * s);
        out[base + i + half] = to_act(b * c + a * s);
    }
}

// The q side's qrows rows, then the k side's krows, in one launch.
extern "C" __global__ void qk_norm_rope_fwd(const act_t* q, const float* qw, act_t* qout, float* qrstd, int qrows, int qheads,
                                            const act_t* k, const float* kw, act_t* kout, float* krstd, int krows, int kheads,
                                            const float* __restrict__ cosv, const float* __restrict__ sinv, int dim, float eps) {
    const int lane = threadIdx.x & 31;
    const int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r < qrows) qk_norm_rope_row(q, qw, cosv, sinv, qout, qrstd, r, qheads, dim, eps, lane);
    else if (r < qrows + krows) qk_norm_rope_row(k, kw, cosv, sinv, kout, krstd, r - qrows, kheads, dim, eps, lane);
}

// dy is the gradient of the rotated output; dx receives the gradient of the
// norm's input x (pre-norm), as activations for the projection's GEMM.
extern "C" __global__ void qk_norm_rope_bwd(const float* __restrict__ dy, const act_t* __restrict__ x, const float* __restrict__ w,
                                            const float* __restrict__ rstd, const float* __restrict__ cosv,
                                            const float* __restrict__ sinv, act_t* __restrict__ dx,
                                            int rows, int heads, int dim) {
    const int lane = threadIdx.x & 31;
    const int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= rows) return;
    const int half = dim / 2;
    const long long base = (long long)r * dim;
    const long long tab = (long long)(r / heads) * half;
    // The inverse rotation of dy gives the gradient of the normed values.
    float gx = 0.0f;
    for (int i = lane; i < half; i += 32) {
        const float c = cosv[tab + i], s = sinv[tab + i];
        const float da = dy[base + i], db = dy[base + i + half];
        const float ga = (da * c + db * s) * (1.0f + w[i]);
        const float gb = (db * c - da * s) * (1.0f + w[i + half]);
        gx += ga * to_f32(x[base + i]) + gb * to_f32(x[base + i + half]);
    }
    gx = warp_sum(gx);
    const float rs = rstd[r];
    const float k = rs * rs * rs * gx / (float)dim;
    for (int i = lane; i < half; i += 32) {
        const float c = cosv[tab + i], s = sinv[tab + i];
        const float da = dy[base + i], db = dy[base + i + half];
        const float ga = (da * c + db * s) * (1.0f + w[i]);
        const float gb = (db * c - da * s) * (1.0f + w[i + half]);
        dx[base + i] = to_act(rs * ga - k * to_f32(x[base + i]));
        dx[base + i + half] = to_act(rs * gb - k * to_f32(x[base + i + half]));
    }
}
