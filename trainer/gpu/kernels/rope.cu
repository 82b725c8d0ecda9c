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

// The same row for head_dim a multiple of 8 and at most 256, every
// pointer 16-byte aligned: each lane loads its four elements of each half
// once, in one load each (the loop above loads two bytes at a time and
// reads the row twice, which held it to a third of the memory bandwidth).
// The sum of squares adds in another order; the rest is the same.
struct __align__(4 * sizeof(act_t)) act4 {
    act_t v[4];
};
__device__ __forceinline__ void qk_norm_rope_row4(const act_t* __restrict__ x, const float* __restrict__ w,
                                                  const float* __restrict__ cosv, const float* __restrict__ sinv,
                                                  act_t* __restrict__ out, float* __restrict__ rstd, int r, int heads,
                                                  int dim, float eps, int lane) {
    const int half = dim / 2, i = 4 * lane;
    const bool mine = i < half;
    const long long base = (long long)r * dim;
    const long long tab = (long long)(r / heads) * half;
    act4 xa, xb;
    float ss = 0.0f;
    if (mine) {
        xa = *reinterpret_cast<const act4*>(x + base + i);
        xb = *reinterpret_cast<const act4*>(x + base + half + i);
        #pragma unroll
        for (int e = 0; e < 4; e++) ss += to_f32(xa.v[e]) * to_f32(xa.v[e]) + to_f32(xb.v[e]) * to_f32(xb.v[e]);
    }
    ss = warp_sum(ss);
    const float inv = 1.0f / sqrtf(ss / (float)dim + eps);
    if (lane == 0) rstd[r] = inv;
    if (!mine) return;
    const float4 wa = *reinterpret_cast<const float4*>(w + i), wb = *reinterpret_cast<const float4*>(w + half + i);
    const float4 c4 = *reinterpret_cast<const float4*>(cosv + tab + i), s4 = *reinterpret_cast<const float4*>(sinv + tab + i);
    const float was[4] = {wa.x, wa.y, wa.z, wa.w}, wbs[4] = {wb.x, wb.y, wb.z, wb.w};
    const float cs[4] = {c4.x, c4.y, c4.z, c4.w}, sn[4] = {s4.x, s4.y, s4.z, s4.w};
    act4 oa, ob;
    #pragma unroll
    for (int e = 0; e < 4; e++) {
        const float a = to_f32(xa.v[e]) * inv * (1.0f + was[e]);
        const float b = to_f32(xb.v[e]) * inv * (1.0f + wbs[e]);
        oa.v[e] = to_act(a * cs[e] - b * sn[e]);
        ob.v[e] = to_act(b * cs[e] + a * sn[e]);
    }
    *reinterpret_cast<act4*>(out + base + i) = oa;
    *reinterpret_cast<act4*>(out + base + half + i) = ob;
}

// The q side's qrows rows, then the k side's krows, in one launch.
template <bool vec>
__device__ void qk_norm_rope_fwd_body(const act_t* q, const float* qw, act_t* qout, float* qrstd, int qrows, int qheads,
                                      const act_t* k, const float* kw, act_t* kout, float* krstd, int krows, int kheads,
                                      const float* __restrict__ cosv, const float* __restrict__ sinv, int dim, float eps) {
    const int lane = threadIdx.x & 31;
    const int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const bool isq = r < qrows;
    if (r >= qrows + krows) return;
    const act_t* x = isq ? q : k;
    const float* w = isq ? qw : kw;
    act_t* out = isq ? qout : kout;
    float* rstd = isq ? qrstd : krstd;
    const int row = isq ? r : r - qrows, heads = isq ? qheads : kheads;
    if (vec) qk_norm_rope_row4(x, w, cosv, sinv, out, rstd, row, heads, dim, eps, lane);
    else qk_norm_rope_row(x, w, cosv, sinv, out, rstd, row, heads, dim, eps, lane);
}

#define QK_NORM_ROPE_ARGS const act_t* q, const float* qw, act_t* qout, float* qrstd, int qrows, int qheads, \
    const act_t* k, const float* kw, act_t* kout, float* krstd, int krows, int kheads, \
    const float* __restrict__ cosv, const float* __restrict__ sinv, int dim, float eps
extern "C" __global__ void qk_norm_rope_fwd(QK_NORM_ROPE_ARGS) {
    qk_norm_rope_fwd_body<false>(q, qw, qout, qrstd, qrows, qheads, k, kw, kout, krstd, krows, kheads, cosv, sinv, dim, eps);
}
extern "C" __global__ void qk_norm_rope_fwd_vec(QK_NORM_ROPE_ARGS) {
    qk_norm_rope_fwd_body<true>(q, qw, qout, qrstd, qrows, qheads, k, kw, kout, krstd, krows, kheads, cosv, sinv, dim, eps);
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
