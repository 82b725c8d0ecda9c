package kernels

import (
	"bytes"
	"errors"
	"testing"

	"gemmaft/cuda"
)

// TestCompileForEveryArchitecture builds every kernel file, in both
// precisions and for the head dimensions of Gemma 3 (256, 128) and of the
// test models, for each architecture the GPU backend supports: A100
// (sm_80), RTX 30 (sm_86), RTX 40 (sm_89), H100/H200 (sm_90). It needs
// NVRTC only, no GPU, and skips where NVRTC is not installed.
func TestCompileForEveryArchitecture(t *testing.T) {
	if lib := cuda.Discover().NVRTC; !lib.Found() {
		t.Skipf("no NVRTC: %v", lib.Err)
	}
	for _, arch := range []string{"sm_80", "sm_86", "sm_89", "sm_90"} {
		for _, p := range []Precision{BF16, F32} {
			for _, hd := range []int{256, 128, 16, 8, 4, 2} {
				if testing.Short() && hd != 256 {
					continue
				}
				srcs, err := Sources(p, hd)
				if err != nil {
					t.Fatal(err)
				}
				for _, src := range srcs {
					if hd != 256 && src.Name != "attention.cu" && src.Name != "token.cu" {
						continue
					}
					bin, err := cuda.CompileForArch(src, arch)
					if err != nil {
						var ne *cuda.NVRTCError
						if errors.As(err, &ne) {
							t.Fatalf("%s %s head_dim %d %s:\n%s", src.Name, p, hd, arch, ne.Log)
						}
						t.Fatalf("%s %s head_dim %d %s: %v", src.Name, p, hd, arch, err)
					}
					// Every kernel Load will look up by the name kernelNames
					// reads from the source is a symbol of the module.
					for _, name := range kernelNames(src.Code) {
						if !bytes.Contains(bin, []byte("\x00"+name+"\x00")) {
							t.Errorf("%s %s head_dim %d %s: no kernel %q in the module", src.Name, p, hd, arch, name)
						}
					}
				}
			}
		}
	}
}

func TestKernelNames(t *testing.T) {
	srcs, err := Sources(BF16, 256)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for _, src := range srcs {
		names := kernelNames(src.Code)
		if len(names) == 0 {
			t.Errorf("%s: no kernels found", src.Name)
		}
		for _, n := range names {
			if seen[n] {
				t.Errorf("kernel %s defined twice", n)
			}
			seen[n] = true
		}
	}
	for _, want := range []string{"attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq", "rms_norm_fwd", "adam8_step", "nf4_dequantize",
		"nf4_gemv", "nf4_gemv_mma", "nf4_gemv_mma_tiled", "nf4_tile_repack", "gemv_mma", "decode_token", "stored_to_act", "random_normal_bf16"} {
		if !seen[want] {
			t.Errorf("kernel %s not found", want)
		}
	}
}
