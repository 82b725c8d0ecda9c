//go:build !amd64

package trainer

var hasFMA = false

func dotStrip2x4(x0, x1, w *float32, k, n int, out0, out1 *float32) {
	panic("dotStrip2x4 needs amd64")
}

func axpyRows64(grad, e *float32, k, n int, acc *float32) { panic("axpyRows64 needs amd64") }

func expBlock(x *float32, n int, shift float32) float32 { panic("expBlock needs amd64") }
