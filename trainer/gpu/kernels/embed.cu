// Embedding lookup times Gemma's sqrt(hidden) scale (rounded to the
// checkpoint dtype on the host). Reference: trainer.Embed.
#include "gemma.cuh"

extern "C" __global__ void embed_fwd(const int* __restrict__ ids, const act_t* __restrict__ table, float scale,
                                     act_t* __restrict__ out, int tokens, int dim) {
    GRID_STRIDE(i, (long long)tokens * dim) {
        const long long t = i / dim, d = i % dim;
        out[i] = to_act(to_f32(table[(long long)ids[t] * dim + d]) * scale);
    }
}
