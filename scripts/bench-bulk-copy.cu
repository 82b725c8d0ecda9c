// How fast one block of 512 threads per multiprocessor (decode_token's
// shape) streams memory into registers or shared memory, by method: the
// question behind decode_token's weight ring (trainer/gpu/NOTES.md,
// "Decoding: the tile copy for steps of 2–8, and three changes that
// lost"), which read its weights through bulk copies at ~1.4 TB/s where
// the loads of tok_rows reach ~2.5 TB/s.
//
//   nvcc -O3 -std=c++17 -arch=sm_90 -o bench-bulk-copy scripts/bench-bulk-copy.cu && ./bench-bulk-copy
//
// Each block reads its own contiguous slice of a 2 GiB buffer once (far
// past the L2), and every method reads every byte into a sum the host
// checks, so that none is optimised away:
//   loads       each lane 8 loads of 16 bytes in flight, as tok_rows
//   ring        cp.async.bulk into a ring of stages × bytes of shared
//               memory, each stage refilled by the last of the 16 warps
//               to finish reading it (as decode_token_ring)
//   producer    the same ring, refilled by a warp that only copies, waiting
//               on an mbarrier the 15 reading warps arrive at
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <cuda_runtime.h>

#define WARPS 16
#define THREADS (WARPS * 32)

#define CHECK(x)                                                                            \
    do {                                                                                    \
        cudaError_t e = (x);                                                                \
        if (e != cudaSuccess) {                                                             \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); \
            exit(1);                                                                        \
        }                                                                                   \
    } while (0)

__device__ __forceinline__ unsigned int smem_addr(const void* p) { return (unsigned int)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void bar_init(unsigned long long* b, unsigned int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(b)), "r"(count) : "memory");
}

__device__ __forceinline__ void bar_wait(unsigned long long* b, unsigned int parity) {
    unsigned int done;
    do {
        asm volatile("{\n\t.reg .pred p;\n\tmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\tselp.u32 %0, 1, 0, p;\n\t}"
                     : "=r"(done)
                     : "r"(smem_addr(b)), "r"(parity)
                     : "memory");
    } while (!done);
}

__device__ __forceinline__ void bar_arrive(unsigned long long* b) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(b)) : "memory");
}

// bytes from src into dst, completing on mbarrier full.
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, unsigned int bytes, unsigned long long* full) {
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(full)), "r"(bytes) : "memory");
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(smem_addr(dst)),
                 "l"(__cvta_generic_to_global(src)), "r"(bytes), "r"(smem_addr(full))
                 : "memory");
}

__device__ __forceinline__ unsigned int fold(uint4 v) { return v.x ^ v.y ^ v.z ^ v.w; }

// The block's sum into out[blockIdx.x].
__device__ __forceinline__ void block_xor(unsigned int v, unsigned int* out) {
    __shared__ unsigned int part[WARPS];
    for (int o = 16; o > 0; o >>= 1) v ^= __shfl_xor_sync(0xffffffffu, v, o);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned int s = 0;
        for (int w = 0; w < WARPS; w++) s ^= part[w];
        out[blockIdx.x] = s;
    }
}

__global__ void __launch_bounds__(THREADS, 1) loads(const uint4* src, long long per_block, unsigned int* out) {
    const uint4* p = src + blockIdx.x * (per_block / 16);
    const long long n = per_block / 16;
    unsigned int acc = 0;
    for (long long g = threadIdx.x; g < n; g += THREADS * 8) {
        uint4 a[8];
        #pragma unroll
        for (int u = 0; u < 8; u++) a[u] = g + u * THREADS < n ? __ldg(p + g + u * THREADS) : make_uint4(0, 0, 0, 0);
        #pragma unroll
        for (int u = 0; u < 8; u++) acc ^= fold(a[u]);
    }
    block_xor(acc, out);
}

__global__ void __launch_bounds__(THREADS, 1) ring(const unsigned char* src, long long per_block, int stages, int bytes, unsigned int* out) {
    extern __shared__ __align__(128) unsigned char buf[];
    __shared__ unsigned long long full[64];
    __shared__ int count[64];
    const unsigned char* p = src + blockIdx.x * per_block;
    const int chunks = (int)(per_block / bytes), lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (threadIdx.x == 0) {
        for (int s = 0; s < stages; s++) bar_init(&full[s], 1), count[s] = 0;
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    if (threadIdx.x == 0)
        for (int j = 0; j < stages && j < chunks; j++) bulk_copy(buf + j * bytes, p + (long long)j * bytes, bytes, &full[j]);
    unsigned int acc = 0;
    const int per_warp = bytes / 16 / WARPS;
    for (int j = 0; j < chunks; j++) {
        const int s = j % stages;
        bar_wait(&full[s], (j / stages) & 1);
        const uint4* w = reinterpret_cast<const uint4*>(buf + s * bytes) + warp * per_warp;
        for (int g = lane; g < per_warp; g += 32) acc ^= fold(w[g]);
        int last = 0;
        if (lane == 0) {
            __threadfence_block();
            last = atomicAdd(&count[s], 1) == WARPS - 1;
        }
        if (__shfl_sync(0xffffffffu, last, 0) && lane == 0) {
            count[s] = 0;
            if (j + stages < chunks) bulk_copy(buf + s * bytes, p + (long long)(j + stages) * bytes, bytes, &full[s]);
        }
    }
    block_xor(acc, out);
}

__global__ void __launch_bounds__(THREADS, 1) producer(const unsigned char* src, long long per_block, int stages, int bytes, unsigned int* out) {
    extern __shared__ __align__(128) unsigned char buf[];
    __shared__ unsigned long long full[64], empty[64];
    const unsigned char* p = src + blockIdx.x * per_block;
    const int chunks = (int)(per_block / bytes), lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (threadIdx.x == 0) {
        for (int s = 0; s < stages; s++) bar_init(&full[s], 1), bar_init(&empty[s], WARPS - 1);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    unsigned int acc = 0;
    if (warp == WARPS - 1) { // the copying warp
        if (lane == 0)
            for (int j = 0; j < chunks; j++) {
                const int s = j % stages;
                if (j >= stages) bar_wait(&empty[s], ((j / stages) - 1) & 1);
                bulk_copy(buf + s * bytes, p + (long long)j * bytes, bytes, &full[s]);
            }
    } else {
        const int per_warp = bytes / 16 / (WARPS - 1);
        for (int j = 0; j < chunks; j++) {
            const int s = j % stages;
            bar_wait(&full[s], (j / stages) & 1);
            const uint4* w = reinterpret_cast<const uint4*>(buf + s * bytes) + warp * per_warp;
            for (int g = lane; g < per_warp; g += 32) acc ^= fold(w[g]);
            // The chunk's bytes past 15 warps' equal shares go to the last reader.
            if (warp == WARPS - 2)
                for (int g = (WARPS - 1) * per_warp + lane; g < bytes / 16; g += 32) acc ^= fold(reinterpret_cast<const uint4*>(buf + s * bytes)[g]);
            __syncwarp();
            if (lane == 0) bar_arrive(&empty[s]);
        }
    }
    block_xor(acc, out);
}

int main() {
    int dev = 0, sms = 0, smem = 0;
    CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    CHECK(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    const long long total = 2LL << 30;
    const long long per_block = total / sms / (64 << 10) * (64 << 10); // a whole number of 64 KiB
    unsigned char* src;
    unsigned int* out;
    CHECK(cudaMalloc(&src, total));
    CHECK(cudaMalloc(&out, sms * sizeof(unsigned int)));
    {
        std::vector<unsigned int> h(total / 4);
        for (size_t i = 0; i < h.size(); i++) h[i] = (unsigned int)(i * 2654435761u);
        CHECK(cudaMemcpy(src, h.data(), total, cudaMemcpyHostToDevice));
    }
    std::vector<unsigned int> want(sms);
    {
        std::vector<unsigned int> h(per_block / 4);
        for (int b = 0; b < sms; b++) {
            CHECK(cudaMemcpy(h.data(), src + b * per_block, per_block, cudaMemcpyDeviceToHost));
            unsigned int s = 0;
            for (unsigned int v : h) s ^= v;
            want[b] = s;
        }
    }
    for (auto k : {(const void*)ring, (const void*)producer}) CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem - 2048));
    cudaEvent_t t0, t1;
    CHECK(cudaEventCreate(&t0));
    CHECK(cudaEventCreate(&t1));
    auto run = [&](const char* name, int stages, int bytes, auto launch) {
        float best = 1e30f;
        for (int rep = 0; rep < 6; rep++) {
            CHECK(cudaMemset(out, 0, sms * sizeof(unsigned int)));
            CHECK(cudaEventRecord(t0));
            launch();
            CHECK(cudaEventRecord(t1));
            CHECK(cudaEventSynchronize(t1));
            CHECK(cudaGetLastError());
            float ms;
            CHECK(cudaEventElapsedTime(&ms, t0, t1));
            if (rep > 0 && ms < best) best = ms;
        }
        std::vector<unsigned int> got(sms);
        CHECK(cudaMemcpy(got.data(), out, sms * sizeof(unsigned int), cudaMemcpyDeviceToHost));
        int bad = 0;
        for (int b = 0; b < sms; b++) bad += got[b] != want[b];
        printf("%-9s %3d stages × %6d bytes (%4d KiB in flight): %6.2f TB/s (%5.1f GB/s a multiprocessor)%s\n", name, stages, bytes,
               stages * bytes >> 10, per_block * sms / (best * 1e-3) / 1e12, per_block / (best * 1e-3) / 1e9, bad ? "  WRONG SUMS" : "");
    };
    run("loads", 0, 0, [&] { loads<<<sms, THREADS>>>(reinterpret_cast<const uint4*>(src), per_block, out); });
    const int shapes[][2] = {{2, 32768}, {3, 32768}, {4, 32768}, {6, 32768}, {10, 16384}, {12, 16384}, {20, 8192}, {40, 4096}, {48, 4096}, {6, 16384}};
    for (auto& sh : shapes) {
        const int stages = sh[0], bytes = sh[1];
        if (stages * bytes > smem - 2048) continue;
        run("ring", stages, bytes, [&] { ring<<<sms, THREADS, stages * bytes>>>(src, per_block, stages, bytes, out); });
        run("producer", stages, bytes, [&] { producer<<<sms, THREADS, stages * bytes>>>(src, per_block, stages, bytes, out); });
    }
    return 0;
}
