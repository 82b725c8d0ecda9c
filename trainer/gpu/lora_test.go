package gpu

import (
	"testing"

	"gemmaft/trainer"
)

// TestLoRALayerRanges: the all-reduce's buckets, one per layer, hold
// exactly that layer's tensors and together the whole gradient buffer.
func TestLoRALayerRanges(t *testing.T) {
	c, _ := trainer.Preset("tiny")
	for _, targets := range [][]trainer.Module{trainer.AllModules, {trainer.VProj, trainer.DownProj}} {
		st, err := layoutLoRA(c, trainer.LoRAConfig{R: 4, Alpha: 8, Targets: targets}, trainer.OptimizerConfig{Name: "adamw"})
		if err != nil {
			t.Fatal(err)
		}
		if len(st.layerStart) != c.Layers+1 || st.layerStart[0] != 0 || st.layerStart[c.Layers] != st.total {
			t.Fatalf("layer starts %v for %d layers and %d elements", st.layerStart, c.Layers, st.total)
		}
		for _, sl := range st.slots {
			if sl.offset < st.layerStart[sl.layer] || sl.offset+sl.n > st.layerStart[sl.layer+1] {
				t.Errorf("%s [%d, %d) is outside layer %d's range [%d, %d)", sl.name, sl.offset, sl.offset+sl.n,
					sl.layer, st.layerStart[sl.layer], st.layerStart[sl.layer+1])
			}
		}
	}
}

// TestNF4ProductChoice: only a session that infers reads NF4 weights
// directly, for the few tokens of a decoding step and rows the kernel
// takes; a training session's forward pass keeps the dequantised GEMM its
// backward pass mirrors.
func TestNF4ProductChoice(t *testing.T) {
	nf4 := projection{out: 4096, in: 3840, nf4: true}
	for _, c := range []struct {
		what      string
		inference bool
		p         projection
		tokens    int
		want      bool
	}{
		{"decoding step of one", true, nf4, 1, true},
		{"decoding step of eight", true, nf4, NF4StepTokens, true},
		{"decoding step of nine", true, nf4, NF4StepTokens + 1, false},
		{"training forward pass", false, nf4, 1, false},
		{"dense weights", true, projection{out: 4096, in: 3840}, 1, false},
		{"rows of 48", true, projection{out: 32, in: 48, nf4: true}, 1, false},
	} {
		s := &session{cfg: trainer.SessionConfig{Inference: c.inference}}
		if got := s.nf4GEMV(c.tokens, &c.p); got != c.want {
			t.Errorf("%s: reads NF4 directly %v, want %v", c.what, got, c.want)
		}
	}
}
