// Weights: conversion of stored checkpoint tensors (bf16, f16, f32) and
// NF4 quantisation in bitsandbytes' layout. The first level of NF4 (each
// 64-block's absmax and the packed 4-bit codes) runs here; the double
// quantisation of the absmax values runs on the host
// (trainer.NewNF4Tensor), shared with the CPU backend.
// Reference: trainer.QuantizeNF4, trainer.NF4Tensor.Dequantize.
#include "gemma.cuh"
#include "nf4.cuh"
#include "random.cuh"

// One warp per 64-block: lane l quantises elements 2l and 2l+1, which share
// a byte (the first in the high nibble).
extern "C" __global__ void nf4_quantize_blocks(const void* __restrict__ src, int dtype, long long n,
                                               unsigned char* __restrict__ packed, float* __restrict__ absmax) {
    const int lane = threadIdx.x & 31;
    const long long block = blockIdx.x * (long long)(blockDim.x >> 5) + (threadIdx.x >> 5);
    const long long i0 = block * 64 + 2 * lane;
    if (block * 64 >= n) return;
    const float v0 = i0 < n ? load_stored(src, dtype, i0) : 0.0f;
    const float v1 = i0 + 1 < n ? load_stored(src, dtype, i0 + 1) : 0.0f;
    const float m = warp_max(fmaxf(fabsf(v0), fabsf(v1)));
    const float inv = m == 0.0f ? 0.0f : 1.0f / m;
    if (lane == 0) absmax[block] = m;
    if (i0 >= n) return;
    // bitsandbytes' decision: the index of the first midpoint not below x.
    unsigned char q0 = 0, q1 = 0;
    const float x0 = v0 * inv, x1 = v1 * inv;
    while (q0 < 15 && x0 > NF4_MID[q0]) q0++;
    while (q1 < 15 && x1 > NF4_MID[q1]) q1++;
    packed[i0 / 2] = (unsigned char)((q0 << 4) | (i0 + 1 < n ? q1 : 0));
}

// out[i] = the weight NF4 encodes, rounded to the checkpoint dtype. The
// products and the sum are kept as separate roundings (no fused
// multiply-add), as the host computes them.
extern "C" __global__ void nf4_dequantize(const unsigned char* __restrict__ packed, const unsigned char* __restrict__ absmax_q,
                                          const float* __restrict__ absmax2, float offset, long long n, int round_mode,
                                          act_t* __restrict__ out) {
    GRID_STRIDE(i, n) {
        const long long b = i / 64;
        const float am = nf4_scale(DYN_CODE[absmax_q[b]], absmax2[b / 256], offset);
        const unsigned char byte = packed[i / 2];
        const unsigned char q = (i & 1) ? (byte & 0xf) : (byte >> 4);
        out[i] = to_act(round_to(__fmul_rn(NF4_CODE[q], am), round_mode));
    }
}

// The code tables in shared memory (threads of a warp reading different
// entries of a constant array are served one address at a time); returns
// the NF4 table's shared address for nf4_code.
__device__ __forceinline__ unsigned int nf4_load_tables(float* code, float* dyn) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) {
        dyn[i] = DYN_CODE[i];
        if (i < 16) code[i] = NF4_CODE[i];
    }
    __syncthreads();
    return (unsigned int)__cvta_generic_to_shared(code);
}

// The same, eight weights a unit: a 4-byte word of codes in, 16 bytes of
// bfloat16 (32 of float32) out. A block takes tiles of NF4_DQ_UNROLL
// units a thread, thread t every blockDim-th unit of the tile from t, so
// that a warp's loads and stores each cover one contiguous span; all of a
// tile's loads are issued before the first is used. The codes sit in
// shared memory: threads of a warp reading different entries of a constant
// array are served one address at a time, which held a one-weight kernel
// to an eighth of the memory bandwidth.
#define NF4_DQ_UNROLL 4 // kernels.nf4DequantUnroll
// A weight's row of row_units units lands ld_units units apart in out
// (ld_units == row_units: one after the other).
template <int ROUND>
__device__ __forceinline__ void nf4_dequantize8_as(const unsigned int* __restrict__ packed, const unsigned char* __restrict__ absmax_q,
                                                   const float* __restrict__ absmax2, float offset, long long units,
                                                   unsigned row_units, unsigned ld_units,
                                                   const float* code, const float* dyn, uint4* __restrict__ out) {
    const long long tile = (long long)NF4_DQ_UNROLL * blockDim.x;
    for (long long first = blockIdx.x * tile + threadIdx.x; first < units; first += gridDim.x * tile) {
        unsigned int w[NF4_DQ_UNROLL];
        unsigned char q[NF4_DQ_UNROLL];
        float a2[NF4_DQ_UNROLL];
        #pragma unroll
        for (int j = 0; j < NF4_DQ_UNROLL; j++) {
            const long long u = first + j * (long long)blockDim.x;
            if (u < units) {
                w[j] = packed[u];
                q[j] = absmax_q[u / 8];     // eight units to a 64-block
                a2[j] = absmax2[u / 2048]; // 256 64-blocks to a second-level scale
            }
        }
        #pragma unroll
        for (int j = 0; j < NF4_DQ_UNROLL; j++) {
            const long long u = first + j * (long long)blockDim.x;
            if (u >= units) break;
            const float am = nf4_scale(dyn[q[j]], a2[j], offset);
            const long long at = row_units == ld_units ? u : (long long)((unsigned)u / row_units) * ld_units + (unsigned)u % row_units;
#ifndef ACT_F32
            if (ROUND == ROUND_BF16) {
                // Rounded once to bfloat16 (the checkpoint's dtype and the
                // activation's are one): the hardware's conversion of a
                // pair, which rounds finite values as f32_to_bf16 does; the
                // first weight (high nibble) in the low half.
                unsigned int o[4];
                #pragma unroll
                for (int k = 0; k < 4; k++) {
                    const unsigned int byte = (w[j] >> (8 * k)) & 0xffu;
                    asm("cvt.rn.bf16x2.f32 %0, %1, %2;"
                        : "=r"(o[k])
                        : "f"(__fmul_rn(code[byte & 0xfu], am)), "f"(__fmul_rn(code[byte >> 4], am)));
                }
                out[at] = make_uint4(o[0], o[1], o[2], o[3]);
                continue;
            }
#endif
            act_vec o[8 / VEC];
            #pragma unroll
            for (int e = 0; e < 8; e++) {
                const unsigned int byte = (w[j] >> (8 * (e / 2))) & 0xffu;
                const unsigned int nibble = e % 2 == 0 ? byte >> 4 : byte & 0xfu;
                o[e / VEC].a[e % VEC] = to_act(round_to(__fmul_rn(code[nibble], am), ROUND));
            }
            #pragma unroll
            for (int h = 0; h < 8 / VEC; h++) out[at * (8 / VEC) + h] = o[h].u;
        }
    }
}

// The rounding mode is chosen once, outside the loop: per weight, its
// branches made the loop several times longer.
extern "C" __global__ void nf4_dequantize8(const unsigned int* __restrict__ packed, const unsigned char* __restrict__ absmax_q,
                                           const float* __restrict__ absmax2, float offset, long long units, unsigned row_units,
                                           unsigned ld_units, int round_mode, uint4* __restrict__ out) {
    __shared__ float code[16], dyn[256];
    nf4_load_tables(code, dyn);
    if (round_mode == ROUND_BF16)
        nf4_dequantize8_as<ROUND_BF16>(packed, absmax_q, absmax2, offset, units, row_units, ld_units, code, dyn, out);
    else if (round_mode == ROUND_F16)
        nf4_dequantize8_as<ROUND_F16>(packed, absmax_q, absmax2, offset, units, row_units, ld_units, code, dyn, out);
    else
        nf4_dequantize8_as<ROUND_NONE>(packed, absmax_q, absmax2, offset, units, row_units, ld_units, code, dyn, out);
}

// The decoding product out [T × rows] = x·Wᵀ for the few tokens of a step
// (T ≤ 8), reading W in its NF4 form: half a byte a weight, where the
// dequantised GEMM reads two (and a dequantisation at every step reads half
// a byte, writes two and reads them again). At batch 1 those bytes are what
// a step costs. nf4_gemv_mma runs on tensor cores with bfloat16
// activations, each 64-block's scale applied to its sum (see there).
// nf4_gemv, one product at a time in float32, uses the weights
// nf4_dequantize writes (code·absmax rounded to the checkpoint dtype, then
// to an activation), so only the order of the sums differs from the
// dequantised GEMM's; it serves the float32 test mode, and rows whose
// length is not a multiple of 64. It needs in to be a multiple of 32: a
// lane's 32 weights then lie in one row and one 64-block.
#define NF4_GEMV_PARAMS                                                                                                       \
    const uint4 *__restrict__ packed, const unsigned char *__restrict__ absmax_q, const float *__restrict__ absmax2,          \
        float offset, int round_mode, const act_t *__restrict__ x, int T, int rows, int in, act_t *__restrict__ out

// Codes are looked up four nibbles at a time: nf4_nibbles spreads a word's
// high (or low) nibbles over its four bytes, each times four (a byte offset
// into the table), and one byte permutation then makes a table entry's
// shared-memory address, the table being aligned to 256 bytes.
#define NF4_TABLE_ALIGN 256
__device__ __forceinline__ unsigned int nf4_nibbles(unsigned int word, bool high) {
    return (high ? word >> 2 : word << 2) & 0x3c3c3c3cu;
}

// The code at byte j of nibbles, from the table at shared address base.
__device__ __forceinline__ float nf4_code(unsigned int base, unsigned int nibbles, int j) {
    float v;
    asm volatile("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(__byte_perm(nibbles, base, 0x7650 + j)));
    return v;
}

// The two weights of byte j of a word (its nibbles hi and lo) as a
// bfloat16 pair, the first (high nibble) in the low half as a tensor-core
// fragment holds it; the pair's conversion is the only rounding (bfloat16
// checkpoints, or float32 ones read as bfloat16).
__device__ __forceinline__ unsigned int nf4_bf16x2(unsigned int base, unsigned int hi, unsigned int lo, int j, float am) {
    const float first = __fmul_rn(nf4_code(base, hi, j), am);
    const float second = __fmul_rn(nf4_code(base, lo, j), am);
    unsigned int pair;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(pair) : "f"(second), "f"(first));
    return pair;
}

// The scale of 64-block b (nf4_dequantize's).
__device__ __forceinline__ float nf4_block_absmax(const unsigned char* __restrict__ absmax_q, const float* __restrict__ absmax2,
                                                  const float* dyn, float offset, long long b) {
    return nf4_scale(dyn[absmax_q[b]], absmax2[b / 256], offset);
}

// nf4_gemv: a warp computes two rows, lane by lane over 32-weight pieces,
// two pieces' loads in flight before it computes either; blocks stride
// over the row pairs. TO_BF16 (the weights are bfloat16 values) is chosen
// once per kernel, not in the inner loop.
#define NF4_GEMV_ROWS 2
#define NF4_GEMV_TOKENS 8
template <bool TO_BF16>
__device__ __forceinline__ void nf4_gemv_rows(const uint4* __restrict__ packed, const unsigned char* __restrict__ absmax_q,
                                              const float* __restrict__ absmax2, float offset, int round_mode, unsigned int code,
                                              const float* dyn, const act_t* __restrict__ x, int T, int rows, int in, int lane,
                                              int row0, act_t* __restrict__ out) {
    const int pieces = in / 32;
    float acc[NF4_GEMV_ROWS][NF4_GEMV_TOKENS] = {};
    for (int c0 = lane; c0 < pieces; c0 += 64) {
        uint4 w[2][NF4_GEMV_ROWS];
        float am[2][NF4_GEMV_ROWS];
        #pragma unroll
        for (int u = 0; u < 2; u++) {
            // Past the row's end, or past the last row, a valid piece is read
            // and not used.
            const int c = min(c0 + 32 * u, pieces - 1);
            #pragma unroll
            for (int r = 0; r < NF4_GEMV_ROWS; r++) {
                const long long piece = (long long)min(row0 + r, rows - 1) * pieces + c;
                w[u][r] = packed[piece];
                am[u][r] = nf4_block_absmax(absmax_q, absmax2, dyn, offset, piece / 2);
            }
        }
        #pragma unroll
        for (int u = 0; u < 2; u++) {
            const int c = c0 + 32 * u;
            if (c >= pieces) break;
            #pragma unroll
            for (int s = 0; s < 4; s++) { // eight weights: one 32-bit word of each row's piece
                float wv[NF4_GEMV_ROWS][8];
                #pragma unroll
                for (int r = 0; r < NF4_GEMV_ROWS; r++) {
                    const uint4 p = w[u][r];
                    const unsigned int word = s == 0 ? p.x : s == 1 ? p.y : s == 2 ? p.z : p.w;
                    const unsigned int hi = nf4_nibbles(word, true), lo = nf4_nibbles(word, false);
                    #pragma unroll
                    for (int j = 0; j < 4; j++) { // bytes in memory order
                        if (TO_BF16) {
                            const unsigned int pair = nf4_bf16x2(code, hi, lo, j, am[u][r]);
                            wv[r][2 * j] = __uint_as_float(pair << 16);
                            wv[r][2 * j + 1] = __uint_as_float(pair & 0xffff0000u);
                        } else {
                            wv[r][2 * j] = to_f32(to_act(round_to(__fmul_rn(nf4_code(code, hi, j), am[u][r]), round_mode)));
                            wv[r][2 * j + 1] = to_f32(to_act(round_to(__fmul_rn(nf4_code(code, lo, j), am[u][r]), round_mode)));
                        }
                    }
                }
                #pragma unroll
                for (int t = 0; t < NF4_GEMV_TOKENS; t++) {
                    if (t >= T) break;
                    const act_vec* xs = reinterpret_cast<const act_vec*>(x + (long long)t * in + c * 32 + s * 8);
                    float xv[8];
                    #pragma unroll
                    for (int h = 0; h < 8 / VEC; h++) {
                        const act_vec v = xs[h];
                        #pragma unroll
                        for (int e = 0; e < VEC; e++) xv[h * VEC + e] = to_f32(v.a[e]);
                    }
                    #pragma unroll
                    for (int r = 0; r < NF4_GEMV_ROWS; r++) {
                        #pragma unroll
                        for (int e = 0; e < 8; e++) acc[r][t] = fmaf(wv[r][e], xv[e], acc[r][t]);
                    }
                }
            }
        }
    }
    #pragma unroll
    for (int t = 0; t < NF4_GEMV_TOKENS; t++) {
        if (t >= T) break;
        #pragma unroll
        for (int r = 0; r < NF4_GEMV_ROWS; r++) {
            const float v = warp_sum(acc[r][t]);
            if (lane == 0 && row0 + r < rows) out[(long long)t * rows + row0 + r] = to_act(v);
        }
    }
}

extern "C" __global__ void __launch_bounds__(128) nf4_gemv(NF4_GEMV_PARAMS) {
    __shared__ __align__(NF4_TABLE_ALIGN) float table[16];
    __shared__ float dyn[256];
    const unsigned int code = nf4_load_tables(table, dyn);
    const bool to_bf16 = round_mode == ROUND_BF16 || (sizeof(act_t) == 2 && round_mode == ROUND_NONE);
    const int lane = threadIdx.x & 31;
    const int warps = gridDim.x * (blockDim.x >> 5);
    for (int row0 = (blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * NF4_GEMV_ROWS; row0 < rows;
         row0 += warps * NF4_GEMV_ROWS) {
        if (to_bf16)
            nf4_gemv_rows<true>(packed, absmax_q, absmax2, offset, round_mode, code, dyn, x, T, rows, in, lane, row0, out);
        else
            nf4_gemv_rows<false>(packed, absmax_q, absmax2, offset, round_mode, code, dyn, x, T, rows, in, lane, row0, out);
    }
}

// nf4_gemv_mma: a block of NF4_MMA_WARPS warps takes 16 rows at a time
// (the blocks stride over the row tiles, so that each fills its tables
// once), its warps splitting the rows' 64-blocks between them; one
// mma.sync multiplies the 16 rows by eight columns of x, the T ≤ 8 tokens,
// so a step of eight costs what a step of one does. A dot product may run
// over k in any order that W and x share: lane l (quad column c = l % 4)
// takes the 16 weights at 64·b + 16c of rows g and g + 8 (g = l / 4) of
// each 64-block b, and x at those positions for token g; the quad's four
// lanes cover the block, so four mmas sum it apart from the others and its
// two rows' scales then multiply the sums once. A weight thus costs one
// table look-up of its code (a byte's two weights at a time,
// nf4_mma_tables) and no product of its own: the codes enter as bfloat16
// values and code·scale is never rounded, where nf4_dequantize rounds each
// weight. The two agree within bfloat16's precision (TestNF4GEMV checks
// both), not bit for bit. Each warp loads its next pass (the next two
// blocks, or the first two of its next tile) while it computes this one,
// the first before the tables are filled. The warps' sums meet in shared
// memory in a fixed order. in must be a multiple of 64, so that a 64-block
// lies in one row. It takes one matrix, or two of one input (k and v,
// gate and up) in one launch: the tiles of the second follow those of the
// first (rows2 = 0 for none), each tile computed as it would be alone.
#define NF4_MMA_WARPS 8
#define NF4_PASS 2 // 64-blocks a warp's pass
// NF4_MIN_BLOCKS, the launch bound, comes from kernels.Sources (nf4BlocksPerSM).

// A warp's pass as loaded: its lane's two rows of NF4_PASS 64-blocks.
struct nf4_pass {
    nf4_block b[NF4_PASS];
};

// nf4_gemv_mma's B fragments: token g's x at the 16 positions from pos,
// b[q] holding pos + 8q .. pos + 8q + 7; zero for a token past T.
__device__ __forceinline__ void gemv_x16(const act_t* __restrict__ x, int g, int T, int in, int pos, uint4* b) {
    b[0] = b[1] = make_uint4(0u, 0u, 0u, 0u);
    if (g >= T) return;
    const uint4* xs = reinterpret_cast<const uint4*>(x + (long long)g * in + pos);
    b[0] = xs[0];
    b[1] = xs[1];
}

// One matrix of nf4_gemv_mma's product.
struct nf4_matrix {
    const uint2* codes;
    const unsigned char* absmax_q;
    const float* absmax2;
    float offset;
    int rows, tiles;
    act_t* out;
    const uint4* tile_codes; // nf4_tile_repack's copy (nf4_gemv_mma_tiled)
    const unsigned short* tile_aq;
};

// The body of nf4_gemv_mma (bitsandbytes' layout) and nf4_gemv_mma_tiled
// (nf4_tile_repack's copies, read where the decoder stored them): the
// same arithmetic, other loads. Two kernels rather than a branch per load.
template <bool TILED>
__device__ __forceinline__ void nf4_gemv_mma_body(const nf4_matrix& m1, const nf4_matrix& m2, const act_t* __restrict__ x, int T, int in) {
#ifndef ACT_F32
    __shared__ __align__(16) unsigned int pairs[256 * NF4_PAIR_COPIES];
    __shared__ float dyn[256];
    __shared__ float part[NF4_MMA_WARPS][32][4];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
    const unsigned int lane4 = 4u * lane;
    const int blocks = in / 64; // 64-blocks a row: four uint2 of codes each, one a lane
    const int tiles = m1.tiles + m2.tiles;
    // Tile t of the pair: matrix m1's t, or m2's t − m1.tiles.
    auto matrix = [&](int t) -> const nf4_matrix& { return t < m1.tiles ? m1 : m2; };
    auto local = [&](int t) { return t < m1.tiles ? t : t - m1.tiles; };
    // The pass of blocks b0 .. b0 + NF4_PASS - 1 of tile t (clamped to the
    // last block: a valid place, whose values are not used).
    auto load = [&](int t, int b0) {
        const nf4_matrix& m = matrix(t);
        const int lt = local(t);
        const unsigned int ra = min(16 * lt + g, m.rows - 1), rb = min(16 * lt + g + 8, m.rows - 1);
        nf4_pass p;
        #pragma unroll
        for (int h = 0; h < NF4_PASS; h++)
            p.b[h] = nf4_load_block<TILED>(m.codes, m.absmax_q, m.tile_codes, m.tile_aq, m.absmax2, ra, rb, blocks, lt, g, c, lane,
                                           min(b0 + h, blocks - 1));
        return p;
    };
    const int first = NF4_PASS * warp, stride = NF4_PASS * NF4_MMA_WARPS; // a warp's passes over a row
    nf4_pass cur = load(min((int)blockIdx.x, tiles - 1), first);
    nf4_mma_tables(pairs, dyn);
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const float offset = matrix(tile).offset;
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int b0 = first; b0 < blocks; b0 += stride) {
            // The next pass: on along this tile, else the next tile's first.
            const bool on = b0 + stride < blocks;
            const nf4_pass next = load(on ? tile : min(tile + (int)gridDim.x, tiles - 1), on ? b0 + stride : first);
            #pragma unroll
            for (int h = 0; h < NF4_PASS; h++) {
                if (b0 + h >= blocks) break; // the same for the whole warp
                uint4 xh[2];
                gemv_x16(x, g, T, in, 64 * (b0 + h) + 16 * c, xh);
                float sum[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                #pragma unroll
                for (int m = 0; m < 4; m++) { // bytes 2m and 2m + 1 of the lane's 8: weights 4m .. 4m + 3
                    const uint2 wa = cur.b[h].w[0], wb = cur.b[h].w[1];
                    const unsigned int w0 = m < 2 ? wa.x : wa.y, w1 = m < 2 ? wb.x : wb.y;
                    const int j = 2 * (m & 1);
                    const uint4 xq = xh[m / 2];
                    mma_bf16(sum, nf4_pair(pairs, lane4, w0, j), nf4_pair(pairs, lane4, w1, j), nf4_pair(pairs, lane4, w0, j + 1),
                             nf4_pair(pairs, lane4, w1, j + 1), m % 2 == 0 ? xq.x : xq.z, m % 2 == 0 ? xq.y : xq.w);
                }
                // The rows' scales, nf4_dequantize's: rows g and g + 8.
                const float s0 = nf4_scale(dyn[cur.b[h].q[0]], cur.b[h].a2[0], offset);
                const float s1 = nf4_scale(dyn[cur.b[h].q[1]], cur.b[h].a2[1], offset);
                acc[0] = fmaf(s0, sum[0], acc[0]);
                acc[1] = fmaf(s0, sum[1], acc[1]);
                acc[2] = fmaf(s1, sum[2], acc[2]);
                acc[3] = fmaf(s1, sum[3], acc[3]);
            }
            cur = next;
        }
        const nf4_matrix& m = matrix(tile);
        gemv_mma_store<NF4_MMA_WARPS>(acc, part, T, m.rows, m.rows, 0, m.out, local(tile));
        __syncthreads(); // part is read before the next tile writes it
    }
#endif
}

// kernels.Kernels finds a kernel by the name on its extern "C" line.
extern "C" __global__ void __launch_bounds__(NF4_MMA_WARPS * 32, NF4_MIN_BLOCKS) nf4_gemv_mma(
    const uint4* __restrict__ packed1, const unsigned char* __restrict__ absmax_q1, const float* __restrict__ absmax2_1, float offset1,
    int rows1, act_t* __restrict__ out1, const uint4* __restrict__ packed2, const unsigned char* __restrict__ absmax_q2,
    const float* __restrict__ absmax2_2, float offset2, int rows2, act_t* __restrict__ out2, const act_t* __restrict__ x, int T, int in) {
    const nf4_matrix m1 = {reinterpret_cast<const uint2*>(packed1), absmax_q1, absmax2_1, offset1, rows1, (rows1 + 15) / 16, out1, nullptr, nullptr};
    const nf4_matrix m2 = {reinterpret_cast<const uint2*>(packed2), absmax_q2, absmax2_2, offset2, rows2, (rows2 + 15) / 16, out2, nullptr, nullptr};
    nf4_gemv_mma_body<false>(m1, m2, x, T, in);
}

// nf4_gemv_mma reading each matrix's tile copy (tile_codes, tile_aq) and
// its second-level scales.
extern "C" __global__ void __launch_bounds__(NF4_MMA_WARPS * 32, NF4_MIN_BLOCKS) nf4_gemv_mma_tiled(
    const uint4* __restrict__ tile_codes1, const unsigned short* __restrict__ tile_aq1, const float* __restrict__ absmax2_1, float offset1,
    int rows1, act_t* __restrict__ out1, const uint4* __restrict__ tile_codes2, const unsigned short* __restrict__ tile_aq2,
    const float* __restrict__ absmax2_2, float offset2, int rows2, act_t* __restrict__ out2, const act_t* __restrict__ x, int T, int in) {
    const nf4_matrix m1 = {nullptr, nullptr, absmax2_1, offset1, rows1, (rows1 + 15) / 16, out1, tile_codes1, tile_aq1};
    const nf4_matrix m2 = {nullptr, nullptr, absmax2_2, offset2, rows2, (rows2 + 15) / 16, out2, tile_codes2, tile_aq2};
    nf4_gemv_mma_body<true>(m1, m2, x, T, in);
}

// nf4_tile_repack rewrites an NF4 weight [rows × in] (bitsandbytes'
// layout, in a multiple of 64) in the order decode_token reads it: per
// tile of 16 rows and per 64-block, lane l = (g, c)'s 16 bytes, the codes
// of rows g and g + 8 at positions 16c .. 16c + 15, so that a warp's load
// of a 64-block is 512 contiguous bytes (in bitsandbytes' layout it is 32
// bytes from each of 16 rows); and per tile and 64-block the absmax codes
// of rows g and g + 8 side by side. Rows past the last repeat the last
// row, as the reads clamp them. See trainer/gpu/NOTES.md, "the NF4 phase
// alone".
extern "C" __global__ void nf4_tile_repack(const uint2* __restrict__ codes, const unsigned char* __restrict__ absmax_q, int rows, int in,
                                           uint4* __restrict__ tile_codes, unsigned short* __restrict__ tile_aq) {
    const int blocks = in / 64, tiles = (rows + 15) / 16;
    GRID_STRIDE(i, (long long)tiles * blocks * 32) {
        const int lane = (int)(i % 32), g = lane >> 2, c = lane & 3;
        const long long tb = i / 32; // tile · blocks + 64-block
        const int b = (int)(tb % blocks), t = (int)(tb / blocks);
        const long long ra = min(16 * t + g, rows - 1), rb = min(16 * t + g + 8, rows - 1);
        const uint2 wa = codes[(ra * blocks + b) * 4 + c], wb = codes[(rb * blocks + b) * 4 + c];
        tile_codes[i] = make_uint4(wa.x, wa.y, wb.x, wb.y);
        if (c == 0) tile_aq[tb * 8 + g] = (unsigned short)(absmax_q[ra * blocks + b] | absmax_q[rb * blocks + b] << 8);
    }
}

// A stored tensor as activations (embedding, unquantised projections).
extern "C" __global__ void stored_to_act(const void* __restrict__ src, int dtype, long long n, act_t* __restrict__ out) {
    GRID_STRIDE(i, n) { out[i] = to_act(load_stored(src, dtype, i)); }
}

// A stored tensor as float32 (norm weights).
extern "C" __global__ void stored_to_f32(const void* __restrict__ src, int dtype, long long n, float* __restrict__ out) {
    GRID_STRIDE(i, n) { out[i] = load_stored(src, dtype, i); }
}

// Random weights N(0, std²) stored as bfloat16, from Philox words by the
// Box-Muller transform: for benchmarks and shape tests that need a model
// of a real size without a checkpoint on disk.
extern "C" __global__ void random_normal_bf16(unsigned short* __restrict__ out, long long n, unsigned int seed_lo,
                                              unsigned int seed_hi, unsigned int stream, float std) {
    GRID_STRIDE(g, (n + 3) / 4) {
        const uint4 w = random_words((unsigned long long)g, seed_lo, seed_hi, stream);
        const float u1 = ((w.x >> 8) + 1) * (1.0f / 16777216.0f), u2 = (w.y >> 8) * (1.0f / 16777216.0f);
        const float u3 = ((w.z >> 8) + 1) * (1.0f / 16777216.0f), u4 = (w.w >> 8) * (1.0f / 16777216.0f);
        const float r1 = sqrtf(-2.0f * logf(u1)), r2 = sqrtf(-2.0f * logf(u3));
        const float z[4] = {r1 * cosf(6.2831853f * u2), r1 * sinf(6.2831853f * u2), r2 * cosf(6.2831853f * u4), r2 * sinf(6.2831853f * u4)};
        #pragma unroll
        for (int k = 0; k < 4; k++) {
            const long long i = 4 * g + k;
            if (i < n) out[i] = f32_to_bf16(z[k] * std);
        }
    }
}
