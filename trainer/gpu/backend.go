// Package gpu is the CUDA backend of the trainer: the CPU reference's
// Gemma 3 model, step for step, on one NVIDIA GPU through package cuda.
//
// Importing the package registers the backend "cuda" with package trainer,
// whose training loop drives it through trainer.Session. Weights stream
// from the checkpoint tensor by tensor and are quantised to NF4 on the
// device; activations and GEMM operands are bfloat16 (float32 in the test
// mode SessionConfig.Precision "fp32"), GEMMs run in cuBLASLt with float32
// accumulation, and norms, softmax, attention and the loss compute in
// float32. The LoRA weights, their gradients and the optimizer state are
// float32 (8-bit for adamw_8bit) and stay on the device; they are copied to
// the host only for checkpoints and the final adapter.
//
// Every reduction sums in an order fixed by the shapes (no atomics), so the
// same inputs give bit-identical results on the same GPU model.
package gpu

import (
	"context"
	"fmt"
	"sync"

	"gemmaft/cuda"
	"gemmaft/trainer"
)

func init() { trainer.RegisterBackend(backend{}) }

type backend struct{}

func (backend) Name() string { return "cuda" }

// MinComputeCapability is the oldest architecture the kernels are built
// and tested for (A100: 8.0; bfloat16 tensor cores).
const MinComputeCapability = 80

var (
	usableOnce sync.Once
	usableErr  error
)

// Usable reports whether a GPU the backend can train on is present: the
// CUDA libraries load, the driver starts, and device 0 is sm_80 or newer.
func (backend) Usable() error {
	usableOnce.Do(func() {
		rep := cuda.Discover()
		if rep.Err != nil {
			usableErr = rep.Err
			return
		}
		d := rep.Devices[0]
		if d.Major*10+d.Minor < MinComputeCapability {
			usableErr = fmt.Errorf("%s is compute capability %d.%d; the GPU trainer needs 8.0 or newer (A100, RTX 30/40, H100/H200)",
				d.Name, d.Major, d.Minor)
		}
	})
	return usableErr
}

func (b backend) Open(ctx context.Context, cfg trainer.SessionConfig) (trainer.Session, error) {
	if err := b.Usable(); err != nil {
		return nil, err
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	ck, err := trainer.OpenCheckpoint(cfg.Model)
	if err != nil {
		return nil, err
	}
	return Open(ctx, ck, cfg)
}

// OpenDecoder loads cfg's model for decoding on the GPU, in bf16.
func (b backend) OpenDecoder(ctx context.Context, cfg trainer.DecoderConfig) (trainer.Decoder, error) {
	if err := b.Usable(); err != nil {
		return nil, err
	}
	return openDecoder(ctx, cfg, "")
}
