// Philox4x32-10, the counter-based generator of trainer/philox.go: the same
// counter and key give the same words on the host and here, so the CPU and
// GPU backends drop the same dropout elements.
#pragma once

__device__ __forceinline__ uint4 philox4x32(uint4 c, unsigned int k0, unsigned int k1) {
    #pragma unroll
    for (int r = 0; r < 10; r++) {
        if (r > 0) {
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        const unsigned int lo0 = 0xD2511F53u * c.x, hi0 = __umulhi(0xD2511F53u, c.x);
        const unsigned int lo1 = 0xCD9E8D57u * c.z, hi1 = __umulhi(0xCD9E8D57u, c.z);
        c = make_uint4(hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0);
    }
    return c;
}

// The four random words of element group g (elements 4g .. 4g+3) of
// stream (seed, stream), as trainer.RandomBits numbers them.
__device__ __forceinline__ uint4 random_words(unsigned long long g, unsigned int seed_lo, unsigned int seed_hi, unsigned int stream) {
    return philox4x32(make_uint4((unsigned int)g, (unsigned int)(g >> 32), stream, 0u), seed_lo, seed_hi);
}

__device__ __forceinline__ unsigned int word_of(uint4 w, int k) {
    return k == 0 ? w.x : k == 1 ? w.y : k == 2 ? w.z : w.w;
}
