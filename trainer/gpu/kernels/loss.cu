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

// One block per row of logits [rows × vocab]. loss[r] = logsumexp(row) −
// row[target]. With grad set, grad[r] = (softmax(row) − onehot(target)) /
// normalizer, the number of trained tokens of the optimizer step.
extern "C" __global__ void cross_entropy(const float* __restrict__ logits, const int* __restrict__ targets, int vocab,
                                         float normalizer, double* __restrict__ loss, act_t* __restrict__ grad) {
    __shared__ float scratch[32];
    const long long base = (long long)blockIdx.x * vocab;
    const float* row = logits + base;
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) mx = fmaxf(mx, row[j]);
    mx = block_max(mx, scratch);
    float s = 0.0f;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) s += expf(row[j] - mx);
    s = block_sum(s, scratch);
    const int tgt = targets[blockIdx.x];
    if (threadIdx.x == 0) loss[blockIdx.x] = (double)mx + log((double)s) - (double)row[tgt];
    if (grad == nullptr) return;
    const float scale = 1.0f / (s * normalizer);
    const float one = 1.0f / normalizer;
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
