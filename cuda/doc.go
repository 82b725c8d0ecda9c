// Package cuda runs work on NVIDIA GPUs without cgo.
//
// The CUDA driver (libcuda.so.1), NVRTC and cuBLASLt are opened at run time
// with purego, so a binary built with CGO_ENABLED=0 uses the GPU wherever
// those libraries are found and falls back to the CPU everywhere else.
// Discover reports where each library was looked for and found; Open returns
// an error wrapping ErrUnavailable when the GPU cannot be used, so callers
// can choose their CPU path without guessing.
//
// A CUDA context is bound to one OS thread. A Device therefore owns a
// goroutine locked to its OS thread, and every driver call runs there: work
// is submitted as a function to Device.Do, which hands it a *Ctx. Ctx
// methods refuse to run outside Do, so the threading rule cannot be broken
// by accident. Device pointers (DevicePtr, Buffer) are plain values that
// may be passed between goroutines freely.
//
// What the package offers on a Ctx:
//
//   - memory: Alloc/Free through a caching allocator (Stats), pinned host
//     memory (AllocHost), synchronous and stream-ordered copies, memsets;
//   - streams, events (for timing) and captured CUDA graphs;
//   - kernels: Compile turns CUDA C++ source into a Module with NVRTC for the
//     device's own architecture, caching the cubin on disk under the SHA-256
//     of everything that affects it; Launch checks argument count and sizes
//     against the kernel's signature before launching;
//   - Matmul: bf16 and fp32 GEMMs through cuBLASLt with fp32 accumulation,
//     row-major, with transposes, leading dimensions and strided batches;
//     the heuristic's choice is cached per shape.
//
// Costs to plan for: each Do is a hand-off to another OS thread and back
// (microseconds), so a training step should be one Do, not one per
// operation; each kernel launch costs a few microseconds of host time, so a
// step of many small kernels should be captured once as a Graph and
// replayed. The allocator reuses a freed block at once, which is safe for
// work ordered on one stream; code that shares buffers between streams
// synchronises before freeing.
//
// Host-side bfloat16 conversions live in gemmaft/internal/half, shared
// with the safetensors codec.
package cuda
