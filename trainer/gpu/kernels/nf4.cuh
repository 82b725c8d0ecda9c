// NF4 helpers shared by the decoding products (nf4.cu's nf4_gemv_mma and
// token.cu's decode_token): a 64-block's loads and scale, and the
// shared-memory table that turns a byte of two codes into a tensor-core
// fragment's bfloat16 pair.
#pragma once
#include "gemma.cuh"

// A 64-block's scale from its absmax code's value, its 256-block's
// second-level scale and the offset, as the host computes it (no fused
// multiply-add).
__device__ __forceinline__ float nf4_scale(float code, float absmax2, float offset) {
    return __fadd_rn(__fmul_rn(code, absmax2), offset);
}

// nf4_mma_tables fills dyn with the absmax code and pairs with the
// bfloat16 values of each byte's two codes, the high nibble's in the low
// half (the first of two weights, as a fragment holds them), every entry
// repeated once per shared-memory bank: lane l reads the copy at
// byte·128 + 4l, in bank l, so a warp's 32 look-ups of any bytes are
// served at once. Threads write a row's 16-byte words in a rotated order,
// so that the threads of one store phase write different banks.
#define NF4_PAIR_COPIES 32
__device__ __forceinline__ void nf4_mma_tables(unsigned int* pairs, float* dyn) {
    for (int e = threadIdx.x; e < 256; e += blockDim.x) {
        dyn[e] = DYN_CODE[e];
        unsigned int v;
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(v) : "f"(NF4_CODE[e & 15]), "f"(NF4_CODE[e >> 4]));
        uint4* row = reinterpret_cast<uint4*>(pairs + e * NF4_PAIR_COPIES);
        #pragma unroll
        for (int i = 0; i < NF4_PAIR_COPIES / 4; i++) row[(i + e) % (NF4_PAIR_COPIES / 4)] = make_uint4(v, v, v, v);
    }
    __syncthreads();
}

// The pair of byte j (0..3) of word, from lane's copy (lane4 = 4·lane).
__device__ __forceinline__ unsigned int nf4_pair(const unsigned int* pairs, unsigned int lane4, unsigned int word, int j) {
    const unsigned int at = ((j == 0 ? word << 7 : word >> (8 * j - 7)) & 0x7f80u) | lane4; // bytes
    return *reinterpret_cast<const unsigned int*>(reinterpret_cast<const char*>(pairs) + at);
}

// A lane's 16 values of x (its positions of a 64-block) as the mma's
// bfloat16 pairs, the first of each pair in the low half.
__device__ __forceinline__ void nf4_x_pairs(const float* x, unsigned int (&xb)[8]) {
    #pragma unroll
    for (int e = 0; e < 8; e++) asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(xb[e]) : "f"(x[2 * e + 1]), "f"(x[2 * e]));
}

// The same from xs in shared memory, or zeros where !load: the loads
// predicated rather than branched around, so that the code around them
// can stay one basic block.
__device__ __forceinline__ void nf4_x_pairs_if(const float* xs, bool load, unsigned int (&xb)[8]) {
    const unsigned int at = (unsigned int)__cvta_generic_to_shared(xs);
    float f[16];
    #pragma unroll
    for (int k = 0; k < 4; k++) {
        f[4 * k] = f[4 * k + 1] = f[4 * k + 2] = f[4 * k + 3] = 0.0f;
        asm volatile("{\n\t.reg .pred p;\n\tsetp.ne.u32 p, %4, 0;\n\t@p ld.shared.v4.f32 {%0, %1, %2, %3}, [%5];\n\t}"
                     : "+f"(f[4 * k]), "+f"(f[4 * k + 1]), "+f"(f[4 * k + 2]), "+f"(f[4 * k + 3])
                     : "r"((unsigned int)load), "r"(at + 16u * k));
    }
    nf4_x_pairs(f, xb);
}

// One 64-block of the two rows a lane (g, c) of a 16-row tile reads: the
// rows' codes (the lane's 8 bytes of each), absmax codes and second-level
// scales. ra and rb are the tile's rows g and g + 8, clamped to the last
// row (a valid place, whose values are not used). TILED takes the codes and
// absmax codes from nf4_tile_repack's copy of tile t, one 16-byte and one
// 16-bit load a lane; otherwise from bitsandbytes' layout. The
// second-level scales come from the rows' blocks in both.
struct nf4_block {
    uint2 w[2];
    unsigned char q[2];
    float a2[2];
};

template <bool TILED>
__device__ __forceinline__ nf4_block nf4_load_block(const uint2* __restrict__ codes, const unsigned char* __restrict__ absmax_q,
                                                    const uint4* __restrict__ tile_codes, const unsigned short* __restrict__ tile_aq,
                                                    const float* __restrict__ absmax2, unsigned int ra, unsigned int rb, int blocks,
                                                    int t, int g, int c, int lane, unsigned int b) {
    nf4_block k; // 32-bit indices hold below 2²⁷ 64-blocks a matrix (8.6 G weights; Gemma 3 27B's largest has 1.8 M)
    const unsigned int ba = ra * blocks + b, bb = rb * blocks + b;
    if constexpr (TILED) {
        const unsigned int tb = (unsigned int)t * blocks + b;
        const uint4 v = tile_codes[tb * 32 + lane];
        const unsigned short q = tile_aq[tb * 8 + g];
        k.w[0] = make_uint2(v.x, v.y), k.w[1] = make_uint2(v.z, v.w);
        k.q[0] = (unsigned char)(q & 0xff), k.q[1] = (unsigned char)(q >> 8);
    } else {
        k.w[0] = codes[ba * 4 + c], k.w[1] = codes[bb * 4 + c];
        k.q[0] = absmax_q[ba], k.q[1] = absmax_q[bb];
    }
    k.a2[0] = absmax2[ba / 256], k.a2[1] = absmax2[bb / 256];
    return k;
}
