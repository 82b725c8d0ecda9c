package trainer

import "golang.org/x/sys/cpu"

// hasFMA reports AVX2 with fused multiply-add, which the lm_head kernels in
// kernels_amd64.s need.
var hasFMA = cpu.X86.HasAVX2 && cpu.X86.HasFMA

//go:noescape
func dotStrip2x4(x0, x1, w *float32, k, n int, out0, out1 *float32)

//go:noescape
func axpyRows64(grad, e *float32, k, n int, acc *float32)

//go:noescape
func expBlock(x *float32, n int, shift float32) float32
