// The optimizer over the adapter's flat float32 parameters, and the
// gradient norm. This module is compiled without fused multiply-adds, so
// that every update rounds exactly as trainer.AdamW.Update and
// trainer.AdamW8bit.Update do on the host: given the same gradients, both
// backends take bit-identical optimizer steps.
#include "gemma.cuh"

// torch.optim.AdamW; scalars as trainer.AdamWStep forms them. grad_scale
// is the clipping factor (1 without clipping).
extern "C" __global__ void adamw_step(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                                      float* __restrict__ v, long long n, float grad_scale, float one_minus_b1,
                                      float b2, float one_minus_b2, float decay, float step_size, float bc2_sqrt, float eps) {
    GRID_STRIDE(i, n) {
        const float gi = g[i] * grad_scale;
        float pi = p[i] * decay;
        const float mi = m[i] + one_minus_b1 * (gi - m[i]);
        const float vi = v[i] * b2 + one_minus_b2 * (gi * gi);
        const float denom = sqrtf(vi) / bc2_sqrt + eps;
        pi -= step_size * (mi / denom);
        p[i] = pi;
        m[i] = mi;
        v[i] = vi;
    }
}

// bitsandbytes' Adam element update (trainer.adam8Element).
__device__ __forceinline__ void adam8_element(float* p, float g, float* m, float* v, float b1, float one_minus_b1, float b2,
                                              float one_minus_b2, float step_size, float eps_scaled, float decay, int decays) {
    *v = *v * b2 + one_minus_b2 * g * g;
    *m = *m * b1 + one_minus_b1 * g;
    *p += step_size * (*m / (sqrtf(*v) + eps_scaled));
    if (decays) *p *= decay;
}

// 8-bit AdamW for parameters that keep float32 moments (fewer than 4096
// elements).
extern "C" __global__ void adam8_f32_step(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                                          float* __restrict__ v, long long n, float grad_scale, float b1, float one_minus_b1,
                                          float b2, float one_minus_b2, float step_size, float eps_scaled, float decay, int decays) {
    GRID_STRIDE(i, n) {
        float pi = p[i], mi = m[i], vi = v[i];
        adam8_element(&pi, g[i] * grad_scale, &mi, &vi, b1, one_minus_b1, b2, one_minus_b2, step_size, eps_scaled, decay, decays);
        p[i] = pi;
        m[i] = mi;
        v[i] = vi;
    }
}

// The index of the code value nearest x/absmax, ties to the lower index,
// moved one step when the first moment's sign would flip
// (trainer.QuantizeMoment).
__device__ __forceinline__ unsigned char quantize_moment(const float* code, float x, float absmax, bool is_signed) {
    if (absmax == 0.0f) {
        int z = 0;
        while (code[z] < 0.0f) z++;
        return (unsigned char)z;
    }
    const float r = x / absmax;
    int lo = 0, hi = 256; // first index with code >= r
    while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (code[mid] >= r) hi = mid; else lo = mid + 1;
    }
    int q;
    if (hi == 0) q = 0;
    else if (hi == 256) q = 255;
    else if (code[hi] - r < r - code[hi - 1]) q = hi;
    else q = hi - 1;
    if (is_signed && (signbit(code[q]) != 0) != (signbit(x) != 0)) q += x > 0.0f ? 1 : -1;
    return (unsigned char)q;
}

// Blockwise 8-bit AdamW: one thread block of 256 per state block. Block b
// covers elements [start[b], start[b] + len[b]) of the flat parameters and
// owns absmax1[b] and absmax2[b].
extern "C" __global__ void adam8_step(float* __restrict__ p, const float* __restrict__ g, unsigned char* __restrict__ q1,
                                      unsigned char* __restrict__ q2, float* __restrict__ absmax1, float* __restrict__ absmax2,
                                      const long long* __restrict__ start, const int* __restrict__ len, float grad_scale,
                                      float b1, float one_minus_b1, float b2, float one_minus_b2, float step_size,
                                      float eps_scaled, float decay, int decays) {
    // The codes in shared memory: a warp's different entries of a constant
    // array are read one address at a time (the search below reads eight).
    __shared__ float scratch[32], dyn[256], udyn[256];
    for (int t = threadIdx.x; t < 256; t += blockDim.x) dyn[t] = DYN_CODE[t], udyn[t] = UDYN_CODE[t];
    __syncthreads();
    const int b = blockIdx.x;
    const int j = threadIdx.x;
    const bool live = j < len[b];
    const long long i = start[b] + j;
    float m = 0.0f, v = 0.0f;
    if (live) {
        float pi = p[i];
        m = dyn[q1[i]] * absmax1[b];
        v = udyn[q2[i]] * absmax2[b];
        adam8_element(&pi, g[i] * grad_scale, &m, &v, b1, one_minus_b1, b2, one_minus_b2, step_size, eps_scaled, decay, decays);
        p[i] = pi;
    }
    const float max1 = block_max(fabsf(m), scratch);
    const float max2 = block_max(fabsf(v), scratch);
    if (j == 0) {
        absmax1[b] = max1;
        absmax2[b] = max2;
    }
    if (live) {
        q1[i] = quantize_moment(dyn, m, max1, true);
        q2[i] = quantize_moment(udyn, v, max2, false);
    }
}

// partial[block] = sum of g[i]² over the block's grid-stride share, in
// double; the grid size fixes the order, so the result is reproducible.
extern "C" __global__ void sq_norm_partial(const float* __restrict__ g, long long n, double* __restrict__ partial) {
    __shared__ double scratch[32];
    double s = 0.0;
    GRID_STRIDE(i, n) { s += (double)g[i] * (double)g[i]; }
    s = block_sum_double(s, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}
