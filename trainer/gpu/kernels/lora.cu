// Small kernels around the LoRA products: dropout on a projection's input
// (the same mask in the forward pass and, regenerated, in the backward
// pass) and the copy of the float32 LoRA weights into activations for the
// GEMMs. Reference: the dropout in trainer's linear and linearBackward.
#include "gemma.cuh"
#include "random.cuh"

// out[i] = x[i]·scale where element i of stream is kept. Element i
// is kept when the top 24 bits of its Philox word are at least threshold.
extern "C" __global__ void dropout_apply(const act_t* __restrict__ x, act_t* __restrict__ out, long long n,
                                         unsigned int seed_lo, unsigned int seed_hi, unsigned int stream,
                                         unsigned int threshold, float scale) {
    GRID_STRIDE(g, (n + 3) / 4) {
        const uint4 w = random_words((unsigned long long)g, seed_lo, seed_hi, stream);
        #pragma unroll
        for (int k = 0; k < 4; k++) {
            const long long i = 4 * g + k;
            if (i < n) out[i] = (word_of(w, k) >> 8) >= threshold ? to_act(__fmul_rn(to_f32(x[i]), scale)) : to_act(0.0f);
        }
    }
}

// dst[i] += src[i]·scale where element i of stream is kept: the gradient
// through dropout, added to a float32 gradient.
extern "C" __global__ void dropout_add(const act_t* __restrict__ src, float* __restrict__ dst, long long n,
                                       unsigned int seed_lo, unsigned int seed_hi, unsigned int stream,
                                       unsigned int threshold, float scale) {
    GRID_STRIDE(g, (n + 3) / 4) {
        const uint4 w = random_words((unsigned long long)g, seed_lo, seed_hi, stream);
        #pragma unroll
        for (int k = 0; k < 4; k++) {
            const long long i = 4 * g + k;
            // Product and sum rounded apart, as the host reference does.
            if (i < n && (word_of(w, k) >> 8) >= threshold) dst[i] = __fadd_rn(dst[i], __fmul_rn(to_f32(src[i]), scale));
        }
    }
}

extern "C" __global__ void dropout_apply_vec(const uint4* __restrict__ x, uint4* __restrict__ out, long long groups,
                                             unsigned int seed_lo, unsigned int seed_hi, unsigned int stream,
                                             unsigned int threshold, float scale) {
    GRID_STRIDE(g, groups) {
        act_vec v, o;
        v.u = x[g];
        #pragma unroll
        for (int h = 0; h < VEC / 4; h++) {
            const uint4 w = random_words((unsigned long long)(g * (VEC / 4) + h), seed_lo, seed_hi, stream);
            #pragma unroll
            for (int k = 0; k < 4; k++) {
                const int e = 4 * h + k;
                o.a[e] = (word_of(w, k) >> 8) >= threshold ? to_act(__fmul_rn(to_f32(v.a[e]), scale)) : to_act(0.0f);
            }
        }
        out[g] = o.u;
    }
}

extern "C" __global__ void dropout_add_vec(const uint4* __restrict__ src, float* __restrict__ dst, long long groups,
                                           unsigned int seed_lo, unsigned int seed_hi, unsigned int stream,
                                           unsigned int threshold, float scale) {
    GRID_STRIDE(g, groups) {
        act_vec v;
        v.u = src[g];
        float d[VEC];
        load_f32_vec(dst, g, d);
        #pragma unroll
        for (int h = 0; h < VEC / 4; h++) {
            const uint4 w = random_words((unsigned long long)(g * (VEC / 4) + h), seed_lo, seed_hi, stream);
            #pragma unroll
            for (int k = 0; k < 4; k++) {
                const int e = 4 * h + k;
                if ((word_of(w, k) >> 8) >= threshold) d[e] = __fadd_rn(d[e], __fmul_rn(to_f32(v.a[e]), scale));
            }
        }
        store_f32_vec(dst, g, d);
    }
}

extern "C" __global__ void f32_to_act(const float* __restrict__ src, act_t* __restrict__ dst, long long n) {
    GRID_STRIDE(i, n) { dst[i] = to_act(src[i]); }
}

// dst[i] += src[i], float32.
extern "C" __global__ void add_f32(const float* __restrict__ src, float* __restrict__ dst, long long n) {
    GRID_STRIDE(i, n) { dst[i] += src[i]; }
}
