package gguf

import (
	"encoding/json"
	"path/filepath"
	"sort"
	"strconv"
	"testing"

	"gemmaft/internal/testenv"
	"gemmaft/trainer"
)

// quantShapes are random checkpoints whose rows exercise each rule of
// llama.cpp's choice of tensor types. "kq" has 256-value rows (q, k, v,
// gate, up, the embedding: k-quants), 512 (down) and 160 (attention
// output: a 32-value type where a k-quant does not fit), and nine layers,
// so that the *_k_m mixes' layers (the first and last eighth and every
// third between) and *_k_s's first four differ from the rest. "tiny-odd",
// the tiny preset with 18-value heads, has an embedding of 64-value rows
// (q8_0 instead of q6_K, as for the 1B's 1152) and attention output rows
// of 72, which fit no block (f16).
func quantShapes(t *testing.T) map[string]*trainer.Config {
	kq, err := trainer.Preset("tiny")
	if err != nil {
		t.Fatal(err)
	}
	kq.Hidden, kq.Intermediate, kq.HeadDim, kq.QueryPreAttnScalar = 256, 512, 40, 40
	kq.Layers, kq.LayerTypes = 9, nil
	for i := 0; i < kq.Layers; i++ {
		lt := trainer.SlidingAttention
		if (i+1)%6 == 0 {
			lt = trainer.FullAttention
		}
		kq.LayerTypes = append(kq.LayerTypes, lt)
	}
	odd, _ := trainer.Preset("tiny")
	odd.HeadDim, odd.QueryPreAttnScalar = 18, 18
	return map[string]*trainer.Config{"kq": kq, "tiny-odd": odd}
}

type oracleTensors struct {
	FileType FileType
	Tensors  []struct {
		Name   string
		Type   Type
		SHA256 string
	}
}

func readTensors(t *testing.T, path string) oracleTensors {
	t.Helper()
	var ts oracleTensors
	if err := json.Unmarshal(oracle(t, nil, "tensors", path), &ts); err != nil {
		t.Fatal(err)
	}
	sort.Slice(ts.Tensors, func(i, j int) bool { return ts.Tensors[i].Name < ts.Tensors[j].Name })
	return ts
}

// TestQuantizeAsLlamaCpp: for each quantised file type, our file has
// llama.cpp's general.file_type, and each of its tensors the type and the
// bytes that llama.cpp's quantiser (llama_model_quantize, what
// llama-quantize runs, on our bf16 file of the same checkpoint) gives it.
func TestQuantizeAsLlamaCpp(t *testing.T) {
	testenv.LlamaOracle(t)
	shapes := quantShapes(t)
	for _, shape := range []struct {
		name  string
		types []FileType
	}{
		{"kq", []FileType{MostlyQ4_K_M, MostlyQ4_K_S, MostlyQ5_K_M, MostlyQ5_K_S, MostlyQ6_K, MostlyQ5_0, MostlyQ5_1, MostlyQ4_0, MostlyQ8_0}},
		{"tiny-odd", []FileType{MostlyQ4_K_M, MostlyQ8_0}},
	} {
		dir := checkpointOf(t, shapes[shape.name], shape.name)
		bf16 := convert(t, dir, MostlyBF16)
		for _, ft := range shape.types {
			t.Run(shape.name+"/"+ft.String(), func(t *testing.T) {
				ours := convert(t, dir, ft)
				theirs := filepath.Join(t.TempDir(), "llama."+ft.String()+".gguf")
				oracle(t, nil, "quantize", bf16, theirs, strconv.Itoa(int(ft)))
				got, want := readTensors(t, ours), readTensors(t, theirs)
				if got.FileType != ft || want.FileType != ft {
					t.Errorf("general.file_type: ours %d, llama.cpp's %d, want %d", got.FileType, want.FileType, ft)
				}
				if len(got.Tensors) != len(want.Tensors) {
					t.Fatalf("%d tensors, llama.cpp's file has %d", len(got.Tensors), len(want.Tensors))
				}
				types := map[Type]int{}
				for i, w := range want.Tensors {
					types[w.Type]++
					if g := got.Tensors[i]; g != w {
						t.Errorf("%s: %s %.12s…, llama.cpp's %s: %s %.12s…", g.Name, g.Type, g.SHA256, w.Name, w.Type, w.SHA256)
					}
				}
				t.Logf("tensor types: %v", types)
			})
		}
	}
}

func BenchmarkEncode(b *testing.B) {
	x := make([]float32, 1<<20)
	for i := range x {
		x[i] = float32(i%977)/977 - 0.5
	}
	for _, typ := range []Type{Q8_0, Q4_0, Q5_0, Q4_K, Q5_K, Q6_K} {
		b.Run(typ.String(), func(b *testing.B) {
			b.SetBytes(int64(4 * len(x)))
			var dst []byte
			for i := 0; i < b.N; i++ {
				dst, _ = Encode(dst[:0], typ, x)
			}
		})
	}
}
