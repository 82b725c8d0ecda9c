// Types and helpers shared by the Gemma 3 kernels. act_t is the type of
// activations and of the weights the GEMMs read: bfloat16, or float32 when
// the module is compiled with -DACT_F32 (the backend's fp32 test mode). All
// arithmetic is float32; act_t is only what is stored.
#pragma once
#include "common.cuh"
#include "tables.cuh"

// No system headers at run-time compile: infinity by its bits.
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

#ifdef ACT_F32
typedef float act_t;
__device__ __forceinline__ float to_f32(act_t v) { return v; }
__device__ __forceinline__ act_t to_act(float v) { return v; }
#else
typedef bf16_t act_t;
__device__ __forceinline__ float to_f32(act_t v) { return bf16_to_f32(v); }
// The hardware's conversion: the rounding of f32_to_bf16 (to nearest, ties
// to even) for every number, in one instruction where f32_to_bf16 takes
// six; a NaN stays a NaN, with the hardware's payload.
__device__ __forceinline__ act_t to_act(float v) {
    act_t h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
}
#endif

// VEC activations fill 16 bytes, the widest load. The _vec kernels move
// whole vectors (the launcher checks the count and the alignment) and
// compute each element as their one-element twins do.
#define VEC (16 / (int)sizeof(act_t))
union act_vec {
    uint4 u;
    act_t a[VEC];
};

// Four activations in one load (8 bytes in bf16, 16 in float32).
struct __align__(4 * sizeof(act_t)) act4 {
    act_t v[4];
};

// The four activations at p (aligned to four) as floats, in one load.
__device__ __forceinline__ void load_act4(const act_t* p, float* v) {
    const act4 a = *reinterpret_cast<const act4*>(p);
    #pragma unroll
    for (int e = 0; e < 4; e++) v[e] = to_f32(a.v[e]);
}

// The four floats at p (16-byte aligned), in one load.
__device__ __forceinline__ void load_f32x4(const float* p, float* v) {
    const float4 f = *reinterpret_cast<const float4*>(p);
    v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
}

// Four floats stored as activations at p (aligned to four activations) in
// one store, rounded as to_act rounds: the compiler split a store of an
// act4 filled element by element into four two-byte stores.
__device__ __forceinline__ void store_act4(act_t* p, float a, float b, float c, float d) {
#ifdef ACT_F32
    *reinterpret_cast<float4*>(p) = make_float4(a, b, c, d);
#else
    unsigned int lo, hi; // the first of each pair in the low half
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(lo) : "f"(b), "f"(a));
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(hi) : "f"(d), "f"(c));
    // One 8-byte store: through a uint2 the compiler still chose two
    // 4-byte stores where the halves did not land in a register pair.
    asm volatile("st.global.v2.u32 [%0], {%1, %2};" ::"l"(__cvta_generic_to_global(p)), "r"(lo), "r"(hi) : "memory");
#endif
}

// The VEC floats at p[VEC·g ...], as VEC/4 16-byte loads.
__device__ __forceinline__ void load_f32_vec(const float* __restrict__ p, long long g, float* v) {
    #pragma unroll
    for (int h = 0; h < VEC / 4; h++) {
        const float4 f = reinterpret_cast<const float4*>(p)[g * (VEC / 4) + h];
        v[4 * h] = f.x, v[4 * h + 1] = f.y, v[4 * h + 2] = f.z, v[4 * h + 3] = f.w;
    }
}

__device__ __forceinline__ void store_f32_vec(float* __restrict__ p, long long g, const float* v) {
    #pragma unroll
    for (int h = 0; h < VEC / 4; h++)
        reinterpret_cast<float4*>(p)[g * (VEC / 4) + h] = make_float4(v[4 * h], v[4 * h + 1], v[4 * h + 2], v[4 * h + 3]);
}

// Rounding to a checkpoint's dtype (the values NF4 dequantises to are
// rounded to the weights' own dtype, as bitsandbytes returns them).
enum { ROUND_NONE = 0, ROUND_BF16 = 1, ROUND_F16 = 2 };

__device__ __forceinline__ float f16_bits_to_f32(unsigned short h) {
    unsigned int sign = (unsigned int)(h >> 15) << 31;
    unsigned int exp = (h >> 10) & 0x1f;
    unsigned int man = h & 0x3ff;
    if (exp == 0x1f) return __uint_as_float(sign | 0x7f800000u | (man << 13));
    if (exp == 0) {
        float v = (float)man * (1.0f / 16777216.0f);
        return sign ? -v : v;
    }
    return __uint_as_float(sign | ((exp + 112) << 23) | (man << 13));
}

// Round to the nearest IEEE half, ties to even (as trainer/safetensors
// does on the host).
__device__ __forceinline__ unsigned short f32_to_f16_bits(float f) {
    unsigned int u = __float_as_uint(f);
    unsigned short sign = (unsigned short)((u >> 16) & 0x8000);
    unsigned int a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00;
    if (a >= 0x477ff000u) return sign | 0x7c00;
    if (a < 0x38800000u) {
        double v = (double)__uint_as_float(a) * 16777216.0;
        return sign | (unsigned short)rint(v);
    }
    a += 0xc8000000u;
    a += 0xfffu + ((a >> 13) & 1u);
    return sign | (unsigned short)(a >> 13);
}

__device__ __forceinline__ float round_to(float v, int mode) {
    if (mode == ROUND_BF16) return bf16_to_f32(f32_to_bf16(v));
    if (mode == ROUND_F16) return f16_bits_to_f32(f32_to_f16_bits(v));
    return v;
}

// Stored checkpoint dtypes, as the host passes them.
enum { DTYPE_BF16 = 0, DTYPE_F16 = 1, DTYPE_F32 = 2 };

__device__ __forceinline__ float load_stored(const void* p, int dtype, long long i) {
    if (dtype == DTYPE_BF16) return bf16_to_f32(((const unsigned short*)p)[i]);
    if (dtype == DTYPE_F16) return f16_bits_to_f32(((const unsigned short*)p)[i]);
    return ((const float*)p)[i];
}

__device__ __forceinline__ float warp_max(float v) {
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}

// Max over a block whose size is a multiple of 32; every thread gets it.
__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    const int warps = blockDim.x >> 5;
    v = lane < warps ? scratch[lane] : -INFINITY;
    return warp_max(v);
}

__device__ __forceinline__ double warp_sum_double(double v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

// Sum over a block in double, in an order fixed by the block size.
__device__ __forceinline__ double block_sum_double(double v, double* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    v = warp_sum_double(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    const int warps = blockDim.x >> 5;
    v = lane < warps ? scratch[lane] : 0.0;
    return warp_sum_double(v);
}

// c += a·b for one 16×8 tile: a is 16×16 (row-major fragments), b 16×8.
__device__ __forceinline__ void mma_bf16(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// The end of a decoding product split over the warps of a block (nf4.cu,
// decode.cu): each warp's 16 × 8 accumulator fragment (rows g and g + 8,
// tokens 2c and 2c + 1 of tile's 16 rows) meets the others' in part,
// in a fixed order, and the first warp writes out [T × rows]; or, for
// rows that stack several matrices of part_rows rows each, matrix m's
// [T × part_rows] at out + m·part_stride.
template <int WARPS>
__device__ __forceinline__ void gemv_mma_store(const float* acc, float (*part)[32][4], int T, int rows, int part_rows,
                                               long long part_stride, act_t* __restrict__ out, int tile) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    #pragma unroll
    for (int e = 0; e < 4; e++) part[warp][lane][e] = acc[e];
    __syncthreads();
    if (warp != 0) return;
    const int g = lane >> 2, c = lane & 3;
    #pragma unroll
    for (int e = 0; e < 4; e++) {
        float sum = 0.0f;
        for (int w = 0; w < WARPS; w++) sum += part[w][lane][e];
        const int row = tile * 16 + g + (e >= 2 ? 8 : 0), t = 2 * c + (e & 1);
        if (row < rows && t < T) out[row / part_rows * part_stride + (long long)t * part_rows + row % part_rows] = to_act(sum);
    }
}

// gelu_tanh(x) = 0.5x(1 + tanh z), z = sqrt(2/π)(x + 0.044715x³), computed
// as x·σ(2z): the same function without the cancellation in 1 + tanh z
// for negative x. gelu_parts returns σ(2z) and dz/dx.
__device__ __forceinline__ void gelu_parts(float x, float* s, float* dz) {
    const float k = 0.7978845608028654f;
    const float c = 0.044715f;
    const float z = k * (x + c * x * x * x);
    *s = 1.0f / (1.0f + expf(-2.0f * z));
    *dz = k * (1.0f + 3.0f * c * x * x);
}

// Whether this block is the last of total blocks to arrive at counter,
// for every thread of the block (flag: an int of shared memory). The last
// sets the counter back to zero for its next use, and sees what every
// other block wrote before arriving.
__device__ __forceinline__ bool last_block(unsigned int* counter, unsigned int total, int* flag) {
    __threadfence(); // what this block wrote, visible before the count says so
    __syncthreads();
    if (threadIdx.x == 0) {
        const bool last = atomicAdd(counter, 1u) == total - 1;
        if (last) *counter = 0;
        *flag = last;
    }
    __syncthreads();
    const bool last = *flag;
    if (last) __threadfence();
    return last;
}

// A decoding attention's split records (flash-decoding: each split of
// the keys an unnormalised output row of hd values, its largest score and
// its sum of weights, hd + 2 floats) joined into out's row, each rescaled
// to the largest score of all: Σ e^(m_s − m)·o_s / Σ e^(m_s − m)·l_s. The
// records were written by other blocks of the launch: read past the L1
// cache.
__device__ __forceinline__ void decode_combine(const float* rec, int splits, int hd, act_t* __restrict__ out) {
    const int stride = hd + 2;
    // The first AHEAD splits' scores, sums and this thread's first
    // output value are loaded at once, before any is used: one round trip
    // to the L2 cache where a short context has only these. Later splits
    // are read as they come. The sums keep their order.
    constexpr int AHEAD = 8;
    const int d0 = threadIdx.x;
    float ms[AHEAD], ls[AHEAD], first[AHEAD];
    #pragma unroll
    for (int s = 0; s < AHEAD; s++) {
        const bool in = s < splits;
        ms[s] = in ? __ldcg(&rec[s * stride + hd]) : -INFINITY;
        ls[s] = in ? __ldcg(&rec[s * stride + hd + 1]) : 0.0f;
        first[s] = in && d0 < hd ? __ldcg(&rec[s * stride + d0]) : 0.0f;
    }
    float m = -INFINITY;
    #pragma unroll
    for (int s = 0; s < AHEAD; s++) m = fmaxf(m, ms[s]);
    for (int s = AHEAD; s < splits; s++) m = fmaxf(m, __ldcg(&rec[s * stride + hd]));
    float ws[AHEAD]; // the first splits' weights, e^(m_s − m), zero where a split had no keys
    float l = 0.0f;
    #pragma unroll
    for (int s = 0; s < AHEAD; s++) {
        ws[s] = ms[s] > -INFINITY ? expf(ms[s] - m) : 0.0f;
        if (ms[s] > -INFINITY) l += ls[s] * ws[s];
    }
    for (int s = AHEAD; s < splits; s++) {
        const float m_s = __ldcg(&rec[s * stride + hd]);
        if (m_s > -INFINITY) l += __ldcg(&rec[s * stride + hd + 1]) * expf(m_s - m);
    }
    for (int d = d0; d < hd; d += blockDim.x) {
        float acc = 0.0f;
        #pragma unroll
        for (int s = 0; s < AHEAD; s++) {
            if (ms[s] > -INFINITY) acc += (d == d0 ? first[s] : __ldcg(&rec[s * stride + d])) * ws[s];
        }
        for (int s = AHEAD; s < splits; s++) {
            const float m_s = __ldcg(&rec[s * stride + hd]);
            if (m_s > -INFINITY) acc += __ldcg(&rec[s * stride + d]) * expf(m_s - m);
        }
        out[d] = to_act(acc / l);
    }
}

#define GRID_STRIDE(i, n) \
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (n); i += (long long)gridDim.x * blockDim.x)
