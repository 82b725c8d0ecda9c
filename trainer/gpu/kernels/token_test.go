package kernels

import (
	"encoding/binary"
	"math"
	"regexp"
	"strings"
	"testing"

	"gemmaft/cuda"
	"gemmaft/trainer"
)

// TestTokenLayerLayout: EncodeTokenLayers writes token.cu's tok_layer and
// tok_mat as the kernel declares them, field by field and in order.
func TestTokenLayerLayout(t *testing.T) {
	src, err := files.ReadFile("token.cu")
	if err != nil {
		t.Fatal(err)
	}
	// fields lists a struct's declarations as "type name", in order.
	fields := func(name string) []string {
		body := regexp.MustCompile(`(?s)struct ` + name + ` \{(.*?)\};`).FindSubmatch(src)
		if body == nil {
			t.Fatalf("token.cu: no struct %s", name)
		}
		var out []string
		for _, line := range strings.Split(string(body[1]), "\n") {
			decl, _, _ := strings.Cut(line, "//")
			decl = strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(decl), ";"))
			if decl == "" {
				continue
			}
			names := strings.Split(decl, ",")
			first := strings.Fields(names[0])
			typ := strings.Join(first[:len(first)-1], " ")
			names[0] = first[len(first)-1]
			for _, n := range names {
				n = strings.TrimSpace(n)
				ty := typ
				if strings.HasPrefix(n, "*") {
					ty, n = typ+"*", strings.TrimPrefix(n, "*")
				}
				out = append(out, ty+" "+n)
			}
		}
		return out
	}
	wantMat := "const void* w|const unsigned char* absmax_q|const float* absmax2|float offset|int nf4|const uint4* tile_codes|const unsigned short* tile_aq"
	if got := strings.Join(fields("tok_mat"), "|"); got != wantMat {
		t.Errorf("tok_mat is %s; EncodeTokenLayers writes %s", got, wantMat)
	}
	wantLayer := "tok_mat q|tok_mat k|tok_mat v|tok_mat o|tok_mat gate|tok_mat up|tok_mat down|" +
		"const float* in_norm|const float* post_attn|const float* pre_ff|const float* post_ff|const float* q_norm|const float* k_norm|" +
		"act_t* kc|act_t* vc|int cache_len|int window|int rope|int pad"
	if got := strings.Join(fields("tok_layer"), "|"); got != wantLayer {
		t.Errorf("tok_layer is %s; EncodeTokenLayers writes %s", got, wantLayer)
	}

	m := func(i int) TokenMatrix {
		return TokenMatrix{Weights: cuda.DevicePtr(10 * i), AbsmaxQ: cuda.DevicePtr(10*i + 1), Absmax2: cuda.DevicePtr(10*i + 2), Offset: float32(i) / 4, NF4: i%2 == 1,
			TileCodes: cuda.DevicePtr(10*i + 3), TileAbsmaxQ: cuda.DevicePtr(10*i + 4)}
	}
	l := TokenLayer{Q: m(1), K: m(2), V: m(3), O: m(4), Gate: m(5), Up: m(6), Down: m(7), InputNorm: 101, PostAttnNorm: 102, PreFFNorm: 103,
		PostFFNorm: 104, QNorm: 105, KNorm: 106, KCache: 107, VCache: 108, CacheLen: 512, Window: -1, Rope: 1}
	b := EncodeTokenLayers([]TokenLayer{l, l})
	if len(b) != 2*416 {
		t.Fatalf("%d bytes for two layers, want %d", len(b), 2*416)
	}
	b = b[416:] // the second layer
	for i := range 7 {
		at := 48 * i
		for j := range 3 {
			if got := binary.LittleEndian.Uint64(b[at+8*j:]); got != uint64(10*(i+1)+j) {
				t.Errorf("matrix %d's pointer %d is %d, want %d", i, j, got, 10*(i+1)+j)
			}
		}
		if got := math.Float32frombits(binary.LittleEndian.Uint32(b[at+24:])); got != float32(i+1)/4 {
			t.Errorf("matrix %d's offset is %v", i, got)
		}
		if got := binary.LittleEndian.Uint32(b[at+28:]); got != uint32((i+1)%2) {
			t.Errorf("matrix %d's nf4 is %d", i, got)
		}
		for j := range 2 {
			if got := binary.LittleEndian.Uint64(b[at+32+8*j:]); got != uint64(10*(i+1)+3+j) {
				t.Errorf("matrix %d's tile pointer %d is %d, want %d", i, j, got, 10*(i+1)+3+j)
			}
		}
	}
	for j := range 8 {
		if got := binary.LittleEndian.Uint64(b[336+8*j:]); got != uint64(101+j) {
			t.Errorf("pointer %d after the matrices is %d, want %d", j, got, 101+j)
		}
	}
	for i, v := range []int32{512, -1, 1, 0} {
		if got := int32(binary.LittleEndian.Uint32(b[400+4*i:])); got != v {
			t.Errorf("int %d is %d, want %d", i, got, v)
		}
	}

	// decode_token_lora's table: tok_lora (A, B) for q, k, v, o, gate, up,
	// down, layer after layer.
	if got, want := strings.Join(fields("tok_lora"), "|"), "const act_t* a|const act_t* b"; got != want {
		t.Errorf("tok_lora is %s; EncodeTokenLoRA writes %s", got, want)
	}
	var table [2][7]TokenLoRA
	for l := range table {
		for i := range table[l] {
			table[l][i] = TokenLoRA{A: cuda.DevicePtr(100*l + 2*i + 1), B: cuda.DevicePtr(100*l + 2*i + 2)}
		}
	}
	lb := EncodeTokenLoRA(table[:])
	if len(lb) != 2*7*16 {
		t.Fatalf("%d bytes of LoRA table for two layers, want %d", len(lb), 2*7*16)
	}
	for k := range 2 * 7 * 2 {
		l, rest := k/14, k%14
		if got, want := binary.LittleEndian.Uint64(lb[8*k:]), uint64(100*l+rest+1); got != want {
			t.Errorf("LoRA table word %d is %d, want %d", k, got, want)
		}
	}
}

// TestTokenFits: decode_token takes the released Gemma 3 shapes on an
// H100's shared memory (with an adapter of rank 64 too), and refuses rows
// that are not whole 16-byte vectors, shared memory the device does not
// have, and with an NF4 base and an adapter k and v of part of a tile,
// saying which.
func TestTokenFits(t *testing.T) {
	h100 := cuda.DeviceInfo{MaxSharedOptin: 227 << 10}
	for _, preset := range []string{"1b", "4b", "12b", "27b"} {
		mc, err := trainer.Preset(preset)
		if err != nil {
			t.Fatal(err)
		}
		k := &Kernels{Prec: BF16, HeadDim: mc.HeadDim, sms: 132}
		for _, nf4 := range []bool{false, true} {
			for _, rank := range []int{0, 64} {
				sh := TokenShape{Hidden: mc.Hidden, Heads: mc.Heads, KVHeads: mc.KVHeads, Intermediate: mc.Intermediate, Layers: mc.Layers,
					MaxKeys: 4096, NF4: nf4, LoRARank: rank}
				if err := k.TokenFits(sh, h100); err != nil {
					t.Errorf("%s (NF4 %v, rank %d): %v", preset, nf4, rank, err)
				}
			}
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
	sh = TokenShape{Hidden: 1152 + 32, Heads: 4, KVHeads: 1, Intermediate: 6912, NF4: true}
	if err := k.TokenFits(sh, h100); err == nil || !strings.Contains(err.Error(), "64-blocks") {
		t.Errorf("NF4 rows of 1,184: %v", err)
	}
	sh = TokenShape{Hidden: 1152, Heads: 4, KVHeads: 1, Intermediate: 6912, NF4: true}
	if err := (&Kernels{Prec: F32, HeadDim: 256}).TokenFits(sh, h100); err == nil || !strings.Contains(err.Error(), "bf16") {
		t.Errorf("NF4 in the float32 test mode: %v", err)
	}
	sh = TokenShape{Hidden: 128, Heads: 8, KVHeads: 1, Intermediate: 256, NF4: true} // k and v of 8 rows
	if err := (&Kernels{Prec: BF16, HeadDim: 8}).TokenFits(sh, h100); err != nil {
		t.Errorf("NF4 k and v of 8 rows without an adapter: %v", err)
	}
	sh.LoRARank = 8
	if err := (&Kernels{Prec: BF16, HeadDim: 8}).TokenFits(sh, h100); err == nil || !strings.Contains(err.Error(), "16-row tiles") {
		t.Errorf("NF4 k and v of 8 rows with an adapter: %v", err)
	}
}

// TestEncodeTokenStep: the step's upload is laid out as decode_token reads
// it: the id, the sequence, the position and a pad, then for the sliding
// layers' table and the global layers' (L.rope 0 and 1) head_dim/2
// cosines and as many sines, at rope + L.rope·head_dim.
func TestEncodeTokenStep(t *testing.T) {
	cos := [2][]float32{{1, 2}, {5, 6}}
	sin := [2][]float32{{3, 4}, {7, 8}}
	got := EncodeTokenStep(17, 2, 300, false, cos, sin)
	k := &Kernels{Prec: BF16, HeadDim: 4}
	if want := k.TokenBuffers(TokenShape{Heads: 1, KVHeads: 1}).Step; int64(4*len(got)) != want {
		t.Fatalf("%d bytes, TokenBuffers sizes %d", 4*len(got), want)
	}
	if got[0] != 17 || got[1] != 2 || got[2] != 300 || got[3] != 0 {
		t.Errorf("header %v, want [17 2 300 0]", got[:4])
	}
	if picked := EncodeTokenStep(17, 2, 300, true, cos, sin); picked[3] != 1 {
		t.Errorf("a step of the last pick: flag %d, want 1", picked[3])
	}
	for rope := range 2 {
		for i := range 2 {
			c := math.Float32frombits(got[4+rope*4+i])
			s := math.Float32frombits(got[4+rope*4+2+i])
			if c != cos[rope][i] || s != sin[rope][i] {
				t.Errorf("table %d, %d: cos %v sin %v, want %v %v", rope, i, c, s, cos[rope][i], sin[rope][i])
			}
		}
	}
}
