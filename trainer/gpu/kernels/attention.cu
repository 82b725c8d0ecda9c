// Causal attention over packed rows, forward and backward, in the manner of
// FlashAttention-2: scores are formed tile by tile in shared memory with an
// online softmax, so memory grows with the tokens, never with their square.
// Query i sees keys lo[i] .. i: lo[i] is the start of its packed example,
// or i − window + 1 on sliding-window layers when that is later. lo never
// decreases with i, so a tile of queries needs keys from lo of its first
// query to its last query. hi[j] is the last query that sees key j (also
// non-decreasing), bounding the queries a tile of keys must visit.
// Query head h reads key/value head h / (heads / kv_heads).
//
// Tiles hold float32 copies of their rows with a padded stride, so that the
// threads of a warp reading a column of different rows hit different banks.
// The backward pass computes dK and dV in one kernel (parallel over key
// tiles, summing over the query heads of each key head) and dQ in another
// (parallel over query tiles): no atomics, so results are reproducible.
// HEAD_DIM is fixed at compile time (a power of two up to 256).
// Reference: trainer.Attention, trainer.AttentionBackward.
#include "gemma.cuh"

#ifndef HEAD_DIM
#error "compile with -DHEAD_DIM=n"
#endif
#define HD HEAD_DIM
#define THREADS 256
#define STRIDE (HD + 1)
// Each thread owns output columns c = tid % HD of rows tid / HD + k·RSTEP.
#define RSTEP (THREADS / HD > 0 ? THREADS / HD : 1)

// Copy rows [row0, row0 + rows) of head `head` from x (a [tokens × heads ×
// HD] array) into a float tile; rows past `limit` become zeros.
template <typename T>
__device__ __forceinline__ void load_tile(float* tile, const T* x, int row0, int rows, int limit, int heads, int head) {
    for (int e = threadIdx.x; e < rows * HD; e += THREADS) {
        const int r = e / HD, d = e % HD;
        const int t = row0 + r;
        float v = 0.0f;
        if (t < limit) {
            if constexpr (sizeof(T) == 4) v = (float)x[((long long)t * heads + head) * HD + d];
            else v = to_f32(x[((long long)t * heads + head) * HD + d]);
        }
        tile[r * STRIDE + d] = v;
    }
}

__device__ __forceinline__ float tile_dot(const float* a, const float* b) {
    float s = 0.0f;
    #pragma unroll 8
    for (int d = 0; d < HD; d++) s += a[d] * b[d];
    return s;
}

#define FWD_BQ 16
#define FWD_BK 32

// Shared memory: Q [16][STRIDE], K and V [32][STRIDE], P [16][33], and the
// rows' running max, sum and rescale factor.
extern "C" __global__ void __launch_bounds__(THREADS) attn_fwd(const act_t* __restrict__ q, const act_t* __restrict__ k,
                                                               const act_t* __restrict__ v, const int* __restrict__ lo,
                                                               act_t* __restrict__ out, float* __restrict__ lse,
                                                               int tokens, int heads, int kv_heads, float scale) {
    extern __shared__ float smem[];
    float* Qs = smem;
    float* Ks = Qs + FWD_BQ * STRIDE;
    float* Vs = Ks + FWD_BK * STRIDE;
    float* Ps = Vs + FWD_BK * STRIDE;
    float* rowm = Ps + FWD_BQ * (FWD_BK + 1);
    float* rowl = rowm + FWD_BQ;
    float* rowa = rowl + FWD_BQ;

    const int q0 = blockIdx.x * FWD_BQ;
    const int h = blockIdx.y;
    const int g = h / (heads / kv_heads);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    load_tile(Qs, q, q0, FWD_BQ, tokens, heads, h);
    if (tid < FWD_BQ) {
        rowm[tid] = -INFINITY;
        rowl[tid] = 0.0f;
    }
    constexpr int NR = (FWD_BQ + RSTEP - 1) / RSTEP;
    float acc[NR];
    #pragma unroll
    for (int r = 0; r < NR; r++) acc[r] = 0.0f;
    const int col = tid % HD, row0 = tid / HD;

    const int last = min(q0 + FWD_BQ, tokens) - 1;
    for (int k0 = lo[q0]; k0 <= last; k0 += FWD_BK) {
        __syncthreads(); // the previous tile's readers are done
        load_tile(Ks, k, k0, FWD_BK, tokens, kv_heads, g);
        load_tile(Vs, v, k0, FWD_BK, tokens, kv_heads, g);
        __syncthreads();
        // Scores: lanes take keys, warps take query rows.
        for (int i = warp; i < FWD_BQ; i += THREADS / 32) {
            const int qi = q0 + i, kj = k0 + lane;
            float s = -INFINITY;
            if (qi < tokens && kj <= qi && kj >= lo[qi]) s = scale * tile_dot(Qs + i * STRIDE, Ks + lane * STRIDE);
            // Online softmax of the row.
            const float mold = rowm[i];
            const float mnew = fmaxf(mold, warp_max(s));
            float p = 0.0f, alpha = 1.0f;
            if (mnew != -INFINITY) {
                p = s == -INFINITY ? 0.0f : expf(s - mnew);
                alpha = mold == -INFINITY ? 0.0f : expf(mold - mnew);
            }
            const float psum = warp_sum(p);
            Ps[i * (FWD_BK + 1) + lane] = p;
            __syncwarp();
            if (lane == 0) {
                rowm[i] = mnew;
                rowl[i] = rowl[i] * alpha + psum;
                rowa[i] = alpha;
            }
        }
        __syncthreads();
        #pragma unroll
        for (int r = 0; r < NR; r++) {
            const int i = row0 + r * RSTEP;
            if (i < FWD_BQ) {
                float a = acc[r] * rowa[i];
                const float* pr = Ps + i * (FWD_BK + 1);
                #pragma unroll 8
                for (int j = 0; j < FWD_BK; j++) a += pr[j] * Vs[j * STRIDE + col];
                acc[r] = a;
            }
        }
    }
    __syncthreads();
    #pragma unroll
    for (int r = 0; r < NR; r++) {
        const int i = row0 + r * RSTEP;
        const int qi = q0 + i;
        if (i < FWD_BQ && qi < tokens) {
            out[((long long)qi * heads + h) * HD + col] = to_act(acc[r] / rowl[i]);
            if (col == 0) lse[(long long)qi * heads + h] = rowm[i] + logf(rowl[i]);
        }
    }
}

#define BWD_B 16

// dK and dV of key tile [k0, k0 + 16) of key head g: for each query head of
// the group and each tile of queries that can see these keys,
//   P = exp(scale·QKᵀ − lse), dV += Pᵀ dO, dP = dO Vᵀ,
//   dS = P ∘ (dP − delta) · scale, dK += dSᵀ Q.
extern "C" __global__ void __launch_bounds__(THREADS) attn_bwd_dkdv(const act_t* __restrict__ q, const act_t* __restrict__ k,
                                                                    const act_t* __restrict__ v, const float* __restrict__ dout,
                                                                    const float* __restrict__ lse, const float* __restrict__ delta,
                                                                    const int* __restrict__ lo, const int* __restrict__ hi,
                                                                    float* __restrict__ dk, float* __restrict__ dv,
                                                                    int tokens, int heads, int kv_heads, float scale) {
    extern __shared__ float smem[];
    float* Ks = smem;
    float* Vs = Ks + BWD_B * STRIDE;
    float* Qs = Vs + BWD_B * STRIDE;
    float* Ds = Qs + BWD_B * STRIDE;
    float* Ps = Ds + BWD_B * STRIDE;
    float* Ss = Ps + BWD_B * (BWD_B + 1);
    float* rl = Ss + BWD_B * (BWD_B + 1);
    float* rd = rl + BWD_B;

    const int k0 = blockIdx.x * BWD_B;
    const int g = blockIdx.y;
    const int group = heads / kv_heads;
    const int tid = threadIdx.x;
    load_tile(Ks, k, k0, BWD_B, tokens, kv_heads, g);
    load_tile(Vs, v, k0, BWD_B, tokens, kv_heads, g);
    constexpr int NR = (BWD_B + RSTEP - 1) / RSTEP;
    float accK[NR], accV[NR];
    #pragma unroll
    for (int r = 0; r < NR; r++) accK[r] = accV[r] = 0.0f;
    const int col = tid % HD, row0 = tid / HD;
    const int klast = min(k0 + BWD_B, tokens) - 1;
    const int qlast = hi[klast];
    // Scores: thread tid takes query i = tid / 16 and key j = tid % 16.
    const int si = tid / BWD_B, sj = tid % BWD_B;

    for (int h = g * group; h < (g + 1) * group; h++) {
        for (int q0 = k0; q0 <= qlast; q0 += BWD_B) {
            __syncthreads();
            load_tile(Qs, q, q0, BWD_B, tokens, heads, h);
            load_tile(Ds, dout, q0, BWD_B, tokens, heads, h);
            if (tid < BWD_B) {
                const int qi = q0 + tid;
                rl[tid] = qi < tokens ? lse[(long long)qi * heads + h] : 0.0f;
                rd[tid] = qi < tokens ? delta[(long long)qi * heads + h] : 0.0f;
            }
            __syncthreads();
            if (si < BWD_B) {
                const int qi = q0 + si, kj = k0 + sj;
                float p = 0.0f, ds = 0.0f;
                if (qi < tokens && kj <= qi && kj >= lo[qi]) {
                    p = expf(scale * tile_dot(Qs + si * STRIDE, Ks + sj * STRIDE) - rl[si]);
                    const float dp = tile_dot(Ds + si * STRIDE, Vs + sj * STRIDE);
                    ds = p * (dp - rd[si]) * scale;
                }
                Ps[si * (BWD_B + 1) + sj] = p;
                Ss[si * (BWD_B + 1) + sj] = ds;
            }
            __syncthreads();
            #pragma unroll
            for (int r = 0; r < NR; r++) {
                const int j = row0 + r * RSTEP;
                if (j < BWD_B) {
                    float av = accV[r], ak = accK[r];
                    #pragma unroll 4
                    for (int i = 0; i < BWD_B; i++) {
                        av += Ps[i * (BWD_B + 1) + j] * Ds[i * STRIDE + col];
                        ak += Ss[i * (BWD_B + 1) + j] * Qs[i * STRIDE + col];
                    }
                    accV[r] = av;
                    accK[r] = ak;
                }
            }
        }
    }
    #pragma unroll
    for (int r = 0; r < NR; r++) {
        const int j = row0 + r * RSTEP;
        const int kj = k0 + j;
        if (j < BWD_B && kj < tokens) {
            dk[((long long)kj * kv_heads + g) * HD + col] = accK[r];
            dv[((long long)kj * kv_heads + g) * HD + col] = accV[r];
        }
    }
}

// The query side of the backward pass, in two launches over query tiles
// [q0, q0 + 16) of head h, both walking the key tiles the queries see:
//
// with want_delta set, delta[i, h] = Σ_j P_ij · dP_ij, the softmax
// gradient's row term. Mathematically it equals Σ_d dO·O, but that form
// subtracts two nearly equal numbers in dS = P ∘ (dP − delta) and takes
// the rounding of O (stored as an activation) with it; summed from the same
// P and dP the gradients use, in float32, the difference stays accurate.
// Each of the 16 threads of a query (a half-warp) sums its own keys; they
// add theirs at the end in a fixed order.
//
// without it, dQ = Σ_j dS_ij K_j with dS = P ∘ (dP − delta) · scale.
extern "C" __global__ void __launch_bounds__(THREADS) attn_bwd_dq(const act_t* __restrict__ q, const act_t* __restrict__ k,
                                                                  const act_t* __restrict__ v, const float* __restrict__ dout,
                                                                  const float* __restrict__ lse, float* delta,
                                                                  const int* __restrict__ lo, float* __restrict__ dq,
                                                                  int tokens, int heads, int kv_heads, float scale, int want_delta) {
    extern __shared__ float smem[];
    float* Qs = smem;
    float* Ds = Qs + BWD_B * STRIDE;
    float* Ks = Ds + BWD_B * STRIDE;
    float* Vs = Ks + BWD_B * STRIDE;
    float* Ss = Vs + BWD_B * STRIDE;
    float* rl = Ss + BWD_B * (BWD_B + 1);
    float* rd = rl + BWD_B;

    const int q0 = blockIdx.x * BWD_B;
    const int h = blockIdx.y;
    const int g = h / (heads / kv_heads);
    const int tid = threadIdx.x;
    load_tile(Qs, q, q0, BWD_B, tokens, heads, h);
    load_tile(Ds, dout, q0, BWD_B, tokens, heads, h);
    if (tid < BWD_B) {
        const int qi = q0 + tid;
        rl[tid] = qi < tokens ? lse[(long long)qi * heads + h] : 0.0f;
        rd[tid] = qi < tokens && !want_delta ? delta[(long long)qi * heads + h] : 0.0f;
    }
    constexpr int NR = (BWD_B + RSTEP - 1) / RSTEP;
    float acc[NR];
    #pragma unroll
    for (int r = 0; r < NR; r++) acc[r] = 0.0f;
    float pdp = 0.0f;
    const int col = tid % HD, row0 = tid / HD;
    const int si = tid / BWD_B, sj = tid % BWD_B;
    const int last = min(q0 + BWD_B, tokens) - 1;
    for (int k0 = lo[q0]; k0 <= last; k0 += BWD_B) {
        __syncthreads();
        load_tile(Ks, k, k0, BWD_B, tokens, kv_heads, g);
        load_tile(Vs, v, k0, BWD_B, tokens, kv_heads, g);
        __syncthreads();
        const int qi = q0 + si, kj = k0 + sj;
        float ds = 0.0f;
        if (qi < tokens && kj <= qi && kj >= lo[qi]) {
            const float p = expf(scale * tile_dot(Qs + si * STRIDE, Ks + sj * STRIDE) - rl[si]);
            const float dp = tile_dot(Ds + si * STRIDE, Vs + sj * STRIDE);
            pdp += p * dp;
            ds = p * (dp - rd[si]) * scale;
        }
        if (want_delta) continue;
        Ss[si * (BWD_B + 1) + sj] = ds;
        __syncthreads();
        #pragma unroll
        for (int r = 0; r < NR; r++) {
            const int i = row0 + r * RSTEP;
            if (i < BWD_B) {
                float a = acc[r];
                #pragma unroll 4
                for (int j = 0; j < BWD_B; j++) a += Ss[i * (BWD_B + 1) + j] * Ks[j * STRIDE + col];
                acc[r] = a;
            }
        }
    }
    if (want_delta) {
        for (int off = BWD_B / 2; off > 0; off >>= 1) pdp += __shfl_xor_sync(0xffffffffu, pdp, off);
        const int qi = q0 + si;
        if (sj == 0 && qi < tokens) delta[(long long)qi * heads + h] = pdp;
        return;
    }
    #pragma unroll
    for (int r = 0; r < NR; r++) {
        const int i = row0 + r * RSTEP;
        const int qi = q0 + i;
        if (i < BWD_B && qi < tokens) dq[((long long)qi * heads + h) * HD + col] = acc[r];
    }
}
