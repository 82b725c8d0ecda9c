package kernels

import (
	"encoding/binary"
	"regexp"
	"strings"
	"testing"

	"gemmaft/cuda"
	"gemmaft/trainer"
)

// TestTokenLayerLayout: EncodeTokenLayers writes token.cu's tok_layer as
// the kernel declares it, field by field: its pointers in order, then its
// ints, and nothing the struct does not have.
func TestTokenLayerLayout(t *testing.T) {
	src, err := files.ReadFile("token.cu")
	if err != nil {
		t.Fatal(err)
	}
	body := regexp.MustCompile(`(?s)struct tok_layer \{(.*?)\};`).FindSubmatch(src)
	if body == nil {
		t.Fatal("token.cu: no struct tok_layer")
	}
	var ptrs, ints []string
	for _, line := range strings.Split(string(body[1]), "\n") {
		decl, _, _ := strings.Cut(line, "//")
		decl = strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(decl), ";"))
		if decl == "" {
			continue
		}
		for _, name := range strings.Split(decl, ",") {
			name = strings.TrimSpace(name)
			fields := strings.Fields(name)
			name = fields[len(fields)-1]
			if strings.HasPrefix(name, "*") {
				ptrs = append(ptrs, strings.TrimPrefix(name, "*"))
			} else {
				ints = append(ints, name)
			}
		}
	}
	want := []string{"q", "k", "v", "o", "gate", "up", "down", "in_norm", "post_attn", "pre_ff", "post_ff", "q_norm", "k_norm", "kc", "vc"}
	if strings.Join(ptrs, " ") != strings.Join(want, " ") {
		t.Errorf("tok_layer's pointers are %v; EncodeTokenLayers writes %v", ptrs, want)
	}
	if strings.Join(ints, " ") != "cache_len window rope pad" {
		t.Errorf("tok_layer's ints are %v; EncodeTokenLayers writes cache_len window rope pad", ints)
	}
	l := TokenLayer{Q: 1, K: 2, V: 3, O: 4, Gate: 5, Up: 6, Down: 7, InputNorm: 8, PostAttnNorm: 9, PreFFNorm: 10, PostFFNorm: 11,
		QNorm: 12, KNorm: 13, KCache: 14, VCache: 15, CacheLen: 512, Window: -1, Rope: 1}
	b := EncodeTokenLayers([]TokenLayer{l, l})
	if len(b) != 2*tokenLayerBytes {
		t.Fatalf("%d bytes for two layers, want %d", len(b), 2*tokenLayerBytes)
	}
	for i := range 15 {
		if got := binary.LittleEndian.Uint64(b[tokenLayerBytes+8*i:]); got != uint64(i+1) {
			t.Errorf("the second layer's pointer %d (%s) is %d, want %d", i, want[i], got, i+1)
		}
	}
	for i, v := range []int32{512, -1, 1, 0} {
		if got := int32(binary.LittleEndian.Uint32(b[tokenLayerBytes+120+4*i:])); got != v {
			t.Errorf("the second layer's int %d is %d, want %d", i, got, v)
		}
	}
}

// TestTokenFits: decode_token takes the released Gemma 3 shapes on an
// H100's shared memory, and refuses rows that are not whole 16-byte
// vectors and shared memory the device does not have, saying which.
func TestTokenFits(t *testing.T) {
	h100 := cuda.DeviceInfo{MaxSharedOptin: 227 << 10}
	for _, preset := range []string{"1b", "4b", "12b", "27b"} {
		mc, err := trainer.Preset(preset)
		if err != nil {
			t.Fatal(err)
		}
		k := &Kernels{Prec: BF16, HeadDim: mc.HeadDim}
		sh := TokenShape{Hidden: mc.Hidden, Heads: mc.Heads, KVHeads: mc.KVHeads, Intermediate: mc.Intermediate, Layers: mc.Layers, MaxKeys: 4096}
		if err := k.TokenFits(sh, h100); err != nil {
			t.Errorf("%s: %v", preset, err)
		}
	}
	k := &Kernels{Prec: BF16, HeadDim: 256}
	sh := TokenShape{Hidden: 1150, Heads: 4, KVHeads: 1, Intermediate: 6912}
	if err := k.TokenFits(sh, h100); err == nil || !strings.Contains(err.Error(), "hidden 1150") {
		t.Errorf("hidden 1150: %v", err)
	}
	sh = TokenShape{Hidden: 5376, Heads: 32, KVHeads: 16, Intermediate: 21504}
	if err := k.TokenFits(sh, cuda.DeviceInfo{MaxSharedOptin: 48 << 10}); err == nil || !strings.Contains(err.Error(), "shared memory") {
		t.Errorf("48 KiB of shared memory at the 27B shape: %v", err)
	}
	sh = TokenShape{Hidden: 1152, Heads: 4, KVHeads: 3, Intermediate: 6912}
	if err := k.TokenFits(sh, h100); err == nil {
		t.Errorf("4 heads over 3 key/value heads fit")
	}
}
