package gpu

import (
	"strings"
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

// TestLoRALayerBlocks: with 8-bit AdamW, layer l's state blocks are
// [layerBlock[l], layerBlock[l+1]), which the update of one layer at a
// time (pendingUpdate) launches over: every block of a layer's tensors
// inside its range, the ranges back to back over all the blocks.
func TestLoRALayerBlocks(t *testing.T) {
	c, _ := trainer.Preset("tiny")
	// At this rank some of the tiny model's tensors have 8-bit state and
	// some keep float32 moments.
	st, err := layoutLoRA(c, trainer.LoRAConfig{R: 100, Alpha: 8, Targets: trainer.AllModules}, trainer.OptimizerConfig{Name: "adamw_8bit"})
	if err != nil {
		t.Fatal(err)
	}
	small := 0
	for _, sl := range st.slots {
		if sl.small {
			small++
		}
	}
	if st.nblocks == 0 || small == 0 {
		t.Fatalf("%d blocks, %d tensors with float32 moments: want both kinds", st.nblocks, small)
	}
	if len(st.layerBlock) != c.Layers+1 || st.layerBlock[0] != 0 || st.layerBlock[c.Layers] != st.nblocks {
		t.Fatalf("layer blocks %v for %d layers and %d blocks", st.layerBlock, c.Layers, st.nblocks)
	}
	for _, sl := range st.slots {
		if sl.small {
			continue
		}
		if sl.block < st.layerBlock[sl.layer] || sl.block+sl.blocks > st.layerBlock[sl.layer+1] {
			t.Errorf("%s's blocks [%d, %d) are outside layer %d's [%d, %d)", sl.name, sl.block, sl.block+sl.blocks,
				sl.layer, st.layerBlock[sl.layer], st.layerBlock[sl.layer+1])
		}
	}
}

// TestLoRAFirstSwitch: PIPELINE_LORA_FIRST names the projections whose
// update is written before the frozen product, or all of them; unset
// means gate_proj and up_proj, "off" keeps PEFT's order everywhere, and a
// name that is not a projection is refused, naming it.
func TestLoRAFirstSwitch(t *testing.T) {
	for _, c := range []struct {
		env  string
		want [7]bool // trainer.AllModules order
	}{
		{"", [7]bool{false, false, false, false, true, true, false}},
		{"off", [7]bool{}},
		{"gate_proj,up_proj", [7]bool{false, false, false, false, true, true, false}},
		{"all", [7]bool{true, true, true, true, true, true, true}},
		{"q_proj, down_proj", [7]bool{true, false, false, false, false, false, true}},
	} {
		t.Setenv(LoRAFirstEnv, c.env)
		got, err := loraFirstModules()
		if err != nil || got != c.want {
			t.Errorf("%s=%q: %v, %v; want %v", LoRAFirstEnv, c.env, got, err, c.want)
		}
	}
	t.Setenv(LoRAFirstEnv, "gate_proj,mlp")
	if _, err := loraFirstModules(); err == nil || !strings.Contains(err.Error(), `"mlp"`) {
		t.Errorf("an unknown projection: %v", err)
	}
}
