// Small kernels around the LoRA products: dropout on a projection's input
// (drawn and recorded in the forward pass, replayed in the backward pass) and the copy of the float32 LoRA weights into activations for the
// GEMMs. Reference: the dropout in trainer's linear and linearBackward.
#include "gemma.cuh"
#include "random.cuh"

// Dropout keeps element i of a stream when its 16 bits of the Philox
// words (trainer.Dropout) are at least threshold: one draw serves eight.
// The forward pass draws and records the choice, one bit an element (bit j
// of mask[b] for element 8b + j); the backward pass reads the bits instead
// of drawing again, for the same elements at a fraction of the work. Each
// thread takes the eight elements of one mask byte.

template <bool vec>
__device__ __forceinline__ void load8_act(const act_t* __restrict__ x, long long n, long long b, float* v) {
    if (vec) {
        #pragma unroll
        for (int h = 0; h < 8 / VEC; h++) {
            act_vec u;
            u.u = reinterpret_cast<const uint4*>(x)[b * (8 / VEC) + h];
            #pragma unroll
            for (int e = 0; e < VEC; e++) v[h * VEC + e] = to_f32(u.a[e]);
        }
        return;
    }
    #pragma unroll
    for (int j = 0; j < 8; j++) v[j] = 8 * b + j < n ? to_f32(x[8 * b + j]) : 0.0f;
}

template <bool vec>
__device__ __forceinline__ void store8_act(act_t* __restrict__ x, long long n, long long b, const float* v) {
    if (vec) {
        #pragma unroll
        for (int h = 0; h < 8 / VEC; h++) {
            act_vec u;
            #pragma unroll
            for (int e = 0; e < VEC; e++) u.a[e] = to_act(v[h * VEC + e]);
            reinterpret_cast<uint4*>(x)[b * (8 / VEC) + h] = u.u;
        }
        return;
    }
    #pragma unroll
    for (int j = 0; j < 8; j++)
        if (8 * b + j < n) x[8 * b + j] = to_act(v[j]);
}

// out = x·scale where kept, 0 elsewhere; mask records the choice. One mask
// byte a thread: its time is the draws, and two a thread measured slower.
template <bool vec>
__device__ void dropout_record_body(const act_t* __restrict__ x, act_t* __restrict__ out, unsigned char* __restrict__ mask,
                                          long long n, unsigned int seed_lo, unsigned int seed_hi, unsigned int stream,
                                          unsigned int threshold, float scale) {
    GRID_STRIDE(b, (n + 7) / 8) {
        const uint4 w = random_words((unsigned long long)b, seed_lo, seed_hi, stream);
        float v[8];
        load8_act<vec>(x, n, b, v);
        unsigned int bits = 0;
        #pragma unroll
        for (int j = 0; j < 8; j++) {
            const bool keep = ((word_of(w, j >> 1) >> (16 * (j & 1))) & 0xffffu) >= threshold;
            bits |= (unsigned int)keep << j;
            v[j] = keep ? __fmul_rn(v[j], scale) : 0.0f;
        }
        store8_act<vec>(out, n, b, v);
        mask[b] = (unsigned char)bits;
    }
}

// Replaying and adding: each thread takes two mask bytes an iteration, i
// and i + half (bs), and issues the loads of both before any work: twice
// the bytes in flight of one at a time (these kernels are bound by
// memory), every access still contiguous across a warp.

// The mask bytes of iteration i over bytes mask bytes (the second -1 past
// the end), their bits and the activations of x they cover.
template <bool vec>
__device__ __forceinline__ void load_mask_pair(const act_t* __restrict__ x, const unsigned char* __restrict__ mask, long long n,
                                               long long i, long long half, long long bytes, long long* bs, unsigned int* bits,
                                               float (*v)[8]) {
    bs[0] = i, bs[1] = i + half < bytes ? i + half : -1;
    #pragma unroll
    for (int h = 0; h < 2; h++) {
        bits[h] = 0;
        if (bs[h] < 0) continue;
        bits[h] = mask[bs[h]];
        load8_act<vec>(x, n, bs[h], v[h]);
    }
}

// out = x·scale where mask keeps, 0 elsewhere.
template <bool vec>
__device__ void dropout_replay_body(const act_t* __restrict__ x, act_t* __restrict__ out, const unsigned char* __restrict__ mask,
                                          long long n, float scale) {
    const long long bytes = (n + 7) / 8, half = (bytes + 1) / 2;
    GRID_STRIDE(i, half) {
        long long bs[2];
        unsigned int bits[2];
        float v[2][8];
        load_mask_pair<vec>(x, mask, n, i, half, bytes, bs, bits, v);
        #pragma unroll
        for (int h = 0; h < 2; h++) {
            if (bs[h] < 0) continue;
            #pragma unroll
            for (int j = 0; j < 8; j++) v[h][j] = (bits[h] >> j) & 1 ? __fmul_rn(v[h][j], scale) : 0.0f;
            store8_act<vec>(out, n, bs[h], v[h]);
        }
    }
}

// dst += src·scale where mask keeps: the gradient through dropout, added
// to a float32 gradient (product and sum rounded apart, as the host
// reference does).
template <bool vec>
__device__ void dropout_add_body(const act_t* __restrict__ src, float* __restrict__ dst, const unsigned char* __restrict__ mask,
                                       long long n, float scale) {
    const long long bytes = (n + 7) / 8, half = (bytes + 1) / 2;
    GRID_STRIDE(i, half) {
        long long bs[2];
        unsigned int bits[2];
        float v[2][8], d[2][8];
        load_mask_pair<vec>(src, mask, n, i, half, bytes, bs, bits, v);
        #pragma unroll
        for (int h = 0; h < 2; h++) {
            const long long b = bs[h];
            if (b < 0) continue;
            #pragma unroll
            for (int j = 0; j < 8; j++) d[h][j] = 0.0f;
            if (vec) {
                const float4* d4 = reinterpret_cast<const float4*>(dst) + 2 * b;
                const float4 lo = d4[0], hi = d4[1];
                d[h][0] = lo.x, d[h][1] = lo.y, d[h][2] = lo.z, d[h][3] = lo.w;
                d[h][4] = hi.x, d[h][5] = hi.y, d[h][6] = hi.z, d[h][7] = hi.w;
            } else {
                #pragma unroll
                for (int j = 0; j < 8; j++)
                    if (8 * b + j < n) d[h][j] = dst[8 * b + j];
            }
        }
        #pragma unroll
        for (int h = 0; h < 2; h++) {
            const long long b = bs[h];
            if (b < 0) continue;
            #pragma unroll
            for (int j = 0; j < 8; j++)
                if ((bits[h] >> j) & 1) d[h][j] = __fadd_rn(d[h][j], __fmul_rn(v[h][j], scale));
            if (vec) {
                float4* d4 = reinterpret_cast<float4*>(dst) + 2 * b;
                d4[0] = make_float4(d[h][0], d[h][1], d[h][2], d[h][3]);
                d4[1] = make_float4(d[h][4], d[h][5], d[h][6], d[h][7]);
                continue;
            }
            #pragma unroll
            for (int j = 0; j < 8; j++)
                if (8 * b + j < n && (bits[h] >> j) & 1) dst[8 * b + j] = d[h][j];
        }
    }
}

// Each kernel in two forms: _vec where the elements are whole 16-byte
// vectors (kernels.go decides), the plain one elsewhere.
#define RECORD_ARGS const act_t* __restrict__ x, act_t* __restrict__ out, unsigned char* __restrict__ mask, long long n, \
    unsigned int seed_lo, unsigned int seed_hi, unsigned int stream, unsigned int threshold, float scale
#define REPLAY_ARGS const act_t* __restrict__ x, act_t* __restrict__ out, const unsigned char* __restrict__ mask, long long n, float scale
#define ADD_ARGS const act_t* __restrict__ src, float* __restrict__ dst, const unsigned char* __restrict__ mask, long long n, float scale
extern "C" __global__ void dropout_record(RECORD_ARGS) { dropout_record_body<false>(x, out, mask, n, seed_lo, seed_hi, stream, threshold, scale); }
extern "C" __global__ void dropout_record_vec(RECORD_ARGS) { dropout_record_body<true>(x, out, mask, n, seed_lo, seed_hi, stream, threshold, scale); }
extern "C" __global__ void dropout_replay(REPLAY_ARGS) { dropout_replay_body<false>(x, out, mask, n, scale); }
extern "C" __global__ void dropout_replay_vec(REPLAY_ARGS) { dropout_replay_body<true>(x, out, mask, n, scale); }
extern "C" __global__ void dropout_add(ADD_ARGS) { dropout_add_body<false>(src, dst, mask, n, scale); }
extern "C" __global__ void dropout_add_vec(ADD_ARGS) { dropout_add_body<true>(src, dst, mask, n, scale); }

extern "C" __global__ void f32_to_act(const float* __restrict__ src, act_t* __restrict__ dst, long long n) {
    GRID_STRIDE(i, n) { dst[i] = to_act(src[i]); }
}

// src [rows × cols] float32 to activations whose rows lie ld apart in dst;
// _vec four values a thread (cols and ld multiples of 4, both pointers
// 16-byte aligned: kernels.go checks).
extern "C" __global__ void f32_to_act_rows(const float* __restrict__ src, act_t* __restrict__ dst, long long rows, int cols, int ld) {
    GRID_STRIDE(i, rows * cols) {
        const long long r = i / cols;
        dst[r * ld + (i - r * cols)] = to_act(src[i]);
    }
}
extern "C" __global__ void f32_to_act_rows_vec(const float* __restrict__ src, act_t* __restrict__ dst, long long rows, int cols, int ld) {
    const int fours = cols / 4;
    GRID_STRIDE(g, rows * fours) {
        const long long r = g / fours;
        const int c = (int)(g - r * fours) * 4;
        const float4 v = reinterpret_cast<const float4*>(src)[g];
        store_act4(dst + r * ld + c, v.x, v.y, v.z, v.w);
    }
}

// The columns a weight's LoRA update folds into (the gate and up pair's
// GEMM along K, kernels.FoldLoRAColumns): for each of the rows of w
// (activations, rows ld apart), columns col .. col + r - 1 take scale·b
// (b [rows × r], lora_B) and columns zero .. zero + r - 1 zeros.
extern "C" __global__ void lora_fold_columns(act_t* __restrict__ w, int rows, int ld, int col, int zero,
                                             const act_t* __restrict__ b, int r, float scale) {
    GRID_STRIDE(i, (long long)rows * r) {
        const long long row = i / r;
        const int j = (int)(i - row * r);
        w[row * ld + col + j] = to_act(__fmul_rn(to_f32(b[i]), scale));
        w[row * ld + zero + j] = to_act(0.0f);
    }
}

// dst [rows × cols] (rows dst_ld apart) = src [rows × cols] (rows src_ld
// apart), activations.
extern "C" __global__ void act_copy_rows(const act_t* __restrict__ src, int src_ld, act_t* __restrict__ dst, int dst_ld,
                                         long long rows, int cols) {
    GRID_STRIDE(i, rows * cols) {
        const long long row = i / cols;
        const int c = (int)(i - row * cols);
        dst[row * dst_ld + c] = src[row * src_ld + c];
    }
}

// act_copy_rows in 16-byte units (a row's bytes and both strides whole
// units): one load and one store a unit, the row found by a 32-bit
// division.
extern "C" __global__ void copy_rows16(const uint4* __restrict__ src, unsigned src_ld, uint4* __restrict__ dst, unsigned dst_ld,
                                       unsigned rows, unsigned cols) {
    const unsigned n = rows * cols;
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const unsigned row = i / cols, c = i - row * cols;
        dst[(size_t)row * dst_ld + c] = src[(size_t)row * src_ld + c];
    }
}

// dst[i] += src[i], float32.
extern "C" __global__ void add_f32(const float* __restrict__ src, float* __restrict__ dst, long long n) {
    GRID_STRIDE(i, n) { dst[i] += src[i]; }
}

// The backward pass's gradient through the LoRA products and dropout of
// up to three projections that read the same input (q, k and v; gate and
// up; o or down alone), in one pass over dx:
//
//   dx [T × n] (float32) += scale · mask_p ⊙ act(dxa_p · A_p), p = 0, 1, …
//
// or, with add 0, dx = that sum from zero, dx not read (the frozen
// products' part added after, by a GEMM's epilogue).
//
// with dxa_p [T × r] and lora_A A_p [r × n] activations and mask_p
// dropout_record's bits. It is the GEMM into activations followed by
// dropout_add, once per projection, with the same roundings and the same
// order of the sums, but dx is read and written once for the group and
// the products never leave registers (they are K = r small). Each block
// takes 128 rows × 64 columns, each warp 16 rows of them on tensor cores
// (m16n8k16); A_p's 64 columns wait in shared memory, transposed so that
// a fragment's pair of k is one 32-bit word. n is a multiple of 64 (a
// row's 64 columns are 8 whole mask bytes); r is even and at most 64.
#define LDG_PARTS 3 // kernels.LoRAGradParts
#define LDG_MAX_R 64
#define LDG_STRIDE (LDG_MAX_R + 8) // bf16 elements a row of sA: no bank conflicts
struct LoRADropoutPart {
    const bf16_t* dxa;
    const bf16_t* a;
    const unsigned char* mask;
};

extern "C" __global__ void __launch_bounds__(256, 2) lora_dropout_grad(const bf16_t* dxa0, const bf16_t* a0, const unsigned char* mask0, const bf16_t* dxa1, const bf16_t* a1,
                  const unsigned char* mask1, const bf16_t* dxa2, const bf16_t* a2, const unsigned char* mask2, int parts,
                  float* __restrict__ dx, int T, int n, int r, float scale, int add) {
#ifndef ACT_F32 // bfloat16 activations only (Kernels.FusesLoRADropoutGrad)
    __shared__ __align__(16) bf16_t sA[LDG_PARTS][64 * LDG_STRIDE];
    const LoRADropoutPart part[LDG_PARTS] = {{dxa0, a0, mask0}, {dxa1, a1, mask1}, {dxa2, a2, mask2}};
    const int col0 = blockIdx.x * 64, tid = threadIdx.x;
    const int kp = (r + 15) / 16 * 16; // r padded to whole k steps, with zeros
    const int warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
    const int row0 = blockIdx.y * 128 + warp * 16;
    const int rows[2] = {row0 + g, row0 + g + 8};
    // Every load of the block's inputs is issued before the first is
    // waited on (each round trip a block waits for costs bandwidth, at two
    // blocks an SM): this thread's dx (rows g and g + 8, columns 8j + 2c
    // and 8j + 2c + 1), its mask bytes, its 16-byte pieces of each A_p's
    // 64 columns (kp rows of 8 pieces: at most two a thread), and its
    // fragments of dxa_p.
    float d[8][4];
    #pragma unroll
    for (int h = 0; h < 2; h++) {
        #pragma unroll
        for (int j = 0; j < 8; j++) {
            float2 v = make_float2(0.0f, 0.0f);
            if (add && rows[h] < T) v = *reinterpret_cast<const float2*>(dx + (long long)rows[h] * n + col0 + 8 * j + 2 * c);
            d[j][2 * h] = v.x, d[j][2 * h + 1] = v.y;
        }
    }
    uint2 bits[LDG_PARTS][2];
    uint4 piece[LDG_PARTS][2];
    #pragma unroll
    for (int p = 0; p < LDG_PARTS; p++) {
        #pragma unroll
        for (int h = 0; h < 2; h++) {
            bits[p][h] = make_uint2(0, 0);
            if (p < parts && rows[h] < T)
                bits[p][h] = *reinterpret_cast<const uint2*>(part[p].mask + ((long long)rows[h] * n + col0) / 8);
            const int i = tid + h * 256, k = i / 8;
            piece[p][h] = make_uint4(0, 0, 0, 0);
            if (p < parts && k < r) piece[p][h] = *reinterpret_cast<const uint4*>(part[p].a + (long long)k * n + col0 + 8 * (i % 8));
        }
    }
    // dxa_p's fragments of the first two k steps (r ≤ 32 needs no more):
    // rows g and g + 8, k pairs 2c and 2c + 8 of the step.
    unsigned frag[LDG_PARTS][2][4];
    #pragma unroll
    for (int p = 0; p < LDG_PARTS; p++)
        #pragma unroll
        for (int ks = 0; ks < 2; ks++)
            #pragma unroll
            for (int q = 0; q < 4; q++) {
                const int row = rows[q & 1], k = 16 * ks + 2 * c + (q >> 1) * 8;
                frag[p][ks][q] = p < parts && row < T && k < r ? *reinterpret_cast<const unsigned*>(part[p].dxa + (long long)row * r + k) : 0u;
            }
    // A_p into shared memory, transposed.
    #pragma unroll
    for (int p = 0; p < LDG_PARTS; p++) {
        #pragma unroll
        for (int h = 0; h < 2; h++) {
            const int i = tid + h * 256, k = i / 8;
            if (p >= parts || k >= kp) continue;
            const unsigned int w[4] = {piece[p][h].x, piece[p][h].y, piece[p][h].z, piece[p][h].w};
            #pragma unroll
            for (int e = 0; e < 8; e++) sA[p][(8 * (i % 8) + e) * LDG_STRIDE + k] = (bf16_t)(w[e / 2] >> (16 * (e % 2)));
        }
    }
    __syncthreads();
    // p unrolled, so that part[p] and sA[p] are chosen at compile time.
    #pragma unroll
    for (int p = 0; p < LDG_PARTS; p++) {
        if (p == parts) break;
        float acc[8][4];
        #pragma unroll
        for (int j = 0; j < 8; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
        #pragma unroll
        for (int ks = 0; ks < LDG_MAX_R / 16; ks++) {
            const int k0 = 16 * ks;
            if (k0 >= kp) break;
            unsigned a[4];
            #pragma unroll
            for (int q = 0; q < 4; q++) {
                const int row = rows[q & 1], k = k0 + 2 * c + (q >> 1) * 8;
                if (ks < 2) a[q] = frag[p][ks][q];
                else a[q] = row < T && k < r ? *reinterpret_cast<const unsigned*>(part[p].dxa + (long long)row * r + k) : 0u;
            }
            #pragma unroll
            for (int j = 0; j < 8; j++) {
                const bf16_t* b = &sA[p][(8 * j + g) * LDG_STRIDE + k0 + 2 * c];
                mma_bf16(acc[j], a[0], a[1], a[2], a[3], *reinterpret_cast<const unsigned*>(b),
                         *reinterpret_cast<const unsigned*>(b + 8));
            }
        }
        #pragma unroll
        for (int j = 0; j < 8; j++)
            #pragma unroll
            for (int e = 0; e < 4; e++) {
                const uint2 w = bits[p][e >> 1];
                const unsigned int byte = ((j < 4 ? w.x : w.y) >> (8 * (j & 3))) & 0xffu;
                if ((byte >> (2 * c + (e & 1))) & 1u)
                    d[j][e] = __fadd_rn(d[j][e], __fmul_rn(to_f32(to_act(acc[j][e])), scale));
            }
    }
    #pragma unroll
    for (int h = 0; h < 2; h++) {
        if (rows[h] >= T) continue;
        #pragma unroll
        for (int j = 0; j < 8; j++)
            *reinterpret_cast<float2*>(dx + (long long)rows[h] * n + col0 + 8 * j + 2 * c) = make_float2(d[j][2 * h], d[j][2 * h + 1]);
    }
#endif
}
