// Gemma's GeGLU: act = gelu_tanh(gate) · up, and its backward pass.
// Reference: trainer.GeGLU, trainer.GeGLUBackward.
#include "gemma.cuh"

// act = gelu(gate) · up, rounded to an activation once.
extern "C" __global__ void geglu_fwd(const act_t* __restrict__ gate, const act_t* __restrict__ up, act_t* __restrict__ out, long long n) {
    GRID_STRIDE(i, n) {
        const float x = to_f32(gate[i]);
        float s, dz;
        gelu_parts(x, &s, &dz);
        out[i] = to_act(x * s * to_f32(up[i]));
    }
}

// dgate and dup may be gate and up themselves (each element is read before
// the same thread writes it). d gelu/dx = σ + 2xσ(1 − σ)·dz/dx.
extern "C" __global__ void geglu_bwd(const float* __restrict__ dout, const act_t* gate, const act_t* up,
                                     act_t* dgate, act_t* dup, long long n) {
    GRID_STRIDE(i, n) {
        const float x = to_f32(gate[i]);
        const float u = to_f32(up[i]);
        float s, dz;
        gelu_parts(x, &s, &dz);
        const float d = dout[i];
        const float dg = s + 2.0f * x * s * (1.0f - s) * dz;
        dgate[i] = to_act(d * u * dg);
        dup[i] = to_act(d * x * s);
    }
}

extern "C" __global__ void geglu_fwd_vec(const uint4* __restrict__ gate, const uint4* __restrict__ up, uint4* __restrict__ out,
                                         long long groups) {
    GRID_STRIDE(g, groups) {
        act_vec a, b, o;
        a.u = gate[g];
        b.u = up[g];
        #pragma unroll
        for (int e = 0; e < VEC; e++) {
            const float x = to_f32(a.a[e]);
            float s, dz;
            gelu_parts(x, &s, &dz);
            o.a[e] = to_act(x * s * to_f32(b.a[e]));
        }
        out[g] = o.u;
    }
}

extern "C" __global__ void geglu_bwd_vec(const float* __restrict__ dout, const uint4* gate, const uint4* up, uint4* dgate,
                                         uint4* dup, long long groups) {
    GRID_STRIDE(g, groups) {
        act_vec a, b, dg, du;
        a.u = gate[g];
        b.u = up[g];
        float d[VEC];
        load_f32_vec(dout, g, d);
        #pragma unroll
        for (int e = 0; e < VEC; e++) {
            const float x = to_f32(a.a[e]);
            const float u = to_f32(b.a[e]);
            float s, dz;
            gelu_parts(x, &s, &dz);
            const float dgelu = s + 2.0f * x * s * (1.0f - s) * dz;
            dg.a[e] = to_act(d[e] * u * dgelu);
            du.a[e] = to_act(d[e] * x * s);
        }
        dgate[g] = dg.u;
        dup[g] = du.u;
    }
}
