// Decoding products from dense bfloat16 weights: out [T × rows] = x·Wᵀ for
// the few tokens of a decoding step (T ≤ 8), where reading W is the whole
// cost. On tensor cores, as nf4_gemv_mma (nf4.cu): lane l
// (g = l / 4, c = l % 4) loads 32 consecutive weights of rows g and g + 8
// of the block's 16 (four 16-byte loads a row, a quad's 128 bytes one
// cache line), which are directly its A fragments, and x at the same 32
// positions for token g as its B fragments; the warps of a block split
// each row between them and their sums meet in a fixed order
// (gemv_mma_store). The weights are read once, every load 16 bytes wide
// and independent of the products, so many are in flight. in must be a
// multiple of 32.
#include "gemma.cuh"

#define GEMV_WARPS 8 // sixteen, or as many as even out the passes, measured slower

// gemv_mma's B fragments: token g's x at the 32 positions of piece p (in
// 32s of a row of in), b[q] holding positions 8q .. 8q + 7; zero for a
// token past T or a piece past the row's end.
__device__ __forceinline__ void gemv_x_piece(const act_t* __restrict__ x, int g, int T, int in, int p, bool inside, uint4* b) {
    #pragma unroll
    for (int q = 0; q < 4; q++) b[q] = make_uint4(0u, 0u, 0u, 0u);
    if (!inside || g >= T) return;
    const uint4* xs = reinterpret_cast<const uint4*>(x + (long long)g * in + (long long)p * 32);
    #pragma unroll
    for (int q = 0; q < 4; q++) b[q] = xs[q];
}

extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32) gemv_mma(const uint4* __restrict__ w, const act_t* __restrict__ x, int T,
                                                                   int rows, int in, int part_rows, long long part_stride,
                                                                   act_t* __restrict__ out) {
#ifndef ACT_F32
    __shared__ float part[GEMV_WARPS][32][4];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
    const long long r0 = min((int)blockIdx.x * 16 + g, rows - 1), r1 = min((int)blockIdx.x * 16 + g + 8, rows - 1);
    const int pieces = in / 32; // of 32 weights, four uint4 each
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int k0 = warp * 4; k0 < pieces; k0 += GEMV_WARPS * 4) {
        const int piece = k0 + c;
        const bool inside = piece < pieces; // past the row's end: zero weights and x
        const int p = inside ? piece : 0;
        uint4 a[2][4], b[4];
        #pragma unroll
        for (int q = 0; q < 4; q++) {
            a[0][q] = w[(r0 * pieces + p) * 4 + q];
            a[1][q] = w[(r1 * pieces + p) * 4 + q];
        }
        gemv_x_piece(x, g, T, in, p, inside, b);
        if (!inside) {
            #pragma unroll
            for (int q = 0; q < 4; q++) a[0][q] = a[1][q] = make_uint4(0u, 0u, 0u, 0u);
        }
        #pragma unroll
        for (int q = 0; q < 4; q++) { // positions 8q .. 8q + 7 of the lane's 32: two mmas
            mma_bf16(acc, a[0][q].x, a[1][q].x, a[0][q].y, a[1][q].y, b[q].x, b[q].y);
            mma_bf16(acc, a[0][q].z, a[1][q].z, a[0][q].w, a[1][q].w, b[q].z, b[q].w);
        }
    }
    gemv_mma_store<GEMV_WARPS>(acc, part, T, rows, part_rows, part_stride, out, blockIdx.x);
#endif
}

// An adapter's updates for the few tokens of a decoding step (T ≤
// LORA_FEW_TOKENS), for up to three projections of one input x [T × in]
// (k and v, gate and up, or one alone): out_m [T × rows_m] +=
// scale·(x·A_mᵀ)·B_mᵀ, with x·Aᵀ rounded to activations as the GEMMs of a
// longer step round it (PEFT's lora_A output) and the update added in
// float32 to the stored product, the sum rounded once (tok_lora_out's
// order). Where cuBLAS took two GEMMs a projection, each a few
// microseconds on a handful of multiprocessors, this is two launches for
// the group: lora_xa_few spreads A's rows, cut into column spans, over the
// whole GPU, and lora_b_few sums their partial sums in span order (the
// same result whatever the grid), then gives each thread one element of the
// outputs.
#define LORA_FEW_TOKENS 16
#define LORA_FEW_THREADS 256

// The m-th (0, 1, 2) of a group's three A's or B's, as the launches take
// them.
__device__ __forceinline__ const act_t* lora_pick(int m, const act_t* p0, const act_t* p1, const act_t* p2) {
    return m == 0 ? p0 : m == 1 ? p1 : p2;
}

// Block (j, s) sums row j of the group's stacked A's (projection j / rank)
// times each token's x over the span s of 16-byte groups into
// part[s][j][t] (float32).
extern "C" __global__ void __launch_bounds__(LORA_FEW_THREADS) lora_xa_few(const act_t* __restrict__ x, int T, int in, int rank,
                                                                        const act_t* a0, const act_t* a1, const act_t* a2,
                                                                        int span, float* __restrict__ part) {
    __shared__ float red[LORA_FEW_THREADS / 32][LORA_FEW_TOKENS];
    const int j = blockIdx.x, m = j / rank, groups = in / VEC;
    const uint4* row = reinterpret_cast<const uint4*>(lora_pick(m, a0, a1, a2) + (long long)(j - m * rank) * in);
    const uint4* xs = reinterpret_cast<const uint4*>(x);
    float acc[LORA_FEW_TOKENS];
    #pragma unroll
    for (int t = 0; t < LORA_FEW_TOKENS; t++) acc[t] = 0.0f;
    const int end = min(groups, ((int)blockIdx.y + 1) * span);
    for (int g = blockIdx.y * span + threadIdx.x; g < end; g += LORA_FEW_THREADS) {
        act_vec w;
        w.u = __ldg(row + g);
        #pragma unroll
        for (int t = 0; t < LORA_FEW_TOKENS; t++) {
            if (t >= T) break;
            act_vec v;
            v.u = xs[(long long)t * groups + g];
            #pragma unroll
            for (int e = 0; e < VEC; e++) acc[t] += to_f32(w.a[e]) * to_f32(v.a[e]);
        }
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    #pragma unroll
    for (int t = 0; t < LORA_FEW_TOKENS; t++) {
        float v = acc[t];
        for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
        if (lane == 0) red[warp][t] = v;
    }
    __syncthreads();
    if (threadIdx.x < T) {
        float sum = 0.0f;
        #pragma unroll
        for (int w = 0; w < LORA_FEW_THREADS / 32; w++) sum += red[w][threadIdx.x];
        part[((long long)blockIdx.y * gridDim.x + j) * T + threadIdx.x] = sum;
    }
}

// x·Aᵀ from lora_xa_few's partial sums (spans of them) into shared memory (every
// block the same), then each thread one element of the outputs: token t,
// row r of the stacked outputs (rows0 + rows1 + rows2 of them), so that
// every element's update is one round trip, all of them at once. vec: B's
// rows are whole 16-byte groups (rank a multiple of VEC), read so.
extern "C" __global__ void __launch_bounds__(LORA_FEW_THREADS) lora_b_few(const float* __restrict__ part, int spans, int T, int rank, int n,
                                                                       const act_t* __restrict__ b0, const act_t* __restrict__ b1,
                                                                       const act_t* __restrict__ b2, act_t* __restrict__ out0,
                                                                       act_t* __restrict__ out1, act_t* __restrict__ out2, int rows0,
                                                                       int rows1, int rows2, float scale, int vec) {
    extern __shared__ float xa[]; // [m][t][k]
    const int cells = n * rank * T;
    for (int i = threadIdx.x; i < cells; i += blockDim.x) {
        const int j = i / T, t = i - j * T, m = j / rank, k = j - m * rank;
        float sum = 0.0f;
        for (int s = 0; s < spans; s++) sum += part[(long long)s * cells + i];
        xa[(m * T + t) * rank + k] = to_f32(to_act(sum));
    }
    __syncthreads();
    const int total = rows0 + (n > 1 ? rows1 : 0) + (n > 2 ? rows2 : 0);
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)T * total) return;
    const int t = (int)(i / total);
    int r = (int)(i - (long long)t * total), m = 0, rows = rows0;
    if (r >= rows0) r -= rows0, m = 1, rows = rows1;
    if (m == 1 && r >= rows1) r -= rows1, m = 2, rows = rows2;
    const act_t* b = lora_pick(m, b0, b1, b2) + (long long)r * rank;
    act_t* o = (m == 0 ? out0 : m == 1 ? out1 : out2) + (long long)t * rows + r;
    const float* v = xa + (m * T + t) * rank;
    float u = 0.0f;
    if (vec) {
        for (int g = 0; g < rank / VEC; g++) {
            act_vec w;
            w.u = reinterpret_cast<const uint4*>(b)[g];
            #pragma unroll
            for (int e = 0; e < VEC; e++) u += to_f32(w.a[e]) * v[g * VEC + e];
        }
    } else {
        for (int k = 0; k < rank; k++) u += to_f32(b[k]) * v[k];
    }
    *o = to_act(to_f32(*o) + scale * u);
}
