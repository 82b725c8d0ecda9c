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
__device__ __forceinline__ void qk_norm_rope_row4(const act_t* __restrict__ x, const float* __restrict__ w,
                                                  const float* __restrict__ cosv, const float* __restrict__ sinv,
                                                  act_t* __restrict__ out, float* __restrict__ rstd, int r, int heads,
                                                  int dim, float eps, int lane) {
    const int half = dim / 2, i = 4 * lane;
    const bool mine = i < half;
    const long long base = (long long)r * dim;
    const long long tab = (long long)(r / heads) * half;
    float xa[4], xb[4];
    float ss = 0.0f;
    if (mine) {
        load_act4(x + base + i, xa);
        load_act4(x + base + half + i, xb);
        #pragma unroll
        for (int e = 0; e < 4; e++) ss += xa[e] * xa[e] + xb[e] * xb[e];
    }
    ss = warp_sum(ss);
    const float inv = 1.0f / sqrtf(ss / (float)dim + eps);
    if (lane == 0) rstd[r] = inv;
    if (!mine) return;
    float was[4], wbs[4], cs[4], sn[4];
    load_f32x4(w + i, was), load_f32x4(w + half + i, wbs);
    load_f32x4(cosv + tab + i, cs), load_f32x4(sinv + tab + i, sn);
    float oa[4], ob[4];
    #pragma unroll
    for (int e = 0; e < 4; e++) {
        const float a = xa[e] * inv * (1.0f + was[e]);
        const float b = xb[e] * inv * (1.0f + wbs[e]);
        oa[e] = a * cs[e] - b * sn[e];
        ob[e] = b * cs[e] + a * sn[e];
    }
    store_act4(out + base + i, oa[0], oa[1], oa[2], oa[3]);
    store_act4(out + base + half + i, ob[0], ob[1], ob[2], ob[3]);
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

// The backward pass of one row: dy is the gradient of the rotated output;
// dx receives the gradient of the norm's input x (pre-norm), as
// activations for the projection's GEMM, at dx_base (a token's rows may lie
// apart: the GEMM may read q's, k's and v's gradients as one matrix).
__device__ __forceinline__ void qk_norm_rope_bwd_row(const float* __restrict__ dy, const act_t* __restrict__ x, const float* __restrict__ w,
                                                     float rs, const float* __restrict__ cosv, const float* __restrict__ sinv,
                                                     act_t* __restrict__ dx, long long base, long long dx_base, long long tab,
                                                     int dim, int lane) {
    const int half = dim / 2;
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
    const float k = rs * rs * rs * gx / (float)dim;
    for (int i = lane; i < half; i += 32) {
        const float c = cosv[tab + i], s = sinv[tab + i];
        const float da = dy[base + i], db = dy[base + i + half];
        const float ga = (da * c + db * s) * (1.0f + w[i]);
        const float gb = (db * c - da * s) * (1.0f + w[i + half]);
        dx[dx_base + i] = to_act(rs * ga - k * to_f32(x[base + i]));
        dx[dx_base + i + half] = to_act(rs * gb - k * to_f32(x[base + i + half]));
    }
}

// The same for head_dim a multiple of 8 and at most 256, every pointer and
// row 16-byte aligned: each lane loads its four elements of each half once,
// in one load each, and keeps them for the second half of the work (the
// loops above read the row twice, two or four bytes at a time). The sum
// adds in another order; the rest is the same.
__device__ __forceinline__ void qk_norm_rope_bwd_row4(const float* __restrict__ dy, const act_t* __restrict__ x, const float* __restrict__ w,
                                                      float rs, const float* __restrict__ cosv, const float* __restrict__ sinv,
                                                      act_t* __restrict__ dx, long long base, long long dx_base, long long tab,
                                                      int dim, int lane) {
    const int half = dim / 2, i = 4 * lane;
    const bool mine = i < half;
    float ga[4], gb[4], xa[4], xb[4];
    float gx = 0.0f;
    if (mine) {
        float da[4], db[4], was[4], wbs[4], cs[4], sn[4];
        load_f32x4(dy + base + i, da), load_f32x4(dy + base + half + i, db);
        load_act4(x + base + i, xa), load_act4(x + base + half + i, xb);
        load_f32x4(w + i, was), load_f32x4(w + half + i, wbs);
        load_f32x4(cosv + tab + i, cs), load_f32x4(sinv + tab + i, sn);
        #pragma unroll
        for (int e = 0; e < 4; e++) {
            ga[e] = (da[e] * cs[e] + db[e] * sn[e]) * (1.0f + was[e]);
            gb[e] = (db[e] * cs[e] - da[e] * sn[e]) * (1.0f + wbs[e]);
            gx += ga[e] * xa[e] + gb[e] * xb[e];
        }
    }
    gx = warp_sum(gx);
    if (!mine) return;
    const float k = rs * rs * rs * gx / (float)dim;
    float oa[4], ob[4];
    #pragma unroll
    for (int e = 0; e < 4; e++) {
        oa[e] = rs * ga[e] - k * xa[e];
        ob[e] = rs * gb[e] - k * xb[e];
    }
    store_act4(dx + dx_base + i, oa[0], oa[1], oa[2], oa[3]);
    store_act4(dx + dx_base + half + i, ob[0], ob[1], ob[2], ob[3]);
}

// The q side's qrows rows, then the k side's krows, in one launch.
template <bool vec>
__device__ void qk_norm_rope_bwd_body(const float* dq, const act_t* q, const float* qw, const float* qrstd, act_t* qdx, int qrows, int qheads,
                                      int qld, const float* dk, const act_t* k, const float* kw, const float* krstd, act_t* kdx,
                                      int krows, int kheads, int kld, const float* __restrict__ cosv, const float* __restrict__ sinv,
                                      int dim) {
    const int lane = threadIdx.x & 31;
    const int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const bool isq = r < qrows;
    if (r >= qrows + krows) return;
    const int row = isq ? r : r - qrows, heads = isq ? qheads : kheads;
    const int token = row / heads, head = row % heads;
    const long long base = (long long)row * dim, dx_base = (long long)token * (isq ? qld : kld) + (long long)head * dim;
    const long long tab = (long long)token * (dim / 2);
    const float* dy = isq ? dq : dk;
    const act_t* x = isq ? q : k;
    const float* w = isq ? qw : kw;
    const float rs = (isq ? qrstd : krstd)[row];
    act_t* dx = isq ? qdx : kdx;
    if (vec) qk_norm_rope_bwd_row4(dy, x, w, rs, cosv, sinv, dx, base, dx_base, tab, dim, lane);
    else qk_norm_rope_bwd_row(dy, x, w, rs, cosv, sinv, dx, base, dx_base, tab, dim, lane);
}

#define QK_NORM_ROPE_BWD_ARGS const float* dq, const act_t* q, const float* qw, const float* qrstd, act_t* qdx, int qrows, int qheads, \
    int qld, const float* dk, const act_t* k, const float* kw, const float* krstd, act_t* kdx, int krows, int kheads, int kld, \
    const float* __restrict__ cosv, const float* __restrict__ sinv, int dim
extern "C" __global__ void qk_norm_rope_bwd(QK_NORM_ROPE_BWD_ARGS) {
    qk_norm_rope_bwd_body<false>(dq, q, qw, qrstd, qdx, qrows, qheads, qld, dk, k, kw, krstd, kdx, krows, kheads, kld, cosv, sinv, dim);
}
extern "C" __global__ void qk_norm_rope_bwd_vec(QK_NORM_ROPE_BWD_ARGS) {
    qk_norm_rope_bwd_body<true>(dq, q, qw, qrstd, qdx, qrows, qheads, qld, dk, k, kw, krstd, kdx, krows, kheads, kld, cosv, sinv, dim);
}
