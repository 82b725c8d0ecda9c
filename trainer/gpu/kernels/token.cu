// decode_token: a decoding step of one token through every block of the
// model in one launch, for dense or NF4 weights; decode_token_lora (at the
// end) is the same step with an adapter.
//
// A step of one token reads every weight once and does little else, yet
// as a launch per operation (13 a block) it is bound by the kernels' fixed
// costs, a few microseconds each, not by the bytes (see trainer/gpu/NOTES.md,
// "Decoding, second pass"). Here one block per multiprocessor stays
// resident for the whole step and the operations are phases between grid
// barriers, five a block:
//
//   A  x = x1 + norm(d) (the block before's residual), xn = norm(x);
//      q, k, v = xn·Wᵀ
//   B  q and k norm + RoPE, the step's key and value into the cache,
//      attention over the cache in splits of TOK_CHUNK keys (flash-decoding,
//      as attn_cached: the last split of a head to finish joins them)
//   C  o = att·Woᵀ
//   D  x1 = x + norm(o), xn2 = norm(x1); act = gelu(xn2·Wgᵀ)·(xn2·Wuᵀ)
//   E  d = act·Wdᵀ
//
// and after the last block, F: the final norm and the lm_head, the logits
// and the most likely token.
//
// Every block computes the norms of the vectors it needs itself (a few
// thousand values) rather than wait for another barrier. Each product
// phase gives each block a contiguous slice of the rows (of 16-row tiles
// for NF4, read on tensor cores as nf4_gemv_mma reads them). Values are
// rounded to activations where the launch-per-operation path stores them,
// so both compute the same function; sums run in another order.
//
// A phase's time is mostly the latency of the path through it, so what
// lies before its first loads counts: integer divisions by run-time values
// (chains of some twenty dependent instructions) are kept off that path
// where the shape allows, and the kernel keeps everything in registers
// (512 threads at 128 registers: it runs at the register file's edge, and
// a spill is reloaded on some phase's path).
//
// Data written by other blocks of the launch is read with __ldcg (past the
// multiprocessor's L1, which is not coherent); weights and the cache rows
// of earlier steps with ordinary loads. The launch must be cooperative
// (every block resident), the barrier counter zero before it.
#include "gemma.cuh"
#include "nf4.cuh"

#define HD HEAD_DIM
#define TOK_WARPS 16
#define TOK_THREADS (TOK_WARPS * 32)
#define TOK_CHUNK 32  // keys an attention split takes (attn_cached's DEC_CHUNK)
#define TOK_UNROLL 8  // 16-byte weight loads a lane has in flight per matrix
#define TOK_PHASES 5  // grid barriers a block of the model (A to E); kernels.TokenBarriers
#define TOK_READINGS(n_layers) (2 + 2 * TOK_PHASES * (n_layers)) // a block's clock readings: start, each barrier's two, end

// One projection: dense [rows × in] activations, or NF4 (bitsandbytes'
// layout: packed codes, a code per 64-block for its absmax, a scale per
// 256 blocks, an offset; and, where the decoder made it, the codes and
// absmax codes again in nf4_tile_repack's order, which tok_rows_nf4 then
// reads instead). kernels.TokenMatrix writes this layout (48 bytes).
struct tok_mat {
    const void* w;
    const unsigned char* absmax_q;
    const float* absmax2;
    float offset;
    int nf4;
    const uint4* tile_codes;
    const unsigned short* tile_aq;
};

// One block of the model as decode_token reads it; kernels.TokenLayer
// writes this layout (7 matrices, 8 pointers, 4 ints: 416 bytes).
struct tok_layer {
    tok_mat q, k, v, o, gate, up, down;
    const float *in_norm, *post_attn, *pre_ff, *post_ff, *q_norm, *k_norm;
    act_t *kc, *vc;      // [sequences × cache_len × kv_heads × HD]
    int cache_len;       // rows a sequence has in the caches (a ring on sliding layers)
    int window;          // 0 on global layers
    int rope;            // the rotary table: 0 sliding, 1 global
    int pad;
};

// The block's shared memory, carved from the dynamic allocation
// (kernels.tokenSharedBytes mirrors the sizes).
struct tok_smem {
    float* v;     // the phase's input vector: max(hidden, heads·HD, inter)
    float* x;     // the residual stream: hidden
    float* nw;    // the phase's two norm weights: hidden each
    float* part;  // partial row sums: 2·TOK_WARPS
    float* red;   // block_sum's scratch: 32
    float* qs;    // the head's query after norm and RoPE: HD
    float* kn;    // the step's own key, value: HD each
    float* vn;
    float* qkn;   // the layer's q and k norm weights: HD each (loaded in A for B)
    float* w;     // a split's scores: TOK_CHUNK
    float* sums;  // the output's partial sums: TOK_THREADS·VEC; NF4 products' partial rows
    int* flag;
    tok_layer* layer;    // the layer table's entries of this layer and the next (tok_layer_fetch)
    unsigned int* pairs; // NF4 only: nf4_mma_tables' pairs, 256·NF4_PAIR_COPIES
    float* dyn;          // and absmax codes, 256
    float* xa;           // decode_token_lora only: a phase's x·Aᵀ, 3·rank
    float* dsums;        // and the block's row sums of a phase (tok_product's DEFER)
};

__device__ __forceinline__ tok_smem tok_carve(float* dyn, int vlen, int hidden, int rank) {
    tok_smem s;
    s.v = dyn;
    s.x = s.v + (vlen + 3) / 4 * 4;
    s.nw = s.x + (hidden + 3) / 4 * 4;
    s.part = s.nw + 2 * ((hidden + 3) / 4 * 4);
    s.red = s.part + 2 * TOK_WARPS;
    s.qs = s.red + 32;
    s.kn = s.qs + HD;
    s.vn = s.kn + HD;
    s.qkn = s.vn + HD;
    s.w = s.qkn + 2 * HD;
    s.sums = s.w + TOK_CHUNK;
    s.flag = reinterpret_cast<int*>(s.sums + TOK_THREADS * VEC);
    s.layer = reinterpret_cast<tok_layer*>(s.sums + TOK_THREADS * VEC + 4); // 16-byte aligned
    s.pairs = reinterpret_cast<unsigned int*>(s.layer + 2);
    s.dyn = reinterpret_cast<float*>(s.pairs + 256 * NF4_PAIR_COPIES);
    s.xa = s.dyn + 256;
    s.dsums = s.xa + 3 * rank;
    return s;
}

// The device's clock in nanoseconds, the same on every multiprocessor.
__device__ __forceinline__ unsigned long long tok_now() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// A counter that blocks of the launch arrive at (tok_arrive: a release
// add, ordering the thread's writes before it) and wait on (tok_wait_count:
// acquire polls until it reaches target). A count that does not come after
// some 2²² polls (seconds, where a whole step takes milliseconds) never
// will: the launch traps, so that the host gets an error instead of a
// device that hangs.
__device__ __forceinline__ void tok_arrive(unsigned int* counter) {
    asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(counter) : "memory");
}

__device__ __forceinline__ void tok_wait_count(const unsigned int* counter, unsigned int target) {
    unsigned int seen;
    for (unsigned int polls = 0;; polls++) {
        asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(counter) : "memory");
        if (seen >= target) break;
        if (polls == (1u << 22)) __trap();
    }
}

// Waits until every block of the launch has arrived here, with what each
// wrote before visible to all: thread 0 arrives with a release (after the
// block's __syncthreads, it covers the whole block's writes) and polls
// with acquires, which is all the ordering needed; two full fences around
// them cost ~0.2 µs a barrier (1B: 27 µs a token). n counts the
// barriers so far, this one included; it traps as tok_wait_count does.
//
// With clock set (profiling: the block's readings in decode_token's
// times), thread 0 writes there the times the block arrived and left
// (tok_now): its readings 2n - 1 and 2n, reading 0 being the launch's
// start. Both the count and the place come from the layer's index, not
// from state carried through the phases, where the kernel has no register
// to spare.
__device__ __forceinline__ void tok_grid_sync(unsigned int* bar, unsigned int n, unsigned long long* clock) {
    const unsigned int target = n * gridDim.x;
    __syncthreads();
    if (threadIdx.x == 0) {
        if (clock) clock[2 * n - 1] = tok_now();
        tok_arrive(bar);
        tok_wait_count(bar, target);
        if (clock) clock[2 * n] = tok_now();
    }
    __syncthreads();
}

// Layer l's entry of the layer table, copied into slot (l & 1) of the
// block's two by cp.async (26 threads, 16 bytes each): the next layer's
// is fetched during a layer's attention and waited for (tok_layer_wait,
// then a barrier) before the layer's last grid barrier, so that no
// phase's first weight loads wait on an L2 round trip for the pointers
// (each grid barrier's acquire empties the L1).
#define TOK_LAYER_WORDS ((int)(sizeof(tok_layer) / 16))
static_assert(sizeof(tok_layer) % 16 == 0, "the layer table is copied in 16-byte words");

__device__ __forceinline__ void tok_layer_fetch(const tok_layer* layers, int l, tok_layer* slots) {
    if (threadIdx.x < TOK_LAYER_WORDS) {
        const unsigned int dst = (unsigned int)__cvta_generic_to_shared(reinterpret_cast<uint4*>(slots + (l & 1)) + threadIdx.x);
        const uint4* src = reinterpret_cast<const uint4*>(layers + l) + threadIdx.x;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n\tcp.async.commit_group;" ::"r"(dst), "l"(src) : "memory");
    }
}

// Waits for this thread's copies of tok_layer_fetch; a barrier after it
// makes the entry visible to the block.
__device__ __forceinline__ void tok_layer_wait() {
    if (threadIdx.x < TOK_LAYER_WORDS) asm volatile("cp.async.wait_all;" ::: "memory");
}

// The block's slice [r0, r1) of rows rows, the same in every phase. Its
// 64-bit divisions take a 32-bit path at run time; written in 32 bits,
// they changed the register allocation so that the lm_head's loop spilled.
__device__ __forceinline__ void tok_slice(int rows, int& r0, int& r1) {
    r0 = (int)((long long)rows * blockIdx.x / gridDim.x);
    r1 = (int)((long long)rows * (blockIdx.x + 1) / gridDim.x);
}

// n activations written in this launch (n a multiple of VEC) into dst.
__device__ __forceinline__ void tok_load(const act_t* p, int n, float* dst) {
    for (int g = threadIdx.x; g < n / VEC; g += blockDim.x) {
        act_vec u;
        u.u = __ldcg(reinterpret_cast<const uint4*>(p) + g);
        #pragma unroll
        for (int e = 0; e < VEC; e++) dst[g * VEC + e] = to_f32(u.a[e]);
    }
}

// A phase's inputs: two activation vectors written in this launch (a into
// da, b into db) and the weights of the two norms it applies (w1, w2 into
// nw, one after the other), n values each (a multiple of VEC), with every
// load in flight at once. The norm weights come from memory (a token reads
// each layer's once, after the L2 has held a few other layers' products);
// read inside tok_norm, each was a round trip of its own on every
// block's path through the phase.
__device__ __forceinline__ void tok_load_inputs(const act_t* a, float* da, const act_t* b, float* db, const float* __restrict__ w1,
                                                const float* __restrict__ w2, int n, float* nw) {
    for (int g = threadIdx.x; g < n / VEC; g += blockDim.x) {
        act_vec ua, ub;
        ua.u = __ldcg(reinterpret_cast<const uint4*>(a) + g);
        ub.u = __ldcg(reinterpret_cast<const uint4*>(b) + g);
        float4 f1[VEC / 4], f2[VEC / 4];
        #pragma unroll
        for (int h = 0; h < VEC / 4; h++)
            f1[h] = reinterpret_cast<const float4*>(w1)[g * (VEC / 4) + h], f2[h] = reinterpret_cast<const float4*>(w2)[g * (VEC / 4) + h];
        #pragma unroll
        for (int e = 0; e < VEC; e++) da[g * VEC + e] = to_f32(ua.a[e]), db[g * VEC + e] = to_f32(ub.a[e]);
        #pragma unroll
        for (int h = 0; h < VEC / 4; h++)
            reinterpret_cast<float4*>(nw)[g * (VEC / 4) + h] = f1[h], reinterpret_cast<float4*>(nw + n)[g * (VEC / 4) + h] = f2[h];
    }
}

// n values that are activations already, stored.
__device__ __forceinline__ void tok_store(act_t* p, int n, const float* src) {
    for (int g = threadIdx.x; g < n / VEC; g += blockDim.x) {
        act_vec u;
        #pragma unroll
        for (int e = 0; e < VEC; e++) u.a[e] = to_act(src[g * VEC + e]);
        reinterpret_cast<uint4*>(p)[g] = u.u;
    }
}

// out = norm(in)·(1 + w), or with add, add + that (in place: add may be
// out), rounded to an activation once, as rms_norm_row.
__device__ __forceinline__ void tok_norm(const float* in, const float* __restrict__ w, int n, float eps, bool add, float* out, float* red) {
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss += in[i] * in[i];
    ss = block_sum(ss, red);
    const float inv = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = in[i] * inv * (1.0f + w[i]);
        if (add) v += out[i];
        out[i] = to_f32(to_act(v));
    }
    __syncthreads();
}

// Head row x (HD activations written in this launch) through its RMSNorm
// and RoPE, by one warp, as qk_norm_rope_row; out(i, value) takes each
// rounded result.
// The row is read once, into registers, where each lane's values pair up
// within the lane (HD a multiple of 64); other head dimensions read it
// twice.
template <typename Out>
__device__ __forceinline__ void tok_norm_rope(const act_t* x, const float* __restrict__ w, const float* cosv, const float* sinv,
                                              float eps, Out out) {
    const int lane = threadIdx.x & 31, half = HD / 2;
#if HD % 64 == 0
    constexpr int PER = HD / 32; // values a lane: i = lane + 32k
    float xv[PER];
    #pragma unroll
    for (int k = 0; k < PER; k++) xv[k] = to_f32(__ldcg(x + lane + 32 * k));
    float ss = 0.0f;
    #pragma unroll
    for (int k = 0; k < PER; k++) ss += xv[k] * xv[k];
    ss = warp_sum(ss);
    const float inv = 1.0f / sqrtf(ss / (float)HD + eps);
    #pragma unroll
    for (int k = 0; k < PER / 2; k++) { // i = lane + 32k pairs with i + half, the lane's value k + PER/2
        const int i = lane + 32 * k;
        const float a = xv[k] * inv * (1.0f + w[i]);
        const float b = xv[k + PER / 2] * inv * (1.0f + w[i + half]);
        const float c = cosv[i], s = sinv[i];
        out(i, to_act(a * c - b * s));
        out(i + half, to_act(b * c + a * s));
    }
#else
    float ss = 0.0f;
    for (int i = lane; i < HD; i += 32) {
        const float v = to_f32(__ldcg(x + i));
        ss += v * v;
    }
    ss = warp_sum(ss);
    const float inv = 1.0f / sqrtf(ss / (float)HD + eps);
    for (int i = lane; i < half; i += 32) {
        const float a = to_f32(__ldcg(x + i)) * inv * (1.0f + w[i]);
        const float b = to_f32(__ldcg(x + i + half)) * inv * (1.0f + w[i + half]);
        const float c = cosv[i], s = sinv[i];
        out(i, to_act(a * c - b * s));
        out(i + half, to_act(b * c + a * s));
    }
#endif
}

// Rows [r0, r1) of NMAT products with the vector v (in floats, in a
// multiple of VEC, in shared memory): row(m, r) is matrix m's row r.
// Warps take a row each, or where the block has fewer rows than warps a
// part of one, whose sums meet in a fixed order; done(r, sums) gets each
// row's NMAT sums in one thread.
//
// DEFER (decode_token_lora) keeps the sums in dbuf (NMAT a row of the
// block's) instead, and once every row's are there calls ready() in every
// thread, then done for the rows a thread each: the adapter's update of a
// row needs x·Aᵀ, which other blocks compute while this one streams its
// weights, and the rows then take their B rows' loads all at once.
struct tok_no_ready {
    __device__ void operator()() const {}
};

template <int NMAT, bool DEFER = false, typename Row, typename Done, typename Ready = tok_no_ready>
__device__ __forceinline__ void tok_rows(Row row, int r0, int r1, int in, const float* v, float* part, Done done, float* dbuf = nullptr,
                                         Ready ready = Ready()) {
    const int rows = r1 - r0;
    if (rows <= 0) return; // the same for the whole block
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int groups = in / VEC;
    const int S = rows >= TOK_WARPS ? 1 : TOK_WARPS / rows;
    for (int t = warp; t < rows * S; t += TOK_WARPS) {
        const int r = r0 + (S == 1 ? t : t / S), sp = S == 1 ? 0 : t % S;
        const int g1 = S == 1 ? groups : groups * (sp + 1) / S;
        const uint4* wr[NMAT];
        float acc[NMAT];
        #pragma unroll
        for (int m = 0; m < NMAT; m++) wr[m] = row(m, r), acc[m] = 0.0f;
        for (int g = (S == 1 ? 0 : groups * sp / S) + lane; g < g1; g += 32 * TOK_UNROLL) {
            uint4 a[NMAT][TOK_UNROLL];
            #pragma unroll
            for (int u = 0; u < TOK_UNROLL; u++) {
                #pragma unroll
                for (int m = 0; m < NMAT; m++) a[m][u] = g + 32 * u < g1 ? __ldg(wr[m] + g + 32 * u) : make_uint4(0u, 0u, 0u, 0u);
            }
            #pragma unroll
            for (int u = 0; u < TOK_UNROLL; u++) {
                if (g + 32 * u >= g1) break;
                float xv[VEC];
                load_f32_vec(v, g + 32 * u, xv);
                #pragma unroll
                for (int m = 0; m < NMAT; m++) {
                    act_vec wv;
                    wv.u = a[m][u];
                    #pragma unroll
                    for (int e = 0; e < VEC; e++) acc[m] += to_f32(wv.a[e]) * xv[e];
                }
            }
        }
        #pragma unroll
        for (int m = 0; m < NMAT; m++) acc[m] = warp_sum(acc[m]);
        if (S == 1) {
            if (lane == 0) {
                if (DEFER) {
                    #pragma unroll
                    for (int m = 0; m < NMAT; m++) dbuf[(r - r0) * NMAT + m] = acc[m];
                } else {
                    done(r, acc);
                }
            }
        } else if (lane == 0) {
            #pragma unroll
            for (int m = 0; m < NMAT; m++) part[t * NMAT + m] = acc[m];
        }
    }
    if (S > 1) {
        __syncthreads();
        if (threadIdx.x < rows) {
            float sums[NMAT];
            #pragma unroll
            for (int m = 0; m < NMAT; m++) {
                sums[m] = 0.0f;
                for (int sp = 0; sp < S; sp++) sums[m] += part[(threadIdx.x * S + sp) * NMAT + m];
            }
            if (DEFER) {
                #pragma unroll
                for (int m = 0; m < NMAT; m++) dbuf[threadIdx.x * NMAT + m] = sums[m];
            } else {
                done(r0 + threadIdx.x, sums);
            }
        }
    }
    if (DEFER) {
        __syncthreads();
        ready();
        for (int i = threadIdx.x; i < rows; i += blockDim.x) done(r0 + i, dbuf + i * NMAT);
    }
    __syncthreads(); // part and v are free again
}


// The NF4 form of tok_rows, on tensor cores as nf4_gemv_mma (nf4.cu): a
// phase's rows as up to three stacked segments (q, k and v), each of NMAT
// matrices side by side (gate and up), in tiles of 16 rows; the block
// takes a contiguous slice of the tiles, and its warps a tile each, or
// where it has fewer tiles than warps every S-th of a tile's 64-blocks,
// whose sums meet in a fixed order. Lane (g, c) reads rows g and g + 8 of
// a tile at positions 16c .. 16c + 15 of each 64-block; the token's x
// (lanes g = 0; the other lanes' columns are zero) comes from v, rounded
// to bfloat16 as stored. in must be a multiple of 64. done(r, sums) gets
// each row's NMAT sums in one thread.
template <int NMAT>
struct tok_segs {
    const tok_mat* m[3][NMAT];
    int rows[3];
    int count;
};

// The tile of the stacked segments at index t: its segment's matrices,
// rows and first row in the phase's stacking, and the tile's index in
// its segment. Constant indices only, so that sg stays in registers.
template <int NMAT>
__device__ __forceinline__ int tok_tile(const tok_segs<NMAT>& sg, int t, const tok_mat* (&m)[NMAT], int& rows, int& base) {
    const int n0 = (sg.rows[0] + 15) / 16, n1 = sg.count > 1 ? (sg.rows[1] + 15) / 16 : 0;
    const int seg = t < n0 ? 0 : t < n0 + n1 ? 1 : 2;
    #pragma unroll
    for (int i = 0; i < NMAT; i++) m[i] = seg == 0 ? sg.m[0][i] : seg == 1 ? sg.m[1][i] : sg.m[2][i];
    rows = seg == 0 ? sg.rows[0] : seg == 1 ? sg.rows[1] : sg.rows[2];
    base = seg == 0 ? 0 : seg == 1 ? sg.rows[0] : sg.rows[0] + sg.rows[1];
    return seg == 0 ? t : seg == 1 ? t - n0 : t - n0 - n1;
}

// nf4_x_pairs_if's fragments from x already rounded to bfloat16, at shared
// address at.
__device__ __forceinline__ void tok_xh_bf16(unsigned int at, bool load, unsigned int (&xb)[8]) {
    #pragma unroll
    for (int k = 0; k < 2; k++)
        asm volatile("{\n\t.reg .pred p;\n\tsetp.ne.u32 p, %4, 0;\n\t@p ld.shared.v4.u32 {%0, %1, %2, %3}, [%5];\n\t}"
                     : "+r"(xb[4 * k]), "+r"(xb[4 * k + 1]), "+r"(xb[4 * k + 2]), "+r"(xb[4 * k + 3])
                     : "r"((unsigned int)load), "r"(at + 16u * k));
}

template <int NMAT, bool TILED, bool DEFER, bool XH, typename Done, typename Ready>
__device__ __forceinline__ void tok_rows_nf4(const tok_segs<NMAT>& sg, int in, const float* v, tok_smem& s, Done done, float* dbuf,
                                             Ready ready) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
    const unsigned int lane4 = 4u * lane;
    constexpr int U = 4 / NMAT; // 64-blocks a lane has in flight per matrix and row
    // FLAT: a whole pass without branches (x's loads predicated, see
    // nf4_x_pairs_if), so that its units' chains of look-ups and mma may
    // interleave; the tail's pass stops at the last 64-block instead
    // (clamped and zero-scaled, its units past the end cost a 1B token 7%).
    // decode_token_lora's DEFER form keeps the branches, as flat it needed
    // a stack. (At head dim 128 the device's compiler puts 8 bytes of
    // decode_token in local memory with FLAT and XH; a 27B NF4 token is
    // still 5.9% faster with both: trainer/gpu/NOTES.md.)
    constexpr bool FLAT = !DEFER;
    const int blocks = in / 64;
    int tiles = 0;
    #pragma unroll
    for (int i = 0; i < 3; i++) tiles += i < sg.count ? (sg.rows[i] + 15) / 16 : 0;
    int t0, t1;
    tok_slice(tiles, t0, t1);
    const int n = t1 - t0;
    if (n <= 0) return; // the same for the whole block
    const int S = n >= TOK_WARPS ? 1 : TOK_WARPS / n;
    // XH: x rounded to bfloat16 once, after v in s.v (where tok_carve left
    // room), so that a unit loads its lanes' fragments instead of
    // converting them (down's input fills s.v, so down converts).
    const unsigned int xh = (unsigned int)__cvta_generic_to_shared(v + in);
    if (XH) {
        for (int i = threadIdx.x; i < in / 2; i += blockDim.x) {
            unsigned int p;
            asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(p) : "f"(v[2 * i + 1]), "f"(v[2 * i]));
            reinterpret_cast<unsigned int*>(s.v + in)[i] = p; // v is s.v
        }
        __syncthreads();
    }
    for (int task = warp; task < n * S; task += TOK_WARPS) {
        // The task's tile, row0 .. row0 + 15 of its segment's rows.
        const tok_mat* mats[NMAT];
        int rows, base;
        const int sp = S == 1 ? 0 : task % S;
        const int tile = tok_tile(sg, t0 + (S == 1 ? task : task / S), mats, rows, base), row0 = 16 * tile;
        const unsigned int ra = (unsigned int)min(row0 + g, rows - 1), rb = (unsigned int)min(row0 + g + 8, rows - 1);
        float acc[NMAT][2] = {};
        // The task's 64-blocks sp, sp + S, ...: the tile's S warps read S
        // consecutive ones at a time (contiguous ranges, one a warp, made
        // a 12B NF4 token 6% slower: trainer/gpu/NOTES.md).
        for (int h = sp; h < blocks; h += S * U) {
            nf4_block blk[NMAT][U];
            #pragma unroll
            for (int m = 0; m < NMAT; m++) {
                const tok_mat& mt = *mats[m];
                #pragma unroll
                for (int u = 0; u < U; u++) // past the end: a valid block, not used
                    blk[m][u] = nf4_load_block<TILED>(static_cast<const uint2*>(mt.w), mt.absmax_q, mt.tile_codes, mt.tile_aq,
                                                      mt.absmax2, ra, rb, blocks, tile, g, c, lane, (unsigned int)min(h + u * S, blocks - 1));
            }
            // Unit u of the pass: x at the lane's 16 positions as bfloat16
            // pairs (zero for g > 0), the products, the scales.
            auto unit = [&](int u, bool flat) { // flat: a constant where called
                const int hu = h + u * S;
                unsigned int xb[8] = {0u, 0u, 0u, 0u, 0u, 0u, 0u, 0u};
                if (XH) {
                    tok_xh_bf16(xh + 2u * (64 * hu + 16 * c), g == 0, xb);
                } else if (flat) {
                    nf4_x_pairs_if(v + 64 * hu + 16 * c, g == 0, xb);
                } else if (g == 0) {
                    nf4_x_pairs(v + 64 * hu + 16 * c, xb);
                }
                #pragma unroll
                for (int m = 0; m < NMAT; m++) {
                    float sum[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                    #pragma unroll
                    for (int k = 0; k < 4; k++) { // bytes 2k and 2k + 1 of the lane's 8: positions 4k .. 4k + 3
                        const uint2 wa = blk[m][u].w[0], wb = blk[m][u].w[1];
                        const unsigned int w0 = k < 2 ? wa.x : wa.y, w1 = k < 2 ? wb.x : wb.y;
                        const int j = 2 * (k & 1);
                        mma_bf16(sum, nf4_pair(s.pairs, lane4, w0, j), nf4_pair(s.pairs, lane4, w1, j), nf4_pair(s.pairs, lane4, w0, j + 1),
                                 nf4_pair(s.pairs, lane4, w1, j + 1), xb[2 * k], xb[2 * k + 1]);
                    }
                    const float offset = mats[m]->offset;
                    acc[m][0] = fmaf(nf4_scale(s.dyn[blk[m][u].q[0]], blk[m][u].a2[0], offset), sum[0], acc[m][0]);
                    acc[m][1] = fmaf(nf4_scale(s.dyn[blk[m][u].q[1]], blk[m][u].a2[1], offset), sum[2], acc[m][1]);
                }
            };
            if (FLAT && h + (U - 1) * S < blocks) { // a whole pass, the same for the whole warp
                #pragma unroll
                for (int u = 0; u < U; u++) unit(u, true);
            } else {
                #pragma unroll
                for (int u = 0; u < U; u++) {
                    if (h + u * S >= blocks) break; // the same for the whole warp
                    unit(u, false);
                }
            }
        }
        // Token 0's sums of rows g and g + 8 are in the lanes of c = 0.
        if (c == 0) {
            #pragma unroll
            for (int e = 0; e < 2; e++) {
                const int r = row0 + g + 8 * e;
                if (S == 1 && DEFER) {
                    #pragma unroll
                    for (int m = 0; m < NMAT; m++) dbuf[(base + r - 16 * t0) * NMAT + m] = acc[m][e];
                } else if (S == 1) {
                    float sums[NMAT];
                    #pragma unroll
                    for (int m = 0; m < NMAT; m++) sums[m] = acc[m][e];
                    if (r < rows) done(base + r, sums);
                } else {
                    #pragma unroll
                    for (int m = 0; m < NMAT; m++) s.sums[(task * 16 + g + 8 * e) * NMAT + m] = acc[m][e];
                }
            }
        }
    }
    if (S > 1) {
        __syncthreads();
        if (threadIdx.x < 16 * n) {
            const int t = threadIdx.x / 16, i = threadIdx.x % 16;
            const tok_mat* mats[NMAT];
            int rows, base;
            const int r = 16 * tok_tile(sg, t0 + t, mats, rows, base) + i;
            if (r < rows) {
                float sums[NMAT];
                #pragma unroll
                for (int m = 0; m < NMAT; m++) {
                    sums[m] = 0.0f;
                    for (int sp = 0; sp < S; sp++) sums[m] += s.sums[((t * S + sp) * 16 + i) * NMAT + m];
                }
                if (DEFER) {
                    #pragma unroll
                    for (int m = 0; m < NMAT; m++) dbuf[(base + r - 16 * t0) * NMAT + m] = sums[m];
                } else {
                    done(base + r, sums);
                }
            }
        }
    }
    if (DEFER) { // the segments are whole tiles (TokenFits), so the block's rows are 16·t0 ..
        __syncthreads();
        ready();
        const int total = sg.rows[0] + (sg.count > 1 ? sg.rows[1] : 0) + (sg.count > 2 ? sg.rows[2] : 0);
        for (int i = threadIdx.x; i < min(16 * t1, total) - 16 * t0; i += blockDim.x) done(16 * t0 + i, dbuf + i * NMAT);
    }
    __syncthreads(); // s.sums and v are free again
}

// The block's rows of a phase's product with its input in s.v: the
// segments' matrices [rows × in], dense or NF4 (tok_rows, tok_rows_nf4),
// their rows numbered in the segments' order.
//
// DEFER: done runs after every sum of the block's rows and ready() (see
// tok_rows), the sums kept in s.dsums.
template <int NMAT, bool DEFER = false, bool XH = false, typename Done, typename Ready = tok_no_ready>
__device__ __forceinline__ void tok_product(const tok_segs<NMAT>& sg, int in, tok_smem& s, Done done, Ready ready = Ready()) {
    if (sg.m[0][0]->nf4) { // a decoder tiles all its NF4 matrices or none
        if (sg.m[0][0]->tile_codes)
            tok_rows_nf4<NMAT, true, DEFER, XH>(sg, in, s.v, s, done, s.dsums, ready);
        else
            tok_rows_nf4<NMAT, false, DEFER, XH>(sg, in, s.v, s, done, s.dsums, ready);
        return;
    }
    int r0, r1;
    tok_slice(sg.rows[0] + sg.rows[1] + sg.rows[2], r0, r1); // segments past count have no rows
    const int groups = in / VEC;
    tok_rows<NMAT, DEFER>(
        [&](int m, int r) {
            const int a = sg.rows[0], b = a + sg.rows[1];
            const tok_mat* mt = r < a ? sg.m[0][m] : r < b ? sg.m[1][m] : sg.m[2][m];
            return static_cast<const uint4*>(mt->w) + (long long)(r < a ? r : r < b ? r - a : r - b) * groups;
        },
        r0, r1, in, s.v, s.part, done, s.dsums, ready);
}

// Phase B for head-split items it = blockIdx.x, + gridDim.x, ...: see the
// file's comment. The block with the fewest items (the last) stores the
// step's keys and values; a split that holds the step's own position
// takes its key and value from qkv, so no block reads a cache row this
// launch writes.
__device__ void tok_attention(const tok_layer& L, const act_t* qkv, act_t* att, float* recs, unsigned int* counts, int sq, int p,
                              int heads, int kv_heads, int group, float eps, float scale, const float* cosv, const float* sinv,
                              tok_smem& s) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, tid = threadIdx.x;
    const act_t* qh = qkv;
    const act_t* kh = qkv + heads * HD;
    const act_t* vh = kh + kv_heads * HD;
    const long long row = (long long)kv_heads * HD;
    const long long base = (long long)sq * L.cache_len;
    if (blockIdx.x == gridDim.x - 1) {
        const long long at = (base + p % L.cache_len) * row;
        for (int g = warp; g < kv_heads; g += TOK_WARPS) {
            act_t* kc = L.kc + at + (long long)g * HD;
            tok_norm_rope(kh + g * HD, s.qkn + HD, cosv, sinv, eps, [&](int i, act_t v) { kc[i] = v; });
            for (int i = lane; i < HD; i += 32) L.vc[at + (long long)g * HD + i] = __ldcg(vh + g * HD + i);
        }
    }
    const int lo = L.window > 0 ? max(0, p - L.window + 1) : 0;
    const int splits = (p + 1 - lo + TOK_CHUNK - 1) / TOK_CHUNK;
    // 16-byte groups in a head row (at least one, so that the kernel
    // compiles for head dims below 16 bytes, which TokenFits refuses).
    constexpr int G = HD >= VEC ? HD / VEC : 1;
    constexpr int SETS = TOK_THREADS / G;       // key sets of the output's sums
    for (int it = blockIdx.x; it < heads * splits; it += gridDim.x) {
        const int h = it / splits, sp = it - h * splits, g = h / group;
        const int j0 = lo + sp * TOK_CHUNK, n = min(p + 1 - j0, TOK_CHUNK);
        // Key j0 + i's row in the cache, for i < n: the split's keys lie in
        // the window, which the cache holds whole, so one subtraction wraps
        // them (the only division is j0's).
        const int jc = j0 % L.cache_len;
        auto cached = [&](int i) { return base + (jc + i >= L.cache_len ? jc + i - L.cache_len : jc + i); };
        const bool own = j0 + n - 1 == p; // the split holds the step's own key

        // Every load of the split's keys and values (but the step's own)
        // goes out first, while warps 0 to 2 normalise and rotate the
        // query and the step's key: for the scores, a warp a key; for the
        // output, thread (key set ks, group gi) takes keys ks, ks + SETS, ...
        constexpr int KEYS = (TOK_CHUNK + TOK_WARPS - 1) / TOK_WARPS; // keys a warp
        constexpr int LOADS = (G + 31) / 32;                          // groups a lane
        constexpr int VKEYS = (TOK_CHUNK + SETS - 1) / SETS;          // keys a thread
        const int ks = tid / G, gi = tid % G;
        act_vec kv[KEYS][LOADS], vv[VKEYS];
        #pragma unroll
        for (int k = 0; k < KEYS; k++) {
            const int i = warp + k * TOK_WARPS, j = j0 + i;
            const uint4* kr = reinterpret_cast<const uint4*>(L.kc + cached(i) * row + (long long)g * HD);
            #pragma unroll
            for (int q = 0; q < LOADS; q++) {
                const int gq = lane + 32 * q;
                kv[k][q].u = i < n && j != p && gq < G ? kr[gq] : make_uint4(0u, 0u, 0u, 0u);
            }
        }
        #pragma unroll
        for (int k = 0; k < VKEYS; k++) {
            const int i = ks + k * SETS, j = j0 + i;
            vv[k].u = i < n && j != p ? reinterpret_cast<const uint4*>(L.vc + cached(i) * row + (long long)g * HD)[gi]
                                      : make_uint4(0u, 0u, 0u, 0u);
        }
        if (warp == 0) {
            tok_norm_rope(qh + h * HD, s.qkn, cosv, sinv, eps, [&](int i, act_t v) { s.qs[i] = to_f32(v); });
        } else if (warp == 1 && own) {
            tok_norm_rope(kh + g * HD, s.qkn + HD, cosv, sinv, eps, [&](int i, act_t v) { s.kn[i] = to_f32(v); });
        } else if (warp == 2 && own) {
            for (int i = lane; i < HD; i += 32) s.vn[i] = to_f32(__ldcg(vh + g * HD + i));
        }
        __syncthreads();

        // Scores.
        #pragma unroll
        for (int k = 0; k < KEYS; k++) {
            const int i = warp + k * TOK_WARPS;
            if (i >= n) break; // the same for the whole warp
            float acc = 0.0f;
            if (j0 + i == p) {
                for (int d = lane; d < HD; d += 32) acc += s.qs[d] * s.kn[d];
            } else {
                #pragma unroll
                for (int q = 0; q < LOADS; q++) {
                    const int gq = lane + 32 * q;
                    if (gq >= G) break;
                    #pragma unroll
                    for (int e = 0; e < VEC; e++) acc += s.qs[gq * VEC + e] * to_f32(kv[k][q].a[e]);
                }
            }
            acc = warp_sum(acc);
            if (lane == 0) s.w[i] = acc * scale;
        }
        __syncthreads();
        // Every warp takes the split's largest score and the keys' weights
        // itself (key i's in lane i, TOK_CHUNK being a warp), so that no
        // further barrier is needed before the output's sums.
        static_assert(TOK_CHUNK == 32, "a split's keys are a warp's lanes");
        const float score = lane < n ? s.w[lane] : -INFINITY;
        const float mx = warp_max(score);
        const float wt = lane < n ? expf(score - mx) : 0.0f;

        // Output.
        {
            float wk[VKEYS]; // the thread's keys' weights, from the lanes that hold them
            #pragma unroll
            for (int k = 0; k < VKEYS; k++) wk[k] = __shfl_sync(0xffffffffu, wt, (ks + k * SETS) & 31);
            float acc[VEC] = {};
            #pragma unroll
            for (int k = 0; k < VKEYS; k++) {
                const int i = ks + k * SETS;
                if (i >= n) break;
                #pragma unroll
                for (int e = 0; e < VEC; e++) acc[e] += wk[k] * (j0 + i == p ? s.vn[gi * VEC + e] : to_f32(vv[k].a[e]));
            }
            #pragma unroll
            for (int e = 0; e < VEC; e++) s.sums[ks * HD + gi * VEC + e] = acc[e];
        }
        __syncthreads();
        float* rec = recs + ((long long)h * splits + sp) * (HD + 2);
        for (int d = tid; d < HD; d += TOK_THREADS) {
            float a = 0.0f;
            for (int ks = 0; ks < SETS; ks++) a += s.sums[ks * HD + d];
            rec[d] = a;
        }
        const float sum = warp_sum(wt);
        if (tid == 0) rec[HD] = mx, rec[HD + 1] = sum;
        if (last_block(&counts[h], splits, s.flag))
            decode_combine(recs + (long long)h * splits * (HD + 2), splits, HD, att + h * HD);
        __syncthreads(); // shared memory is free for the next item
    }
}

// One projection's adapter as decode_token_lora reads it: A [rank × in]
// and B [rows × rank], activations, or none (null) for a projection the
// adapter leaves alone. kernels.EncodeTokenLoRA writes this layout, seven
// a layer in the order of tok_layer's matrices.
struct tok_lora {
    const act_t* a;
    const act_t* b;
};

// x·Aᵀ for a product phase of decode_token_lora: the rows of the phase's
// N projections (rank each) over v, the phase's input (in floats, which
// every block holds), into xa as activations, as the launch per
// operation's GEMM rounds them; a block a row. The product reads them once
// every block has written its rows (tok_lora_start, tok_lora_ready). A row
// is read in 16-byte loads, all of a thread's in flight at once
// (TOK_XA_LOADS of them cover rows of up to 32,768 values in bf16, 16,384
// in float32; a longer row's rest follows), so that it costs one round
// trip to memory: at 12B, element by element, the down projection's row
// of 15,360 took several.
#define TOK_XA_LOADS 8

// acc += the 16-byte group w of A times v's group g, element by element.
__device__ __forceinline__ void tok_xa_group(float& acc, uint4 w, const float* v, int g) {
    float xv[VEC];
    load_f32_vec(v, g, xv);
    act_vec wv;
    wv.u = w;
    #pragma unroll
    for (int e = 0; e < VEC; e++) acc += to_f32(wv.a[e]) * xv[e];
}

template <int N>
__device__ __forceinline__ void tok_lora_xa(const tok_lora* lo, const float* v, int in, int rank, act_t* xa, float* red) {
    const int groups = in / VEC;
    for (int j = blockIdx.x; j < N * rank; j += gridDim.x) {
        const int m = j / rank;
        const act_t* a = lo[m].a;
        if (a == nullptr) continue; // the same for the whole block
        const uint4* row = reinterpret_cast<const uint4*>(a + (long long)(j - m * rank) * in);
        uint4 w[TOK_XA_LOADS];
        #pragma unroll
        for (int k = 0; k < TOK_XA_LOADS; k++) {
            const int g = threadIdx.x + k * TOK_THREADS;
            w[k] = g < groups ? __ldg(row + g) : make_uint4(0u, 0u, 0u, 0u);
        }
        float acc = 0.0f;
        #pragma unroll
        for (int k = 0; k < TOK_XA_LOADS; k++) {
            const int g = threadIdx.x + k * TOK_THREADS;
            if (g >= groups) break;
            tok_xa_group(acc, w[k], v, g);
        }
        for (int g = threadIdx.x + TOK_XA_LOADS * TOK_THREADS; g < groups; g += TOK_THREADS) tok_xa_group(acc, __ldg(row + g), v, g);
        acc = block_sum(acc, red);
        if (threadIdx.x == 0) xa[j] = to_act(acc);
    }
}

// A product's row with its adapter's update, as the launch per operation
// computes it: the product rounded, then scale·(x·Aᵀ)·B_rowᵀ added in
// float32 and the sum rounded (PEFT's order). b null: the product alone.
__device__ __forceinline__ act_t tok_lora_out(float sum, const act_t* b, int row, const float* xa, int rank, float scale) {
    if (b == nullptr) return to_act(sum);
    const act_t* br = b + (long long)row * rank;
    float t = 0.0f;
    for (int k = 0; k < rank; k++) t += to_f32(br[k]) * xa[k];
    return to_act(to_f32(to_act(sum)) + scale * t);
}

// The block's largest (value, id) pair, the lowest id among equals, into
// every thread's bv and bi.
__device__ __forceinline__ void tok_argmax(float& bv, int& bi, tok_smem& s) {
    for (int off = 16; off > 0; off >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, off);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, off);
        if (ov > bv || (ov == bv && oi < bi)) bv = ov, bi = oi;
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads(); // part may still be read
    if (lane == 0) s.part[2 * warp] = bv, reinterpret_cast<int*>(s.part)[2 * warp + 1] = bi;
    __syncthreads();
    bv = s.part[0], bi = reinterpret_cast<int*>(s.part)[1];
    for (int w = 1; w < TOK_WARPS; w++) {
        const float ov = s.part[2 * w];
        const int oi = reinterpret_cast<int*>(s.part)[2 * w + 1];
        if (ov > bv || (ov == bv && oi < bi)) bv = ov, bi = oi;
    }
    __syncthreads();
}

// decode_token_lora's x·Aᵀ for a product phase whose input is in s.v
// (in values): the block's rows of it (tok_lora_xa), then its arrival at
// the adapter's counter ctr, which counts every block's arrivals over the
// launch, so that the product can start at once and wait for x·Aᵀ only
// where it adds the update (tok_lora_ready).
template <int N>
__device__ __forceinline__ void tok_lora_start(const tok_lora* lo, tok_smem& s, int in, int rank, act_t* xa, unsigned int* ctr) {
    tok_lora_xa<N>(lo, s.v, in, rank, xa, s.red);
    // Thread 0 wrote the block's rows (block_sum leaves the sum there);
    // its release orders them before the arrival.
    if (threadIdx.x == 0) tok_arrive(ctr);
}

// Waits, in every thread of the block, until every block has arrived at
// ctr n times (its nth x·Aᵀ written), then reads the N·rank values of x·Aᵀ
// into s.xa. As tok_grid_sync: thread 0 polls (tok_wait_count), then the
// block reads.
template <int N>
__device__ __forceinline__ void tok_lora_ready(tok_smem& s, const act_t* xa, int rank, const unsigned int* ctr, unsigned int n) {
    if (threadIdx.x == 0) tok_wait_count(ctr, n * gridDim.x);
    __syncthreads();
    for (int i = threadIdx.x; i < N * rank; i += blockDim.x) s.xa[i] = to_f32(__ldcg(xa + i));
    __syncthreads();
}

// step: the token's id, its sequence and its position, a flag (not 0:
// the token is the one the launch before picked, read from best, so that
// a greedy decoding queues a step before the host has seen its token),
// then the rotary tables of its position, [cos | sin] of HD/2 each for the sliding
// then the global layers. work: the activations the phases pass on (x,
// x1, q|k|v, att, o, d, act). recs: the attention's split records,
// heads × the most splits × (HD + 2). sync: the grid barrier's counter
// (zero), then a counter per head and one for the lm_head (left zero),
// then a (value, id) pair per block. xf: the final norm's output, the
// lm_head's input; logits: the step's [vocab] float32 logits; best: the
// most likely token. times, when not null (profiling): per block, the
// time it started, the times it arrived at and left each barrier, and the
// time it finished (TOK_READINGS values, tok_now).
//
// decode_token_lora is the same step with an adapter (loras: seven
// tok_lora a layer; rank, scale; xa: 3·rank activations; sync holds one
// more counter, after the pairs): each product phase starts with the
// blocks' rows of x·Aᵀ of its projections (tok_lora_start), and adds the
// update to its rows (tok_lora_out) once every block's are written
// (tok_lora_ready): the same five barriers a layer.
template <bool LORA>
__device__ __forceinline__ void decode_token_body(const tok_layer* __restrict__ layers, int n_layers, const act_t* __restrict__ embed,
                                                  float embed_scale, const float* __restrict__ final_norm, const int* __restrict__ step,
                                                  act_t* __restrict__ work, float* __restrict__ recs, unsigned int* __restrict__ sync,
                                                  act_t* __restrict__ xf, float* __restrict__ logits, int* __restrict__ best, int hidden,
                                                  int heads, int kv_heads, int inter, int vocab, float eps, float attn_scale,
                                                  unsigned long long* __restrict__ times, const tok_lora* __restrict__ loras, int rank,
                                                  float lora_scale, act_t* __restrict__ xa) {
    constexpr int P = TOK_PHASES, bA = 1, bB = 2, bC = 3, bD = 4, bE = 5; // a layer's barriers
    extern __shared__ float4 dyn4[];
    const int qrows = heads * HD, kvrows = kv_heads * HD, group = heads / kv_heads; // query heads a key head
    // s.v holds a phase's input and, but for down's, its bfloat16 copy.
    const int vlen = max(max(max(hidden, qrows), inter), max(2 * hidden, (3 * qrows + 1) / 2));
    tok_smem s = tok_carve(reinterpret_cast<float*>(dyn4), vlen, hidden, rank);
    const int id = step[3] ? *best : step[0], sq = step[1], p = step[2]; // best is written after the last barrier
    const float* rope = reinterpret_cast<const float*>(step + 4);
    act_t* xb = work;
    act_t* x1b = xb + hidden;
    act_t* qkv = x1b + hidden;
    act_t* att = qkv + qrows + 2 * kvrows;
    act_t* ob = att + qrows;
    act_t* db = ob + hidden;
    act_t* actb = db + hidden;
    const int hv = hidden / VEC; // 16-byte groups a row
    tok_layer_fetch(layers, 0, s.layer);
    tok_layer_wait();
    __syncthreads();
    if (s.layer[0].q.nf4) nf4_mma_tables(s.pairs, s.dyn); // every projection of the model in one form
    int r0, r1;
    unsigned int* lora_count = sync + 2 + heads + 2 * gridDim.x; // after the blocks' pairs
    unsigned long long* clock = times ? times + (long long)blockIdx.x * TOK_READINGS(n_layers) : nullptr; // the block's readings
    if (clock && threadIdx.x == 0) clock[0] = tok_now();
    for (int l = 0; l < n_layers; l++) {
        const tok_layer& L = s.layer[l & 1];
        const float* cosv = rope + L.rope * HD;
        const float* sinv = cosv + HD / 2;

        // A: the block's input, its norm, and q, k, v. The q and k norms'
        // weights, which phase B applies on its critical path, are loaded
        // here with A's inputs.
        constexpr int QKN = (2 * HD + TOK_THREADS - 1) / TOK_THREADS; // values a thread
        float qkn[QKN];
        #pragma unroll
        for (int k = 0; k < QKN; k++) {
            const int i = threadIdx.x + k * TOK_THREADS;
            qkn[k] = i < HD ? L.q_norm[i] : i < 2 * HD ? L.k_norm[i - HD] : 0.0f;
        }
        if (l == 0) {
            for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
                s.x[i] = to_f32(to_act(to_f32(embed[(long long)id * hidden + i]) * embed_scale));
                s.nw[hidden + i] = L.in_norm[i];
            }
            __syncthreads();
        } else {
            tok_load_inputs(db, s.v, x1b, s.x, s.layer[(l - 1) & 1].post_ff, L.in_norm, hidden, s.nw);
            __syncthreads();
            tok_norm(s.v, s.nw, hidden, eps, true, s.x, s.red);
        }
        if (blockIdx.x == 0) tok_store(xb, hidden, s.x);
        tok_norm(s.x, s.nw + hidden, hidden, eps, false, s.v, s.red);
        #pragma unroll
        for (int k = 0; k < QKN; k++) {
            const int i = threadIdx.x + k * TOK_THREADS;
            if (i < 2 * HD) s.qkn[i] = qkn[k];
        }
        const tok_lora* lo = LORA ? loras + 7 * l : nullptr; // q, k, v, o, gate, up, down
        if (LORA) tok_lora_start<3>(lo, s, hidden, rank, xa, lora_count);
        tok_product<1, LORA, true>(
            {{{&L.q}, {&L.k}, {&L.v}}, {qrows, kvrows, kvrows}, 3}, hidden, s,
            [&](int r, const float* sum) {
                if (!LORA) {
                    qkv[r] = to_act(sum[0]);
                    return;
                }
                const int m = r < qrows ? 0 : r < qrows + kvrows ? 1 : 2, first = m == 0 ? 0 : m == 1 ? qrows : qrows + kvrows;
                qkv[r] = tok_lora_out(sum[0], lo[m].b, r - first, s.xa + m * rank, rank, lora_scale);
            },
            [&]() { tok_lora_ready<3>(s, xa, rank, lora_count, 4 * l + 1); });
        tok_grid_sync(sync, P * l + bA, clock);

        // B: attention, and the next layer's entry on its way.
        if (l + 1 < n_layers) tok_layer_fetch(layers, l + 1, s.layer);
        tok_attention(L, qkv, att, recs, sync + 1, sq, p, heads, kv_heads, group, eps, attn_scale, cosv, sinv, s);
        tok_grid_sync(sync, P * l + bB, clock);

        // C: the o projection.
        tok_load(att, qrows, s.v);
        __syncthreads();
        if (LORA) tok_lora_start<1>(lo + 3, s, qrows, rank, xa, lora_count);
        tok_product<1, LORA, true>(
            {{{&L.o}}, {hidden}, 1}, qrows, s,
            [&](int r, const float* sum) { ob[r] = LORA ? tok_lora_out(sum[0], lo[3].b, r, s.xa, rank, lora_scale) : to_act(sum[0]); },
            [&]() { tok_lora_ready<1>(s, xa, rank, lora_count, 4 * l + 2); });
        tok_grid_sync(sync, P * l + bC, clock);

        // D: the residual, the MLP's norm, gate and up through GeGLU.
        tok_load_inputs(ob, s.v, xb, s.x, L.post_attn, L.pre_ff, hidden, s.nw);
        __syncthreads();
        tok_norm(s.v, s.nw, hidden, eps, true, s.x, s.red);
        if (blockIdx.x == 0) tok_store(x1b, hidden, s.x);
        tok_norm(s.x, s.nw + hidden, hidden, eps, false, s.v, s.red);
        if (LORA) tok_lora_start<2>(lo + 4, s, hidden, rank, xa, lora_count);
        tok_product<2, LORA, true>(
            {{{&L.gate, &L.up}}, {inter}, 1}, hidden, s,
            [&](int r, const float* sum) {
                const float g = to_f32(LORA ? tok_lora_out(sum[0], lo[4].b, r, s.xa, rank, lora_scale) : to_act(sum[0]));
                const float u = to_f32(LORA ? tok_lora_out(sum[1], lo[5].b, r, s.xa + rank, rank, lora_scale) : to_act(sum[1]));
                float sg, dz;
                gelu_parts(g, &sg, &dz);
                actb[r] = to_act(g * sg * u);
            },
            [&]() { tok_lora_ready<2>(s, xa, rank, lora_count, 4 * l + 3); });
        tok_grid_sync(sync, P * l + bD, clock);

        // E: the down projection.
        tok_load(actb, inter, s.v);
        __syncthreads();
        if (LORA) tok_lora_start<1>(lo + 6, s, inter, rank, xa, lora_count);
        tok_product<1, LORA>(
            {{{&L.down}}, {hidden}, 1}, inter, s,
            [&](int r, const float* sum) { db[r] = LORA ? tok_lora_out(sum[0], lo[6].b, r, s.xa, rank, lora_scale) : to_act(sum[0]); },
            [&]() { tok_lora_ready<1>(s, xa, rank, lora_count, 4 * l + 4); });
        tok_layer_wait(); // the barrier's __syncthreads shows the next layer's entry to the block
        tok_grid_sync(sync, P * l + bE, clock);
    }

    // F: the last block's residual and the final norm (every block, as in
    // A), then the lm_head over the block's slice of the vocabulary: the
    // logits, and the block's most likely token (the lowest id among
    // equals, as argmax_rows); the last block to finish picks the step's.
    tok_load_inputs(db, s.v, x1b, s.x, s.layer[(n_layers - 1) & 1].post_ff, final_norm, hidden, s.nw);
    __syncthreads();
    tok_norm(s.v, s.nw, hidden, eps, true, s.x, s.red);
    tok_norm(s.x, s.nw + hidden, hidden, eps, false, s.v, s.red);
    if (blockIdx.x == 0) tok_store(xf, hidden, s.v);
    const int none = 0x7fffffff;
    float bv = -INFINITY;
    int bi = none;
    // The slice's rows two at a time a warp (its first half beside its
    // second, as gate and up are read): a row is a few loads a lane, and a
    // warp that took one at a time waited on memory with most of its load
    // registers unused. Each row's sum is the same as alone.
    tok_slice(vocab, r0, r1);
    const int half = (r1 - r0 + 1) / 2;
    tok_rows<2>([&](int m, int r) { return reinterpret_cast<const uint4*>(embed) + (long long)min(r + m * half, r1 - 1) * hv; }, r0,
                r0 + half, hidden, s.v, s.part, [&](int r, const float* sum) {
                    #pragma unroll
                    for (int m = 0; m < 2; m++) {
                        const int rm = r + m * half;
                        if (rm >= r1) break; // the second half is one row shorter
                        logits[rm] = sum[m];
                        if (sum[m] > bv || (sum[m] == bv && rm < bi)) bv = sum[m], bi = rm;
                    }
                });
    tok_argmax(bv, bi, s);
    unsigned int* head_count = sync + 1 + heads;
    float* block_best = reinterpret_cast<float*>(head_count + 1); // per block: value, id
    if (threadIdx.x == 0) block_best[2 * blockIdx.x] = bv, reinterpret_cast<int*>(block_best)[2 * blockIdx.x + 1] = bi;
    if (clock && threadIdx.x == 0) clock[TOK_READINGS(n_layers) - 1] = tok_now();
    if (!last_block(head_count, gridDim.x, s.flag)) return;
    if (LORA && threadIdx.x == 0) *lora_count = 0; // every block is past its last wait
    bv = -INFINITY, bi = none;
    for (int b = threadIdx.x; b < gridDim.x; b += blockDim.x) {
        const float v = __ldcg(&block_best[2 * b]);
        const int i = __ldcg(reinterpret_cast<const int*>(block_best) + 2 * b + 1);
        if (v > bv || (v == bv && i < bi)) bv = v, bi = i;
    }
    tok_argmax(bv, bi, s);
    if (threadIdx.x == 0) *best = bi == none ? 0 : bi;
}

extern "C" __global__ void __launch_bounds__(TOK_THREADS, 1) decode_token(
    const tok_layer* __restrict__ layers, int n_layers, const act_t* __restrict__ embed, float embed_scale,
    const float* __restrict__ final_norm, const int* __restrict__ step, act_t* __restrict__ work, float* __restrict__ recs,
    unsigned int* __restrict__ sync, act_t* __restrict__ xf, float* __restrict__ logits, int* __restrict__ best, int hidden, int heads,
    int kv_heads, int inter, int vocab, float eps, float attn_scale, unsigned long long* __restrict__ times) {
    decode_token_body<false>(layers, n_layers, embed, embed_scale, final_norm, step, work, recs, sync, xf, logits, best, hidden, heads,
                             kv_heads, inter, vocab, eps, attn_scale, times, nullptr, 0, 0.0f, nullptr);
}

extern "C" __global__ void __launch_bounds__(TOK_THREADS, 1) decode_token_lora(
    const tok_layer* __restrict__ layers, int n_layers, const act_t* __restrict__ embed, float embed_scale,
    const float* __restrict__ final_norm, const int* __restrict__ step, act_t* __restrict__ work, float* __restrict__ recs,
    unsigned int* __restrict__ sync, act_t* __restrict__ xf, float* __restrict__ logits, int* __restrict__ best, int hidden, int heads,
    int kv_heads, int inter, int vocab, float eps, float attn_scale, unsigned long long* __restrict__ times,
    const tok_lora* __restrict__ loras, int rank, float lora_scale, act_t* __restrict__ xa) {
    decode_token_body<true>(layers, n_layers, embed, embed_scale, final_norm, step, work, recs, sync, xf, logits, best, hidden, heads,
                            kv_heads, inter, vocab, eps, attn_scale, times, loras, rank, lora_scale, xa);
}
