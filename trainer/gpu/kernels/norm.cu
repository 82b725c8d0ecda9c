// Gemma's RMSNorm, y = x / sqrt(mean(x²) + eps) · (1 + w), and its
// backward pass for a frozen weight. One block per row; the block size is
// a multiple of 32. Reference: trainer.RMSNorm, trainer.RMSNormBackward.
//
// Each kernel has one body in two forms: over single elements (G = 1, any
// number of columns) and, named _vec, over 16-byte vectors of activations
// (G = VEC; whole vectors and aligned rows, as kernels.go checks). A
// thread takes G consecutive elements at a time and computes each as the
// other form does. Rows are `groups` groups of G long.
#include "gemma.cuh"

// G activations or floats at group g of p, as floats, and back.
template <int G>
__device__ __forceinline__ void load_act(const act_t* p, long long g, float* v) {
    if (G == 1) {
        v[0] = to_f32(p[g]);
        return;
    }
    act_vec u;
    u.u = reinterpret_cast<const uint4*>(p)[g];
    #pragma unroll
    for (int e = 0; e < G; e++) v[e] = to_f32(u.a[e]);
}

template <int G>
__device__ __forceinline__ void store_act(act_t* p, long long g, const float* v) {
    if (G == 1) {
        p[g] = to_act(v[0]);
        return;
    }
    act_vec u;
    #pragma unroll
    for (int e = 0; e < G; e++) u.a[e] = to_act(v[e]);
    reinterpret_cast<uint4*>(p)[g] = u.u;
}

template <int G>
__device__ __forceinline__ void load_f32(const float* p, long long g, float* v) {
    if (G == 1) {
        v[0] = p[g];
        return;
    }
    load_f32_vec(p, g, v);
}

template <int G>
__device__ __forceinline__ void store_f32(float* p, long long g, const float* v) {
    if (G == 1) {
        p[g] = v[0];
        return;
    }
    store_f32_vec(p, g, v);
}

// Row r: out = norm(x) or, with res, res + norm(x), rounded to an
// activation once; rstd[r] = 1/sqrt(mean(x²) + eps). Each thread writes
// out at the groups it reads, so a row written here can be read back by
// the same block without a barrier.
template <int G>
__device__ __forceinline__ void rms_norm_row(const act_t* x, const float* w, const act_t* res, act_t* out, float* rstd,
                                             int r, int groups, float eps, float* scratch) {
    const long long base = (long long)r * groups;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < groups; j += blockDim.x) {
        float v[G];
        load_act<G>(x, base + j, v);
        #pragma unroll
        for (int e = 0; e < G; e++) ss += v[e] * v[e];
    }
    ss = block_sum(ss, scratch);
    const float inv = 1.0f / sqrtf(ss / (float)(groups * G) + eps);
    if (threadIdx.x == 0) rstd[r] = inv;
    for (int j = threadIdx.x; j < groups; j += blockDim.x) {
        float v[G], rv[G], wv[G];
        load_act<G>(x, base + j, v);
        if (res != nullptr) load_act<G>(res, base + j, rv);
        load_f32<G>(w, j, wv);
        #pragma unroll
        for (int e = 0; e < G; e++) {
            v[e] = v[e] * inv * (1.0f + wv[e]);
            if (res != nullptr) v[e] += rv[e];
        }
        store_act<G>(out, base + j, v);
    }
}

#define FWD_ARGS const act_t* x, const float* w, const act_t* res, act_t* out, float* rstd, int rows, int groups, float eps
extern "C" __global__ void rms_norm_fwd(FWD_ARGS) {
    __shared__ float scratch[32];
    if (blockIdx.x < rows) rms_norm_row<1>(x, w, res, out, rstd, blockIdx.x, groups, eps, scratch);
}
extern "C" __global__ void rms_norm_fwd_vec(FWD_ARGS) {
    __shared__ float scratch[32];
    if (blockIdx.x < rows) rms_norm_row<VEC>(x, w, res, out, rstd, blockIdx.x, groups, eps, scratch);
}

// Two norms in a row, as a Gemma block has them between attention and the
// MLP: mid = res + norm(x)·(1 + w1), then out = norm(mid)·(1 + w2), from
// mid as stored. One launch, and mid read back from cache.
extern "C" __global__ void rms_norm_pair_vec(const act_t* x, const float* w1, const act_t* res, act_t* mid, float* rstd1,
                                             const float* w2, act_t* out, float* rstd2, int rows, int groups, float eps) {
    __shared__ float scratch[32];
    if (blockIdx.x >= rows) return;
    rms_norm_row<VEC>(x, w1, res, mid, rstd1, blockIdx.x, groups, eps, scratch);
    rms_norm_row<VEC>(mid, w2, nullptr, out, rstd2, blockIdx.x, groups, eps, scratch);
}

// The gradient of norm(x) given dy, for row r:
//   g = dy·(1 + w),  dx = rstd·g − rstd³·mean(g·x)·x.
// grad_coef returns rstd³·mean(g·x) of the block's row.
template <int G>
__device__ __forceinline__ float grad_coef(const float* dy, const act_t* x, const float* w, float rs, long long base,
                                           int groups, float* scratch) {
    float gx = 0.0f;
    for (int j = threadIdx.x; j < groups; j += blockDim.x) {
        float d[G], v[G], wv[G];
        load_f32<G>(dy, base + j, d);
        load_act<G>(x, base + j, v);
        load_f32<G>(w, j, wv);
        #pragma unroll
        for (int e = 0; e < G; e++) gx += d[e] * (1.0f + wv[e]) * v[e];
    }
    gx = block_sum(gx, scratch);
    return rs * rs * rs * gx / (float)(groups * G);
}

// The row's dx before any residual: rs·dy·(1 + w) − c·x, group j.
template <int G>
__device__ __forceinline__ void norm_grad(const float* dy, const act_t* x, const float* w, float rs, float c, long long base,
                                          int j, float* d) {
    float v[G], wv[G];
    load_f32<G>(dy, base + j, d);
    load_act<G>(x, base + j, v);
    load_f32<G>(w, j, wv);
    #pragma unroll
    for (int e = 0; e < G; e++) d[e] = rs * d[e] * (1.0f + wv[e]) - c * v[e];
}

// dx as activations (it feeds a GEMM).
template <int G>
__device__ __forceinline__ void rms_norm_bwd_act_body(const float* dy, const act_t* x, const float* w, const float* rstd,
                                                      act_t* dx, int rows, int groups) {
    __shared__ float scratch[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const long long base = (long long)r * groups;
    const float rs = rstd[r];
    const float c = grad_coef<G>(dy, x, w, rs, base, groups, scratch);
    for (int j = threadIdx.x; j < groups; j += blockDim.x) {
        float d[G];
        norm_grad<G>(dy, x, w, rs, c, base, j, d);
        store_act<G>(dx, base + j, d);
    }
}

// dx = res + the gradient, in float32 (res may be null, and dx may be res
// itself: each element is read before it is written by the same thread).
template <int G>
__device__ __forceinline__ void rms_norm_bwd_f32_body(const float* dy, const act_t* x, const float* w, const float* rstd,
                                                      const float* res, float* dx, int rows, int groups) {
    __shared__ float scratch[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const long long base = (long long)r * groups;
    const float rs = rstd[r];
    const float c = grad_coef<G>(dy, x, w, rs, base, groups, scratch);
    for (int j = threadIdx.x; j < groups; j += blockDim.x) {
        float d[G], rv[G];
        norm_grad<G>(dy, x, w, rs, c, base, j, d);
        if (res != nullptr) {
            load_f32<G>(res, base + j, rv);
            #pragma unroll
            for (int e = 0; e < G; e++) d[e] += rv[e];
        }
        store_f32<G>(dx, base + j, d);
    }
}

#define BWD_ACT_ARGS const float* dy, const act_t* x, const float* w, const float* rstd, act_t* dx, int rows, int groups
#define BWD_F32_ARGS const float* dy, const act_t* x, const float* w, const float* rstd, const float* res, float* dx, int rows, int groups
extern "C" __global__ void rms_norm_bwd_act(BWD_ACT_ARGS) { rms_norm_bwd_act_body<1>(dy, x, w, rstd, dx, rows, groups); }
extern "C" __global__ void rms_norm_bwd_act_vec(BWD_ACT_ARGS) { rms_norm_bwd_act_body<VEC>(dy, x, w, rstd, dx, rows, groups); }
extern "C" __global__ void rms_norm_bwd_f32(BWD_F32_ARGS) { rms_norm_bwd_f32_body<1>(dy, x, w, rstd, res, dx, rows, groups); }
extern "C" __global__ void rms_norm_bwd_f32_vec(BWD_F32_ARGS) { rms_norm_bwd_f32_body<VEC>(dy, x, w, rstd, res, dx, rows, groups); }
