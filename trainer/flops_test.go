package trainer

import "testing"

// TestStepFLOPs counts a small case by hand: two examples of 3 and 2
// tokens, one sliding layer (window 2) and one global layer.
func TestStepFLOPs(t *testing.T) {
	c, _ := Preset("tiny")
	c.VocabSize, c.Hidden, c.Intermediate, c.Layers = 10, 4, 8, 2
	c.Heads, c.KVHeads, c.HeadDim, c.SlidingWindow = 2, 1, 2, 2
	c.LayerTypes = []LayerType{SlidingAttention, FullAttention}
	b, err := NewBatch([]PackedRow{{InputIDs: []int32{1, 2, 3, 4, 5}, Labels: []int32{-100, 2, 3, -100, 5}, SeqLengths: []int32{3, 2}}})
	if err != nil {
		t.Fatal(err)
	}
	lora := LoRAConfig{R: 1, Alpha: 1, Targets: []Module{QProj, OProj}}
	f := StepFLOPs(c, lora, b, true)
	// Projections per layer: q 4x4, k 2x4, v 2x4, o 4x4, gate 8x4, up 8x4, down 4x8 = 144.
	// Trained positions: targets at 0 (label 2), 1 (label 3), 3 (label 5) = 3.
	// Pairs: sliding (window 2) 1+2+2+1+2 = 8, global 1+2+3+1+2 = 9; h·H = 4.
	// LoRA on q and o: r·(in+out) = 1·(4+4) each, 16 per layer.
	proj := 2.0 * 5 * 144 * 2
	head := 2.0 * 3 * 10 * 4
	attn := 4.0 * (8 + 9)
	wantFwd := proj + head + 4*attn + 2*5*16*2
	wantBwd := proj + head + 8*attn + 4*5*16*2
	// The recomputation: the blocks without the o (4x4) and down (4x8)
	// projections, whose outputs the forward pass saves, and of the LoRA
	// products only q's by B (r·out = 4).
	wantRe := 2.0*5*(144-16-32)*2 + 4*attn + 2*5*4*2
	if f.Forward != wantFwd || f.Backward != wantBwd || f.Recompute != wantRe {
		t.Errorf("FLOPs %+v, want forward %v, backward %v, recompute %v", f, wantFwd, wantBwd, wantRe)
	}
	if got, want := DecodeStepBytes(c, false), 2.0*144*2+2*10*4; got != want {
		t.Errorf("bf16 decoding step reads %v bytes, want %v", got, want)
	}
	if got, want := DecodeStepBytes(c, true), 144*2*(0.5+1.0/64+4.0/(64*256))+2*10*4; got != want {
		t.Errorf("nf4 decoding step reads %v bytes, want %v", got, want)
	}
	if bw, ok := PeakBandwidth("NVIDIA H200"); !ok || bw != 4.8e12 {
		t.Errorf("H200 bandwidth %v, %v", bw, ok)
	}
	if p, ok := PeakBF16("NVIDIA H200"); !ok || p != 989e12 {
		t.Errorf("H200 peak %v, %v", p, ok)
	}
	if _, ok := PeakBF16("Some Future GPU"); ok {
		t.Error("an unknown GPU has a peak rate")
	}
}
