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

// ---------------------------------------------------------------------------
// The forward pass on tensor cores (bf16 mma.sync m16n8k16, float32
// accumulation), for bf16 activations and head dimensions that are a
// multiple of 16; the kernel above serves the float32 test mode. Each
// block takes 64 queries of one head, each of its four warps 16 of them.
// Q stays in shared memory; K and V tiles of 32 keys pass through it. A
// warp forms S = Q·Kᵀ for its 16 rows and the tile's keys in registers,
// masks it, updates its rows' running max and sum (each row's values sit
// in the four threads of a quad), turns S into P in place (the layout of
// an mma result is that of the next mma's A operand) and adds P·V to its
// output accumulator. Rows are padded by 8 elements so that the eight
// rows an ldmatrix reads fall in different banks. Same result, within
// rounding, as attn_fwd; attn_fwd is its reference in the tests.
#define MMA_THREADS 128
#define MMA_BQ 64
#define MMA_BK 32
#define MMA_STRIDE (HD + 8)

__device__ __forceinline__ void ldsm_x4(unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3, const bf16_t* p) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(a));
}

__device__ __forceinline__ void ldsm_x4_trans(unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3, const bf16_t* p) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(a));
}

__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
    return (unsigned)f32_to_bf16(lo) | ((unsigned)f32_to_bf16(hi) << 16);
}

// Copy rows [row0, row0 + rows) of head `head` of x into a bf16 tile of
// stride MMA_STRIDE, 16 bytes at a time; rows past `limit` become zeros.
__device__ __forceinline__ void load_tile_bf16(bf16_t* tile, const bf16_t* x, int row0, int rows, int limit, int heads, int head) {
    constexpr int CH = HD / 8; // 16-byte chunks per row
    for (int e = threadIdx.x; e < rows * CH; e += MMA_THREADS) {
        const int r = e / CH, c = (e % CH) * 8;
        const int t = row0 + r;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (t < limit) v = *(const uint4*)(x + ((long long)t * heads + head) * HD + c);
        *(uint4*)(tile + r * MMA_STRIDE + c) = v;
    }
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS) attn_fwd_mma(const act_t* __restrict__ q, const act_t* __restrict__ k,
                                                                       const act_t* __restrict__ v, const int* __restrict__ lo,
                                                                       act_t* __restrict__ out, float* __restrict__ lse,
                                                                       int tokens, int heads, int kv_heads, float scale) {
#if !defined(ACT_F32) && HD % 16 == 0
    extern __shared__ bf16_t smem_bf16[];
    bf16_t* Qs = smem_bf16;
    bf16_t* Ks = Qs + MMA_BQ * MMA_STRIDE;
    bf16_t* Vs = Ks + MMA_BK * MMA_STRIDE;

    const int q0 = blockIdx.x * MMA_BQ;
    const int h = blockIdx.y;
    const int g = h / (heads / kv_heads);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gr = lane >> 2, tq = lane & 3; // the fragment row and column pair of this thread
    const int w0 = q0 + warp * 16;           // the warp's first query
    load_tile_bf16(Qs, q, q0, MMA_BQ, tokens, heads, h);

    // This thread's two rows: w0 + gr and w0 + gr + 8.
    const int qa = w0 + gr, qb = qa + 8;
    const int loa = qa < tokens ? lo[qa] : 0x7fffffff, lob = qb < tokens ? lo[qb] : 0x7fffffff;
    float ma = -INFINITY, mb = -INFINITY, la = 0.0f, lb = 0.0f;
    constexpr int NT = HD / 8; // output n-tiles of 8 columns
    float o[NT][4];
    #pragma unroll
    for (int n = 0; n < NT; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;

    const int last = min(q0 + MMA_BQ, tokens) - 1;
    const int wlast = min(w0 + 15, tokens - 1);
    const int wlo = w0 < tokens ? lo[w0] : 0x7fffffff;
    for (int k0 = lo[q0]; k0 <= last; k0 += MMA_BK) {
        __syncthreads(); // the previous tile's readers are done
        load_tile_bf16(Ks, k, k0, MMA_BK, tokens, kv_heads, g);
        load_tile_bf16(Vs, v, k0, MMA_BK, tokens, kv_heads, g);
        __syncthreads();
        // A tile wholly after the warp's last query or before its first
        // query's window has nothing for the warp.
        if (k0 > wlast || k0 + MMA_BK - 1 < wlo) continue;

        // S = Q·Kᵀ: four n-tiles of 8 keys.
        float s[MMA_BK / 8][4];
        #pragma unroll
        for (int n = 0; n < MMA_BK / 8; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
        #pragma unroll
        for (int kk = 0; kk < HD; kk += 16) {
            unsigned a0, a1, a2, a3;
            ldsm_x4(a0, a1, a2, a3, Qs + (warp * 16 + (lane & 15)) * MMA_STRIDE + kk + (lane >> 4) * 8);
            #pragma unroll
            for (int n = 0; n < MMA_BK / 8; n += 2) {
                unsigned b0, b1, b2, b3;
                ldsm_x4(b0, b1, b2, b3, Ks + (n * 8 + (lane >> 4) * 8 + (lane & 7)) * MMA_STRIDE + kk + ((lane >> 3) & 1) * 8);
                mma_bf16(s[n], a0, a1, a2, a3, b0, b1);
                mma_bf16(s[n + 1], a0, a1, a2, a3, b2, b3);
            }
        }
        // Mask, scale, and the rows' new maxima.
        float mxa = ma, mxb = mb;
        #pragma unroll
        for (int n = 0; n < MMA_BK / 8; n++) {
            #pragma unroll
            for (int e = 0; e < 2; e++) {
                const int kj = k0 + n * 8 + 2 * tq + e;
                const bool oka = qa < tokens && kj <= qa && kj >= loa;
                const bool okb = qb < tokens && kj <= qb && kj >= lob;
                s[n][e] = oka ? s[n][e] * scale : -INFINITY;
                s[n][2 + e] = okb ? s[n][2 + e] * scale : -INFINITY;
                mxa = fmaxf(mxa, s[n][e]);
                mxb = fmaxf(mxb, s[n][2 + e]);
            }
        }
        #pragma unroll
        for (int off = 1; off < 4; off <<= 1) {
            mxa = fmaxf(mxa, __shfl_xor_sync(0xffffffffu, mxa, off));
            mxb = fmaxf(mxb, __shfl_xor_sync(0xffffffffu, mxb, off));
        }
        const float alpha_a = mxa == -INFINITY || ma == -INFINITY ? (mxa == -INFINITY ? 1.0f : 0.0f) : expf(ma - mxa);
        const float alpha_b = mxb == -INFINITY || mb == -INFINITY ? (mxb == -INFINITY ? 1.0f : 0.0f) : expf(mb - mxb);
        ma = mxa;
        mb = mxb;
        float suma = 0.0f, sumb = 0.0f;
        #pragma unroll
        for (int n = 0; n < MMA_BK / 8; n++) {
            #pragma unroll
            for (int e = 0; e < 2; e++) {
                s[n][e] = s[n][e] == -INFINITY ? 0.0f : expf(s[n][e] - ma);
                s[n][2 + e] = s[n][2 + e] == -INFINITY ? 0.0f : expf(s[n][2 + e] - mb);
                suma += s[n][e];
                sumb += s[n][2 + e];
            }
        }
        #pragma unroll
        for (int off = 1; off < 4; off <<= 1) {
            suma += __shfl_xor_sync(0xffffffffu, suma, off);
            sumb += __shfl_xor_sync(0xffffffffu, sumb, off);
        }
        la = la * alpha_a + suma;
        lb = lb * alpha_b + sumb;
        #pragma unroll
        for (int n = 0; n < NT; n++) {
            o[n][0] *= alpha_a;
            o[n][1] *= alpha_a;
            o[n][2] *= alpha_b;
            o[n][3] *= alpha_b;
        }
        // O += P·V, 16 keys at a time.
        #pragma unroll
        for (int kk = 0; kk < MMA_BK / 16; kk++) {
            const unsigned a0 = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
            const unsigned a1 = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
            const unsigned a2 = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            const unsigned a3 = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
            #pragma unroll
            for (int n = 0; n < NT; n += 2) {
                unsigned b0, b1, b2, b3;
                ldsm_x4_trans(b0, b1, b2, b3, Vs + (kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * MMA_STRIDE + n * 8 + (lane >> 4) * 8);
                mma_bf16(o[n], a0, a1, a2, a3, b0, b1);
                mma_bf16(o[n + 1], a0, a1, a2, a3, b2, b3);
            }
        }
    }
    // Normalise and store; lse in the scaled scores' units, as attn_fwd.
    const float ia = la > 0.0f ? 1.0f / la : 0.0f, ib = lb > 0.0f ? 1.0f / lb : 0.0f;
    #pragma unroll
    for (int n = 0; n < NT; n++) {
        const int c = n * 8 + 2 * tq;
        if (qa < tokens) {
            act_t* p = out + ((long long)qa * heads + h) * HD + c;
            p[0] = to_act(o[n][0] * ia);
            p[1] = to_act(o[n][1] * ia);
        }
        if (qb < tokens) {
            act_t* p = out + ((long long)qb * heads + h) * HD + c;
            p[0] = to_act(o[n][2] * ib);
            p[1] = to_act(o[n][3] * ib);
        }
    }
    if (tq == 0) {
        if (qa < tokens) lse[(long long)qa * heads + h] = ma + logf(la);
        if (qb < tokens) lse[(long long)qb * heads + h] = mb + logf(lb);
    }
#endif
}

// ---------------------------------------------------------------------------
// The backward pass on tensor cores, in the same three launches as the
// CUDA-core kernels: delta (attn_bwd_dq_mma with want_delta), dK and dV
// (attn_bwd_dkdv_mma, once for each), dQ (attn_bwd_dq_mma). dO is rounded
// to bf16 as it is staged in shared memory, and P and dS are rounded to
// bf16 as they enter an mma, as FlashAttention-2 does; sums stay float32.
// Tiles are smaller for head dimension 256 so that a block stays within
// the 99 KiB of shared memory of sm_86 and sm_89 cards.
#define DQ_BK (HD > 128 ? 16 : 32)  // keys per tile of the dQ kernel
#define KV_BKV 64                   // keys per block of the dK/dV kernel, 16 a warp
#define KV_BQ (HD > 128 ? 16 : 32)  // queries per tile of the dK/dV kernel

// Like load_tile_bf16, from float32 rows, rounding to bf16.
__device__ __forceinline__ void load_tile_f32_bf16(bf16_t* tile, const float* x, int row0, int rows, int limit, int heads, int head) {
    constexpr int CH = HD / 8;
    for (int e = threadIdx.x; e < rows * CH; e += MMA_THREADS) {
        const int r = e / CH, c = (e % CH) * 8;
        const int t = row0 + r;
        uint4 u = make_uint4(0, 0, 0, 0);
        if (t < limit) {
            const float4* p = (const float4*)(x + ((long long)t * heads + head) * HD + c);
            const float4 a = p[0], b = p[1];
            u = make_uint4(pack_bf16(a.x, a.y), pack_bf16(a.z, a.w), pack_bf16(b.x, b.y), pack_bf16(b.z, b.w));
        }
        *(uint4*)(tile + r * MMA_STRIDE + c) = u;
    }
}

// acc[NT] += X·Y for a warp: X is 16 × (16·CHUNKS) in accumulator layout
// (x[2·kk], x[2·kk + 1] the n-tiles of chunk kk), Y rows of `rows` (k) by
// HD columns (n) in shared memory.
template <int CHUNKS>
__device__ __forceinline__ void mma_acc_rows(float (*acc)[4], const float (*x)[4], const bf16_t* rows, int lane) {
    #pragma unroll
    for (int kk = 0; kk < CHUNKS; kk++) {
        const unsigned a0 = pack_bf16(x[2 * kk][0], x[2 * kk][1]);
        const unsigned a1 = pack_bf16(x[2 * kk][2], x[2 * kk][3]);
        const unsigned a2 = pack_bf16(x[2 * kk + 1][0], x[2 * kk + 1][1]);
        const unsigned a3 = pack_bf16(x[2 * kk + 1][2], x[2 * kk + 1][3]);
        #pragma unroll
        for (int n = 0; n < HD / 8; n += 2) {
            unsigned b0, b1, b2, b3;
            ldsm_x4_trans(b0, b1, b2, b3, rows + (kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * MMA_STRIDE + n * 8 + (lane >> 4) * 8);
            mma_bf16(acc[n], a0, a1, a2, a3, b0, b1);
            mma_bf16(acc[n + 1], a0, a1, a2, a3, b2, b3);
        }
    }
}

// s[NS] = A·Bᵀ for a warp: A is the warp's 16 rows of `a`, B's rows are
// the 8·NS rows of `b`, both HD wide in shared memory.
template <int NS>
__device__ __forceinline__ void mma_rows_rowsT(float (*s)[4], const bf16_t* a, const bf16_t* b, int lane) {
    #pragma unroll
    for (int n = 0; n < NS; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
    #pragma unroll
    for (int kk = 0; kk < HD; kk += 16) {
        unsigned a0, a1, a2, a3;
        ldsm_x4(a0, a1, a2, a3, a + (lane & 15) * MMA_STRIDE + kk + (lane >> 4) * 8);
        #pragma unroll
        for (int n = 0; n < NS; n += 2) {
            unsigned b0, b1, b2, b3;
            ldsm_x4(b0, b1, b2, b3, b + (n * 8 + (lane >> 4) * 8 + (lane & 7)) * MMA_STRIDE + kk + ((lane >> 3) & 1) * 8);
            mma_bf16(s[n], a0, a1, a2, a3, b0, b1);
            mma_bf16(s[n + 1], a0, a1, a2, a3, b2, b3);
        }
    }
}

// The query side: 64 queries of head h a block, 16 a warp, walking key
// tiles of DQ_BK. With want_delta it writes delta = Σ_j P_ij·dP_ij (see
// attn_bwd_dq); without, dQ = Σ_j dS_ij·K_j.
extern "C" __global__ void __launch_bounds__(MMA_THREADS) attn_bwd_dq_mma(const act_t* __restrict__ q, const act_t* __restrict__ k,
                                                                          const act_t* __restrict__ v, const float* __restrict__ dout,
                                                                          const float* __restrict__ lse, float* delta,
                                                                          const int* __restrict__ lo, float* __restrict__ dq,
                                                                          int tokens, int heads, int kv_heads, float scale, int want_delta) {
#if !defined(ACT_F32) && HD % 16 == 0
    extern __shared__ bf16_t smem_bf16[];
    bf16_t* Qs = smem_bf16;
    bf16_t* Ds = Qs + MMA_BQ * MMA_STRIDE; // dO
    bf16_t* Ks = Ds + MMA_BQ * MMA_STRIDE;
    bf16_t* Vs = Ks + DQ_BK * MMA_STRIDE;

    const int q0 = blockIdx.x * MMA_BQ;
    const int h = blockIdx.y;
    const int g = h / (heads / kv_heads);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gr = lane >> 2, tq = lane & 3;
    const int w0 = q0 + warp * 16;
    load_tile_bf16(Qs, q, q0, MMA_BQ, tokens, heads, h);
    load_tile_f32_bf16(Ds, dout, q0, MMA_BQ, tokens, heads, h);

    const int qa = w0 + gr, qb = qa + 8;
    const int loa = qa < tokens ? lo[qa] : 0x7fffffff, lob = qb < tokens ? lo[qb] : 0x7fffffff;
    const float lsa = qa < tokens ? lse[(long long)qa * heads + h] : 0.0f;
    const float lsb = qb < tokens ? lse[(long long)qb * heads + h] : 0.0f;
    const float dla = qa < tokens && !want_delta ? delta[(long long)qa * heads + h] : 0.0f;
    const float dlb = qb < tokens && !want_delta ? delta[(long long)qb * heads + h] : 0.0f;
    constexpr int NT = HD / 8, NS = DQ_BK / 8;
    float acc[NT][4];
    #pragma unroll
    for (int n = 0; n < NT; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
    float pdpa = 0.0f, pdpb = 0.0f;

    const int last = min(q0 + MMA_BQ, tokens) - 1;
    const int wlast = min(w0 + 15, tokens - 1);
    const int wlo = w0 < tokens ? lo[w0] : 0x7fffffff;
    for (int k0 = lo[q0]; k0 <= last; k0 += DQ_BK) {
        __syncthreads();
        load_tile_bf16(Ks, k, k0, DQ_BK, tokens, kv_heads, g);
        load_tile_bf16(Vs, v, k0, DQ_BK, tokens, kv_heads, g);
        __syncthreads();
        if (k0 > wlast || k0 + DQ_BK - 1 < wlo) continue;
        float s[NS][4], dp[NS][4];
        mma_rows_rowsT<NS>(s, Qs + warp * 16 * MMA_STRIDE, Ks, lane);  // Q·Kᵀ
        mma_rows_rowsT<NS>(dp, Ds + warp * 16 * MMA_STRIDE, Vs, lane); // dO·Vᵀ
        // P, then dS in its place.
        #pragma unroll
        for (int n = 0; n < NS; n++) {
            #pragma unroll
            for (int e = 0; e < 2; e++) {
                const int kj = k0 + n * 8 + 2 * tq + e;
                const float pa = qa < tokens && kj <= qa && kj >= loa ? expf(s[n][e] * scale - lsa) : 0.0f;
                const float pb = qb < tokens && kj <= qb && kj >= lob ? expf(s[n][2 + e] * scale - lsb) : 0.0f;
                pdpa += pa * dp[n][e];
                pdpb += pb * dp[n][2 + e];
                s[n][e] = pa * (dp[n][e] - dla) * scale;
                s[n][2 + e] = pb * (dp[n][2 + e] - dlb) * scale;
            }
        }
        if (want_delta) continue;
        mma_acc_rows<DQ_BK / 16>(acc, s, Ks, lane); // dQ += dS·K
    }
    if (want_delta) {
        // The four threads of a row add their sums in a fixed order.
        pdpa += __shfl_xor_sync(0xffffffffu, pdpa, 1);
        pdpb += __shfl_xor_sync(0xffffffffu, pdpb, 1);
        pdpa += __shfl_xor_sync(0xffffffffu, pdpa, 2);
        pdpb += __shfl_xor_sync(0xffffffffu, pdpb, 2);
        if (tq == 0) {
            if (qa < tokens) delta[(long long)qa * heads + h] = pdpa;
            if (qb < tokens) delta[(long long)qb * heads + h] = pdpb;
        }
        return;
    }
    #pragma unroll
    for (int n = 0; n < NT; n++) {
        const int c = n * 8 + 2 * tq;
        if (qa < tokens) *(float2*)(dq + ((long long)qa * heads + h) * HD + c) = make_float2(acc[n][0], acc[n][1]);
        if (qb < tokens) *(float2*)(dq + ((long long)qb * heads + h) * HD + c) = make_float2(acc[n][2], acc[n][3]);
    }
#endif
}

// The key side: 64 keys of key head g a block, 16 a warp, summing over the
// query heads of the group and the query tiles (KV_BQ) that see the keys.
// Launched twice: dV = Σ Pᵀ·dO (want_dk 0), then dK = Σ dSᵀ·Q (want_dk 1);
// each launch forms Sᵀ = K·Qᵀ again, which costs less than the registers
// both accumulators would need at head dimension 256.
extern "C" __global__ void __launch_bounds__(MMA_THREADS) attn_bwd_dkdv_mma(const act_t* __restrict__ q, const act_t* __restrict__ k,
                                                                            const act_t* __restrict__ v, const float* __restrict__ dout,
                                                                            const float* __restrict__ lse, const float* __restrict__ delta,
                                                                            const int* __restrict__ lo, const int* __restrict__ hi,
                                                                            float* __restrict__ dk, float* __restrict__ dv,
                                                                            int tokens, int heads, int kv_heads, float scale, int want_dk) {
#if !defined(ACT_F32) && HD % 16 == 0
    extern __shared__ bf16_t smem_bf16[];
    bf16_t* Ks = smem_bf16;
    bf16_t* Vs = Ks + KV_BKV * MMA_STRIDE;
    bf16_t* Qs = Vs + KV_BKV * MMA_STRIDE;
    bf16_t* Ds = Qs + KV_BQ * MMA_STRIDE; // dO
    float* ls = (float*)(Ds + KV_BQ * MMA_STRIDE);
    float* dl = ls + KV_BQ;
    int* los = (int*)(dl + KV_BQ);

    const int k0 = blockIdx.x * KV_BKV;
    const int g = blockIdx.y;
    const int group = heads / kv_heads;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gr = lane >> 2, tq = lane & 3;
    const int kw = k0 + warp * 16;     // the warp's first key
    const int ka = kw + gr, kb = ka + 8; // this thread's two keys
    load_tile_bf16(Ks, k, k0, KV_BKV, tokens, kv_heads, g);
    if (want_dk) load_tile_bf16(Vs, v, k0, KV_BKV, tokens, kv_heads, g);
    const int qlast = hi[min(k0 + KV_BKV, tokens) - 1];
    const int whi = kw < tokens ? hi[min(kw + 15, tokens - 1)] : -1; // the warp's last query
    constexpr int NT = HD / 8, NS = KV_BQ / 8;
    float acc[NT][4];
    #pragma unroll
    for (int n = 0; n < NT; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;

    for (int h = g * group; h < (g + 1) * group; h++) {
        for (int q0 = k0; q0 <= qlast; q0 += KV_BQ) {
            __syncthreads();
            load_tile_bf16(Qs, q, q0, KV_BQ, tokens, heads, h);
            load_tile_f32_bf16(Ds, dout, q0, KV_BQ, tokens, heads, h);
            if (threadIdx.x < KV_BQ) {
                const int qi = q0 + threadIdx.x;
                ls[threadIdx.x] = qi < tokens ? lse[(long long)qi * heads + h] : 0.0f;
                dl[threadIdx.x] = qi < tokens ? delta[(long long)qi * heads + h] : 0.0f;
                los[threadIdx.x] = qi < tokens ? lo[qi] : 0x7fffffff;
            }
            __syncthreads();
            if (q0 > whi || q0 + KV_BQ - 1 < kw) continue;
            float s[NS][4], dp[NS][4];
            mma_rows_rowsT<NS>(s, Ks + warp * 16 * MMA_STRIDE, Qs, lane); // Sᵀ = K·Qᵀ
            if (want_dk) mma_rows_rowsT<NS>(dp, Vs + warp * 16 * MMA_STRIDE, Ds, lane); // dPᵀ = V·dOᵀ
            // Pᵀ, or dSᵀ, in place: rows are keys, columns queries.
            #pragma unroll
            for (int n = 0; n < NS; n++) {
                #pragma unroll
                for (int e = 0; e < 2; e++) {
                    const int c = n * 8 + 2 * tq + e, qi = q0 + c;
                    const bool oka = qi < tokens && ka <= qi && ka >= los[c];
                    const bool okb = qi < tokens && kb <= qi && kb >= los[c];
                    const float pa = oka ? expf(s[n][e] * scale - ls[c]) : 0.0f;
                    const float pb = okb ? expf(s[n][2 + e] * scale - ls[c]) : 0.0f;
                    if (want_dk) {
                        s[n][e] = pa * (dp[n][e] - dl[c]) * scale;
                        s[n][2 + e] = pb * (dp[n][2 + e] - dl[c]) * scale;
                    } else {
                        s[n][e] = pa;
                        s[n][2 + e] = pb;
                    }
                }
            }
            mma_acc_rows<KV_BQ / 16>(acc, s, want_dk ? Qs : Ds, lane); // dK += dSᵀ·Q, or dV += Pᵀ·dO
        }
    }
    float* out = want_dk ? dk : dv;
    #pragma unroll
    for (int n = 0; n < NT; n++) {
        const int c = n * 8 + 2 * tq;
        if (ka < tokens) *(float2*)(out + ((long long)ka * kv_heads + g) * HD + c) = make_float2(acc[n][0], acc[n][1]);
        if (kb < tokens) *(float2*)(out + ((long long)kb * kv_heads + g) * HD + c) = make_float2(acc[n][2], acc[n][3]);
    }
#endif
}

// ---------------------------------------------------------------------------
// Decoding with a key/value cache. Each sequence of a batch has, per layer,
// cache_len rows of kv_heads × HD: every position on global layers, a ring
// of the last `window` positions on sliding ones (position p in row
// p % cache_len). Reference: trainer's decodeState.attend.

// kv_store copies a step's keys (after norm and RoPE) and values into their
// sequences' caches: token t is sequence seq[t]'s position pos[t]. Tokens
// before from[t] are skipped: in a prompt longer than a sliding ring, they
// would share rows with later tokens of the same launch.
extern "C" __global__ void kv_store(const act_t* __restrict__ k, const act_t* __restrict__ v, const int* __restrict__ seq,
                                    const int* __restrict__ pos, const int* __restrict__ from, act_t* __restrict__ kc,
                                    act_t* __restrict__ vc, int tokens, int kv_heads, int cache_len) {
    const long long row = (long long)kv_heads * HD;
    const long long n = (long long)tokens * row;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += (long long)gridDim.x * blockDim.x) {
        const int t = (int)(e / row);
        if (pos[t] < from[t]) continue;
        const long long dst = ((long long)seq[t] * cache_len + pos[t] % cache_len) * row + e % row;
        kc[dst] = k[e];
        vc[dst] = v[e];
    }
}

#define DEC_THREADS 128

// attn_cached: each query head of token t against its sequence's cache, the
// keys at positions lo .. pos[t] (lo = pos − window + 1 on sliding layers,
// else 0), split over blocks as flash-decoding does: block (t, h, s) takes
// the keys lo + s·DEC_CHUNK onwards, DEC_CHUNK of them, and writes to part
// its unnormalised output row, its largest score and its sum of weights;
// the last of a (token, head)'s blocks to finish joins them. A decoding
// step attends to few keys per head, and a block per (token, head) alone
// would leave most of the GPU idle. Splits past pos[t] write an empty record, so that the grid
// can be sized by the cache (and captured once for every step). The
// token's own key is in the cache already (kv_store).
//
// The block's time is the latency of its loads, so each thread issues all
// of its loads of a phase before using any: for the scores, DEC_PARTS
// threads share a key, each reading every DEC_PARTS-th group of DEC_W
// values (a key's groups lie side by side across its threads); for the
// output, a thread owns a group of DEC_W dimensions over every
// DEC_KEY_SETS-th key, and the key sets' sums meet in shared memory.
#define DEC_CHUNK 32
#define DEC_PARTS (DEC_THREADS / DEC_CHUNK)
#define DEC_W (HD % VEC == 0 ? VEC : 1)   // values a load: 16 bytes where a row holds whole vectors
#define DEC_GROUPS (HD / DEC_W)           // groups of DEC_W in a row
#define DEC_KEY_SETS (DEC_THREADS / DEC_GROUPS > 0 ? DEC_THREADS / DEC_GROUPS : 1)

// The DEC_W values of row at group gi, as floats.
__device__ __forceinline__ void dec_load(const act_t* __restrict__ row, int gi, float* v) {
    if (DEC_W == VEC) {
        act_vec u;
        u.u = reinterpret_cast<const uint4*>(row)[gi];
        #pragma unroll
        for (int e = 0; e < DEC_W; e++) v[e] = to_f32(u.a[e]);
    } else {
        #pragma unroll
        for (int e = 0; e < DEC_W; e++) v[e] = to_f32(row[gi * DEC_W + e]);
    }
}

// One split's record: its unnormalised output row, largest score and sum
// of weights.
__device__ void attn_cached_split(const act_t* __restrict__ q, const act_t* __restrict__ kc, const act_t* __restrict__ vc,
                                  int t, int h, int g, int seq, int j0, int n, int heads, int kv_heads, int cache_len,
                                  float scale, float* rec) {
    __shared__ float qs[HD];
    __shared__ float w[DEC_CHUNK];
    __shared__ float sums[DEC_KEY_SETS][HD];
    const int tid = threadIdx.x;
    const long long base = (long long)seq * cache_len;
    for (int d = tid; d < HD; d += DEC_THREADS) qs[d] = to_f32(q[((long long)t * heads + h) * HD + d]);
    __syncthreads();

    // Scores: key i = tid / DEC_PARTS, its groups part, part + DEC_PARTS, ...
    {
        const int i = tid / DEC_PARTS, prt = tid % DEC_PARTS;
        float s = 0.0f;
        if (i < n) {
            const act_t* kr = kc + ((base + (j0 + i) % cache_len) * kv_heads + g) * HD;
            constexpr int mine = (DEC_GROUPS + DEC_PARTS - 1) / DEC_PARTS;
            float v[mine][DEC_W];
            #pragma unroll
            for (int m = 0; m < mine; m++)
                if (m * DEC_PARTS + prt < DEC_GROUPS) dec_load(kr, m * DEC_PARTS + prt, v[m]);
            #pragma unroll
            for (int m = 0; m < mine; m++) {
                const int gi = m * DEC_PARTS + prt;
                if (gi >= DEC_GROUPS) continue;
                #pragma unroll
                for (int e = 0; e < DEC_W; e++) s += qs[gi * DEC_W + e] * v[m][e];
            }
        }
        #pragma unroll
        for (int o = DEC_PARTS / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (prt == 0 && i < n) w[i] = s * scale;
    }
    __syncthreads();
    float mx = -INFINITY;
    for (int i = 0; i < n; i++) mx = fmaxf(mx, w[i]);
    __syncthreads(); // every thread has read the scores
    if (tid < n) w[tid] = expf(w[tid] - mx);
    __syncthreads();

    // Output: thread (key set ks, group gi) sums keys ks, ks + DEC_KEY_SETS, ...
    {
        const int ks = tid / DEC_GROUPS, gi = tid % DEC_GROUPS;
        if (ks < DEC_KEY_SETS) {
            constexpr int mine = (DEC_CHUNK + DEC_KEY_SETS - 1) / DEC_KEY_SETS;
            float v[mine][DEC_W];
            #pragma unroll
            for (int m = 0; m < mine; m++) {
                const int i = ks + m * DEC_KEY_SETS;
                if (i < n) dec_load(vc + ((base + (j0 + i) % cache_len) * kv_heads + g) * HD, gi, v[m]);
            }
            float acc[DEC_W] = {};
            #pragma unroll
            for (int m = 0; m < mine; m++) {
                const int i = ks + m * DEC_KEY_SETS;
                if (i >= n) continue;
                #pragma unroll
                for (int e = 0; e < DEC_W; e++) acc[e] += w[i] * v[m][e];
            }
            #pragma unroll
            for (int e = 0; e < DEC_W; e++) sums[ks][gi * DEC_W + e] = acc[e];
        }
    }
    __syncthreads();
    for (int d = tid; d < HD; d += DEC_THREADS) {
        float acc = 0.0f;
        for (int ks = 0; ks < DEC_KEY_SETS; ks++) acc += sums[ks][d];
        rec[d] = acc;
    }
    if (tid == 0) {
        float sum = 0.0f;
        for (int i = 0; i < n; i++) sum += w[i];
        rec[HD] = mx, rec[HD + 1] = sum;
    }
}

// part holds a counter per (token, head), then the records. The block
// that finishes last of its (token, head)'s splits, as the counter tells,
// joins them into out and sets the counter back to zero for the next
// launch: one launch where a second one for the joining cost as much as
// the attention itself.
extern "C" __global__ void __launch_bounds__(DEC_THREADS) attn_cached(const act_t* __restrict__ q, const act_t* __restrict__ kc,
                                                                       const act_t* __restrict__ vc, const int* __restrict__ seq,
                                                                       const int* __restrict__ pos, unsigned int* __restrict__ part,
                                                                       act_t* __restrict__ out, int heads, int kv_heads, int cache_len,
                                                                       int window, float scale) {
    __shared__ int last;
    const int t = blockIdx.x, h = blockIdx.y, sp = blockIdx.z, splits = gridDim.z;
    const int p = pos[t];
    const int lo = window > 0 ? max(0, p - window + 1) : 0;
    const int j0 = lo + sp * DEC_CHUNK, n = min(p + 1 - j0, DEC_CHUNK);
    unsigned int* count = part + (long long)t * heads + h;
    float* recs = reinterpret_cast<float*>(part + (long long)gridDim.x * heads) + ((long long)t * heads + h) * splits * (HD + 2);
    float* rec = recs + sp * (HD + 2);
    if (n > 0)
        attn_cached_split(q, kc, vc, t, h, h / (heads / kv_heads), seq[t], j0, n, heads, kv_heads, cache_len, scale, rec);
    else if (threadIdx.x == 0)
        rec[HD] = -INFINITY, rec[HD + 1] = 0.0f;
    if (!last_block(count, splits, &last)) return;
    decode_combine(recs, splits, HD, out + ((long long)t * heads + h) * HD);
}

