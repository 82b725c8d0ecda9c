// Weights: conversion of stored checkpoint tensors (bf16, f16, f32) and
// NF4 quantisation in bitsandbytes' layout. The first level of NF4 (each
// 64-block's absmax and the packed 4-bit codes) runs here; the double
// quantisation of the absmax values runs on the host
// (trainer.NewNF4Tensor), shared with the CPU backend.
// Reference: trainer.QuantizeNF4, trainer.NF4Tensor.Dequantize.
#include "gemma.cuh"
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
        const float am = __fadd_rn(__fmul_rn(DYN_CODE[absmax_q[b]], absmax2[b / 256]), offset);
        const unsigned char byte = packed[i / 2];
        const unsigned char q = (i & 1) ? (byte & 0xf) : (byte >> 4);
        out[i] = to_act(round_to(__fmul_rn(NF4_CODE[q], am), round_mode));
    }
}

// The same, sixteen weights a thread: 8 packed bytes in, one absmax, 32
// (bf16) or 64 (float32) bytes out. The codes sit in shared memory: threads
// of a warp reading different entries of a constant array are served one
// address at a time, which held the one-weight kernel above to an eighth
// of the memory bandwidth. (Thirty-two weights a thread measured slower.)
extern "C" __global__ void nf4_dequantize16(const uint2* __restrict__ packed, const unsigned char* __restrict__ absmax_q,
                                            const float* __restrict__ absmax2, float offset, long long groups, int round_mode,
                                            uint4* __restrict__ out) {
    __shared__ float code[16], dyn[256];
    for (int i = threadIdx.x; i < 256; i += blockDim.x) {
        dyn[i] = DYN_CODE[i];
        if (i < 16) code[i] = NF4_CODE[i];
    }
    __syncthreads();
    GRID_STRIDE(g, groups) {
        const long long b = g / 4; // four groups of sixteen to a 64-block
        const float am = __fadd_rn(__fmul_rn(dyn[absmax_q[b]], absmax2[b / 256]), offset);
        const uint2 w = packed[g];
        #pragma unroll
        for (int h = 0; h < 16 / VEC; h++) {
            act_vec o;
            #pragma unroll
            for (int e = 0; e < VEC; e += 2) {
                const int j = h * VEC / 2 + e / 2; // the byte
                const unsigned int byte = ((j < 4 ? w.x : w.y) >> (8 * (j % 4))) & 0xffu;
                o.a[e] = to_act(round_to(__fmul_rn(code[byte >> 4], am), round_mode));
                o.a[e + 1] = to_act(round_to(__fmul_rn(code[byte & 0xfu], am), round_mode));
            }
            out[g * (16 / VEC) + h] = o.u;
        }
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
