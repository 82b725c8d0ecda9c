// Gemma's RMSNorm, y = x / sqrt(mean(x²) + eps) · (1 + w), and its
// backward pass for a frozen weight. One block per row; the block size is
// a multiple of 32. Reference: trainer.RMSNorm, trainer.RMSNormBackward.
#include "gemma.cuh"

// out = norm(x) or, with res, res + norm(x), rounded to an activation once.
// rstd receives each row's 1/sqrt(mean(x²) + eps).
extern "C" __global__ void rms_norm_fwd(const act_t* __restrict__ x, const float* __restrict__ w, const act_t* res,
                                        act_t* out, float* __restrict__ rstd, int rows, int cols, float eps) {
    __shared__ float scratch[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const long long base = (long long)r * cols;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
        const float v = to_f32(x[base + j]);
        ss += v * v;
    }
    ss = block_sum(ss, scratch);
    const float inv = 1.0f / sqrtf(ss / (float)cols + eps);
    if (threadIdx.x == 0) rstd[r] = inv;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
        float y = to_f32(x[base + j]) * inv * (1.0f + w[j]);
        if (res != nullptr) y += to_f32(res[base + j]);
        out[base + j] = to_act(y);
    }
}

// rms_norm_fwd's row r over whole vectors (cols = VEC·vecs), by the whole
// block. Each thread writes out at the vectors it reads, so a row written
// here can be read back by the same block without a barrier.
__device__ __forceinline__ void rms_norm_row_vec(const uint4* x, const float* w, const uint4* res, uint4* out, float* rstd,
                                                 int r, int vecs, float eps, float* scratch) {
    const long long base = (long long)r * vecs;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < vecs; j += blockDim.x) {
        act_vec v;
        v.u = x[base + j];
        #pragma unroll
        for (int e = 0; e < VEC; e++) ss += to_f32(v.a[e]) * to_f32(v.a[e]);
    }
    ss = block_sum(ss, scratch);
    const float inv = 1.0f / sqrtf(ss / (float)(vecs * VEC) + eps);
    if (threadIdx.x == 0) rstd[r] = inv;
    for (int j = threadIdx.x; j < vecs; j += blockDim.x) {
        act_vec v, rv, o;
        v.u = x[base + j];
        if (res != nullptr) rv.u = res[base + j];
        float wv[VEC];
        load_f32_vec(w, j, wv);
        #pragma unroll
        for (int e = 0; e < VEC; e++) {
            float y = to_f32(v.a[e]) * inv * (1.0f + wv[e]);
            if (res != nullptr) y += to_f32(rv.a[e]);
            o.a[e] = to_act(y);
        }
        out[base + j] = o.u;
    }
}

extern "C" __global__ void rms_norm_fwd_vec(const uint4* x, const float* w, const uint4* res, uint4* out, float* rstd,
                                            int rows, int vecs, float eps) {
    __shared__ float scratch[32];
    if (blockIdx.x < rows) rms_norm_row_vec(x, w, res, out, rstd, blockIdx.x, vecs, eps, scratch);
}

// Two norms in a row, as a Gemma block has them between attention and the
// MLP: mid = res + norm(x)·(1 + w1), then out = norm(mid)·(1 + w2), from
// mid as stored. One launch, and mid read back from cache.
extern "C" __global__ void rms_norm_pair_vec(const uint4* x, const float* w1, const uint4* res, uint4* mid, float* rstd1,
                                             const float* w2, uint4* out, float* rstd2, int rows, int vecs, float eps) {
    __shared__ float scratch[32];
    if (blockIdx.x >= rows) return;
    rms_norm_row_vec(x, w1, res, mid, rstd1, blockIdx.x, vecs, eps, scratch);
    rms_norm_row_vec(mid, w2, nullptr, out, rstd2, blockIdx.x, vecs, eps, scratch);
}

// The gradient of norm(x) given dy, for row r:
//   g = dy·(1 + w),  dx = rstd·g − rstd³·mean(g·x)·x.
// grad_coef returns rstd³·mean(g·x) of the block's row.
__device__ __forceinline__ float grad_coef(const float* dy, const act_t* x, const float* w, float rs, long long base,
                                           int cols, float* scratch) {
    float gx = 0.0f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) gx += dy[base + j] * (1.0f + w[j]) * to_f32(x[base + j]);
    gx = block_sum(gx, scratch);
    return rs * rs * rs * gx / (float)cols;
}

// rms_norm_bwd_act writes dx as activations (it feeds a GEMM).
extern "C" __global__ void rms_norm_bwd_act(const float* __restrict__ dy, const act_t* __restrict__ x, const float* __restrict__ w,
                                            const float* __restrict__ rstd, act_t* __restrict__ dx, int rows, int cols) {
    __shared__ float scratch[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const long long base = (long long)r * cols;
    const float rs = rstd[r];
    const float c = grad_coef(dy, x, w, rs, base, cols, scratch);
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
        dx[base + j] = to_act(rs * dy[base + j] * (1.0f + w[j]) - c * to_f32(x[base + j]));
    }
}

// rms_norm_bwd_f32 writes dx = res + gradient in float32 (res may be null,
// and dx may be res itself: each element is read before it is written by
// the same thread).
extern "C" __global__ void rms_norm_bwd_f32(const float* dy, const act_t* __restrict__ x, const float* __restrict__ w,
                                            const float* __restrict__ rstd, const float* res, float* dx, int rows, int cols) {
    __shared__ float scratch[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const long long base = (long long)r * cols;
    const float rs = rstd[r];
    const float c = grad_coef(dy, x, w, rs, base, cols, scratch);
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
        float v = rs * dy[base + j] * (1.0f + w[j]) - c * to_f32(x[base + j]);
        if (res != nullptr) v += res[base + j];
        dx[base + j] = v;
    }
}

// The backward kernels over rows of whole vectors (cols = VEC·vecs).
__device__ __forceinline__ float grad_coef_vec(const float* dy, const uint4* x, const float* w, float rs, long long base,
                                               int vecs, float* scratch) {
    float gx = 0.0f;
    for (int j = threadIdx.x; j < vecs; j += blockDim.x) {
        act_vec v;
        v.u = x[base + j];
        float d[VEC], wv[VEC];
        load_f32_vec(dy, base + j, d);
        load_f32_vec(w, j, wv);
        #pragma unroll
        for (int e = 0; e < VEC; e++) gx += d[e] * (1.0f + wv[e]) * to_f32(v.a[e]);
    }
    gx = block_sum(gx, scratch);
    return rs * rs * rs * gx / (float)(vecs * VEC);
}

extern "C" __global__ void rms_norm_bwd_act_vec(const float* __restrict__ dy, const uint4* __restrict__ x, const float* __restrict__ w,
                                                const float* __restrict__ rstd, uint4* __restrict__ dx, int rows, int vecs) {
    __shared__ float scratch[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const long long base = (long long)r * vecs;
    const float rs = rstd[r];
    const float c = grad_coef_vec(dy, x, w, rs, base, vecs, scratch);
    for (int j = threadIdx.x; j < vecs; j += blockDim.x) {
        act_vec v, o;
        v.u = x[base + j];
        float d[VEC], wv[VEC];
        load_f32_vec(dy, base + j, d);
        load_f32_vec(w, j, wv);
        #pragma unroll
        for (int e = 0; e < VEC; e++) o.a[e] = to_act(rs * d[e] * (1.0f + wv[e]) - c * to_f32(v.a[e]));
        dx[base + j] = o.u;
    }
}

extern "C" __global__ void rms_norm_bwd_f32_vec(const float* dy, const uint4* __restrict__ x, const float* __restrict__ w,
                                                const float* __restrict__ rstd, const float* res, float* dx, int rows, int vecs) {
    __shared__ float scratch[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const long long base = (long long)r * vecs;
    const float rs = rstd[r];
    const float c = grad_coef_vec(dy, x, w, rs, base, vecs, scratch);
    for (int j = threadIdx.x; j < vecs; j += blockDim.x) {
        act_vec v;
        v.u = x[base + j];
        float d[VEC], wv[VEC], rv[VEC];
        load_f32_vec(dy, base + j, d);
        load_f32_vec(w, j, wv);
        if (res != nullptr) load_f32_vec(res, base + j, rv);
        #pragma unroll
        for (int e = 0; e < VEC; e++) {
            d[e] = rs * d[e] * (1.0f + wv[e]) - c * to_f32(v.a[e]);
            if (res != nullptr) d[e] += rv[e];
        }
        store_f32_vec(dx, base + j, d);
    }
}
