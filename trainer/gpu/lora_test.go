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
