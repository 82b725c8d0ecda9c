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

