// The tied lm_head's cross-entropy over the vocabulary, a chunk of trained
// tokens at a time: gather the chunk's final hidden states, let a GEMM make
// their logits, then cross_entropy turns each row of logits into its loss
// and, in place of materialising probabilities, the gradient of the
// normalised loss with respect to the logits; a second GEMM brings that
// gradient back to the hidden states, which scatter_rows puts in place.
// Reference: trainer.LMHeadLoss.
#include "gemma.cuh"

// dst[r] = src[idx[r]] for rows of dim values.
extern "C" __global__ void gather_rows(const act_t* __restrict__ src, const int* __restrict__ idx, act_t* __restrict__ dst,
                                       int n, int dim) {
    GRID_STRIDE(i, (long long)n * dim) {
        const long long r = i / dim, d = i % dim;
        dst[i] = src[(long long)idx[r] * dim + d];
    }
}

// dst[idx[r]] = src[r]; rows of dst not named keep their values.
extern "C" __global__ void scatter_rows(const float* __restrict__ src, const int* __restrict__ idx, float* __restrict__ dst,
                                        int n, int dim) {
    GRID_STRIDE(i, (long long)n * dim) {
        const long long r = i / dim, d = i % dim;
        dst[(long long)idx[r] * dim + d] = src[i];
    }
}

// The running maximum m and sum s = Σ exp(x − m) of the values seen, after
// one more: the online softmax, one read of a row for both. m starts at
// the lowest finite float rather than −∞, so that −∞ logits add
// exp(−∞) = 0, never NaN.
__device__ __forceinline__ void online_add(float x, float& m, float& s) {
    if (x > m) {
        s = s * expf(m - x) + 1.0f;
        m = x;
    } else {
        s += expf(x - m);
    }
}

// One block per row of logits [rows × vocab]. loss[r] = logsumexp(row) −
// row[target]. With grad set, grad[r] = (softmax(row) − onehot(target)) /
// normalizer, the number of trained tokens of the optimizer step. A row
// is read twice: once for its maximum and sum together, once for the
// gradient (16 bytes a load where the rows allow).
extern "C" __global__ void cross_entropy(const float* __restrict__ logits, const int* __restrict__ targets, int vocab,
                                         float normalizer, double* __restrict__ loss, act_t* __restrict__ grad) {
    __shared__ float scratch[32];
    const long long base = (long long)blockIdx.x * vocab;
    const float* row = logits + base;
    const bool vec = vocab % 4 == 0 && ((size_t)row & 15) == 0 && (grad == nullptr || ((size_t)(grad + base) & (sizeof(act4) - 1)) == 0);
    float m = -3.402823466e+38f, s = 0.0f; // −FLT_MAX
    if (vec) {
        for (int j = threadIdx.x; j < vocab / 4; j += blockDim.x) {
            const float4 x = reinterpret_cast<const float4*>(row)[j];
            online_add(x.x, m, s);
            online_add(x.y, m, s);
            online_add(x.z, m, s);
            online_add(x.w, m, s);
        }
    } else {
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) online_add(row[j], m, s);
    }
    const float mx = block_max(m, scratch);
    s = block_sum(s * expf(m - mx), scratch);
    const int tgt = targets[blockIdx.x];
    if (threadIdx.x == 0) loss[blockIdx.x] = (double)mx + log((double)s) - (double)row[tgt];
    if (grad == nullptr) return;
    const float scale = 1.0f / (s * normalizer);
    const float one = 1.0f / normalizer;
    if (vec) {
        for (int j = threadIdx.x; j < vocab / 4; j += blockDim.x) {
            const float4 x = reinterpret_cast<const float4*>(row)[j];
            const float v[4] = {x.x, x.y, x.z, x.w};
            float g[4];
            #pragma unroll
            for (int e = 0; e < 4; e++) g[e] = expf(v[e] - mx) * scale - (4 * j + e == tgt ? one : 0.0f);
            store_act4(grad + base + 4 * j, g[0], g[1], g[2], g[3]);
        }
        return;
    }
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        float g = expf(row[j] - mx) * scale;
        if (j == tgt) g -= one;
        grad[base + j] = to_act(g);
    }
}

// out[0] = sum of v[0..n) in double, in a fixed order (one block).
extern "C" __global__ void sum_double(const double* __restrict__ v, int n, double* __restrict__ out) {
    __shared__ double scratch[32];
    double s = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += v[i];
    s = block_sum_double(s, scratch);
    if (threadIdx.x == 0) out[0] = s;
}

// One block per row of logits [rows × vocab]: best[r] = the row's most
// likely token as greedy decoding takes it, the lowest index among equal
// largest values (NaN never wins; an all-NaN row gives 0).
extern "C" __global__ void argmax_rows(const float* __restrict__ logits, int vocab, int* __restrict__ best) {
    __shared__ float sv[32];
    __shared__ int si[32];
    const int none = 0x7fffffff;
    const float* row = logits + (long long)blockIdx.x * vocab;
    float v = -INFINITY;
    int i = none;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        const float x = row[j];
        if (x > v || (x == v && j < i)) v = x, i = j;
    }
    for (int off = 16; off > 0; off >>= 1) {
        const float ov = __shfl_down_sync(0xffffffff, v, off);
        const int oi = __shfl_down_sync(0xffffffff, i, off);
        if (ov > v || (ov == v && oi < i)) v = ov, i = oi;
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) sv[warp] = v, si[warp] = i;
    __syncthreads();
    if (warp != 0) return;
    const int warps = blockDim.x / 32;
    v = lane < warps ? sv[lane] : -INFINITY;
    i = lane < warps ? si[lane] : none;
    for (int off = 16; off > 0; off >>= 1) {
        const float ov = __shfl_down_sync(0xffffffff, v, off);
        const int oi = __shfl_down_sync(0xffffffff, i, off);
        if (ov > v || (ov == v && oi < i)) v = ov, i = oi;
    }
    if (lane == 0) best[blockIdx.x] = i == none ? 0 : i;
}

// Sampling's candidates (top_chunk_max, top_threshold, top_collect): of
// each row of logits [rows × vocab], at least its k largest values with
// their indices, so that a draw among the top k reads kilobytes of the row
// instead of all of it. The row is cut into at most TOP_CHUNKS chunks of
// len values (a multiple of 32; kernels.TopChunking). t, the k-th largest
// of the chunks' maxima, is reached by at least k logits (one in each of k
// chunks), and a logit below t is not among the k largest (those k lie
// above it): every logit at or above t is a candidate, ties included. NaN
// is never one.
//
// A row's record in out: [count, t, indices[cap], values[cap]], count the
// number of candidates (more than cap: only cap of them are written).
#define TOP_CHUNKS 1024

// A warp a chunk (blockIdx.y the row): its largest value, NaN skipped
// (-INFINITY for none), into maxima[row × TOP_CHUNKS + chunk].
extern "C" __global__ void top_chunk_max(const float* __restrict__ logits, int vocab, int len, int chunks, float* __restrict__ maxima) {
    const int row = blockIdx.y, c = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (c >= chunks) return; // the whole warp
    const float* x = logits + (long long)row * vocab;
    const int end = min(vocab, (c + 1) * len);
    float m = -INFINITY;
    for (int j = c * len + lane; j < end; j += 32) m = fmaxf(m, x[j]);
    for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    if (lane == 0) maxima[(long long)row * TOP_CHUNKS + c] = m;
}

// A block of TOP_CHUNKS threads a row: the row's maxima sorted, largest
// first (a bitonic sort), t the k-th (1 ≤ k ≤ chunks), and the row's
// record reset to no candidates at t.
extern "C" __global__ void top_threshold(const float* __restrict__ maxima, int chunks, int k, int cap, int* __restrict__ out) {
    __shared__ float v[TOP_CHUNKS];
    const int row = blockIdx.x, i = threadIdx.x;
    v[i] = i < chunks ? maxima[(long long)row * TOP_CHUNKS + i] : -INFINITY;
    __syncthreads();
    for (int size = 2; size <= TOP_CHUNKS; size <<= 1) {
        for (int stride = size / 2; stride > 0; stride >>= 1) {
            const int j = i ^ stride;
            if (j > i) { // runs of size alternate in direction, so that they merge into the next size
                const float a = v[i], b = v[j];
                if ((i & size) == 0 ? a < b : a > b) v[i] = b, v[j] = a;
            }
            __syncthreads();
        }
    }
    if (i == 0) {
        int* rec = out + (long long)row * (2 + 2 * cap);
        rec[0] = 0;
        reinterpret_cast<float*>(rec)[1] = v[k - 1];
    }
}

// A warp a chunk (blockIdx.y the row), after top_threshold: each logit at
// or above the row's t appended to its record. A chunk whose maximum is
// below t has none and reads no further. The order of a record's
// candidates depends on the warps' timing; the set does not.
extern "C" __global__ void top_collect(const float* __restrict__ logits, int vocab, int len, int chunks, const float* __restrict__ maxima, int cap,
                                       int* __restrict__ out) {
    const int row = blockIdx.y, c = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (c >= chunks) return; // the whole warp
    int* rec = out + (long long)row * (2 + 2 * cap);
    const float t = reinterpret_cast<const float*>(rec)[1];
    if (!(maxima[(long long)row * TOP_CHUNKS + c] >= t)) return;
    const float* x = logits + (long long)row * vocab;
    const int end = min(vocab, (c + 1) * len);
    for (int j0 = c * len; j0 < end; j0 += 32) {
        const int j = j0 + lane;
        const float xv = j < end ? x[j] : 0.0f;
        const bool hit = j < end && xv >= t;
        const unsigned int hits = __ballot_sync(0xffffffffu, hit);
        if (hits == 0u) continue;
        int at = 0;
        if (lane == 0) at = atomicAdd(rec, __popc(hits));
        at = __shfl_sync(0xffffffffu, at, 0) + __popc(hits & ((1u << lane) - 1u));
        if (hit && at < cap) rec[2 + at] = j, reinterpret_cast<float*>(rec)[2 + cap + at] = xv;
    }
}
