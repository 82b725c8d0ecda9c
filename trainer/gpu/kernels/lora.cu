// Small kernels around the LoRA products: dropout on a projection's input
// (drawn and recorded in the forward pass, replayed in the backward pass) and the copy of the float32 LoRA weights into activations for the
// GEMMs. Reference: the dropout in trainer's linear and linearBackward.
#include "gemma.cuh"
#include "random.cuh"

// Dropout keeps element i of a stream when the top 24 bits of its Philox
// word are at least threshold. The forward pass draws and records the
// choice, one bit an element (bit j of mask[b] for element 8b + j); the
// backward pass reads the bits instead of drawing again, for the same
// elements at a fraction of the work. Each thread takes the eight elements
// of one mask byte.

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
        const uint4 w0 = random_words((unsigned long long)(2 * b), seed_lo, seed_hi, stream);
        const uint4 w1 = random_words((unsigned long long)(2 * b + 1), seed_lo, seed_hi, stream);
        float v[8];
        load8_act<vec>(x, n, b, v);
        unsigned int bits = 0;
        #pragma unroll
        for (int j = 0; j < 8; j++) {
            const bool keep = (word_of(j < 4 ? w0 : w1, j & 3) >> 8) >= threshold;
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

// dst[i] += src[i], float32.
extern "C" __global__ void add_f32(const float* __restrict__ src, float* __restrict__ dst, long long n) {
    GRID_STRIDE(i, n) { dst[i] += src[i]; }
}
