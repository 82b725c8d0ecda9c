// Baseline for the Go launch benchmark: host time per cuLaunchKernel when
// called from C, for the same empty kernel, grid and arguments, on a
// non-blocking stream. Built and run by bench-gpu.py when nvcc is present:
//   nvcc -O2 -arch=sm_90 bench-launch.cu -lcuda -o bench-launch
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cuda.h>
#include <cuda_runtime.h>
#include <vector>

extern "C" __global__ void noop(float* p, int n) {
    if (n < 0) p[0] = 0.0f;
}

#define CHECK(x)                                                          \
    do {                                                                  \
        CUresult r_ = (x);                                                \
        if (r_ != CUDA_SUCCESS) {                                         \
            const char* name = nullptr;                                   \
            cuGetErrorName(r_, &name);                                    \
            std::fprintf(stderr, "%s: %s\n", #x, name ? name : "?");     \
            return 1;                                                     \
        }                                                                 \
    } while (0)

int main() {
    cudaFree(nullptr); // creates the primary context and makes it current
    cudaFunction_t rf;
    if (cudaGetFuncBySymbol(&rf, (const void*)noop) != cudaSuccess) {
        std::fprintf(stderr, "cudaGetFuncBySymbol failed\n");
        return 1;
    }
    CUfunction f = (CUfunction)rf;
    CUstream s;
    CHECK(cuStreamCreate(&s, CU_STREAM_NON_BLOCKING));
    float* p = nullptr;
    int n = 1;
    void* args[] = {&p, &n};
    const int launches = 1000, reps = 30;
    std::vector<double> perLaunch;
    for (int r = 0; r < reps + 2; r++) {
        auto t0 = std::chrono::steady_clock::now();
        for (int i = 0; i < launches; i++) {
            CHECK(cuLaunchKernel(f, 1, 1, 1, 32, 1, 1, 0, s, args, nullptr));
        }
        auto t1 = std::chrono::steady_clock::now();
        CHECK(cuStreamSynchronize(s));
        if (r >= 2) perLaunch.push_back(std::chrono::duration<double, std::nano>(t1 - t0).count() / launches);
    }
    std::sort(perLaunch.begin(), perLaunch.end());
    std::printf("c-host-ns/launch %.0f\n", perLaunch[perLaunch.size() / 2]);
    return 0;
}
