package trainer

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"

	"gemmaft/internal/half"
	"gemmaft/trainer/safetensors"
)

func TestShardedAndPrefixedCheckpointsLoadAlike(t *testing.T) {
	c := tinyConfig()
	c.DType = "bfloat16"
	single, sharded, mm := t.TempDir(), t.TempDir(), t.TempDir()
	opts := InitOptions{Seed: 3, NormStd: 0.1}
	if err := WriteRandomCheckpoint(single, c, opts); err != nil {
		t.Fatal(err)
	}
	opts.MaxShardBytes = 20000
	if err := WriteRandomCheckpoint(sharded, c, opts); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(sharded, "model.safetensors.index.json")); err != nil {
		t.Fatalf("no index for a sharded checkpoint: %v", err)
	}
	mc := *c
	mc.Multimodal = true
	if err := WriteRandomCheckpoint(mm, &mc, InitOptions{Seed: 3, NormStd: 0.1, MaxShardBytes: 20000}); err != nil {
		t.Fatal(err)
	}
	a, err := LoadModel(single)
	if err != nil {
		t.Fatal(err)
	}
	for _, dir := range []string{sharded, mm} {
		b, err := LoadModel(dir)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(a.Embed, b.Embed) || !reflect.DeepEqual(a.Layers, b.Layers) || !reflect.DeepEqual(a.FinalNorm, b.FinalNorm) {
			t.Errorf("%s: weights differ from the single-file checkpoint", dir)
		}
	}
	// The files that hold the weights: the single file, else the index and
	// its shards. A single file beside an index is what transformers reads.
	if files, err := WeightFiles(single); err != nil || !slices.Equal(files, []string{filepath.Join(single, "model.safetensors")}) {
		t.Errorf("single-file weights %v (%v)", files, err)
	}
	files, err := WeightFiles(sharded)
	if err != nil || len(files) < 3 || files[0] != filepath.Join(sharded, "model-00001-of-"+fmt.Sprintf("%05d", len(files)-1)+".safetensors") || files[len(files)-1] != filepath.Join(sharded, "model.safetensors.index.json") {
		t.Errorf("sharded weights %v (%v)", files, err)
	}
	idx, _ := os.ReadFile(filepath.Join(sharded, "model.safetensors.index.json"))
	os.WriteFile(filepath.Join(single, "model.safetensors.index.json"), idx, 0o644) // names shards single lacks
	if both, err := LoadModel(single); err != nil || !reflect.DeepEqual(a.Embed, both.Embed) {
		t.Errorf("a single file beside an index: %v", err)
	}
	m, _ := LoadModel(mm)
	if m.Prefix != "language_model.model." || !m.Config.Multimodal {
		t.Errorf("multimodal checkpoint: prefix %q, multimodal %v", m.Prefix, m.Config.Multimodal)
	}
	// Writing is deterministic by seed.
	again := t.TempDir()
	WriteRandomCheckpoint(again, c, InitOptions{Seed: 3, NormStd: 0.1})
	x, _ := os.ReadFile(filepath.Join(single, "model.safetensors"))
	y, _ := os.ReadFile(filepath.Join(again, "model.safetensors"))
	if string(x) != string(y) {
		t.Error("two checkpoints written with one seed differ")
	}
}

// corrupt writes a fresh tiny checkpoint and lets f damage it.
func corrupt(t *testing.T, f func(dir string)) error {
	t.Helper()
	dir := t.TempDir()
	if err := WriteRandomCheckpoint(dir, tinyConfig(), InitOptions{Seed: 1}); err != nil {
		t.Fatal(err)
	}
	f(dir)
	_, err := LoadModel(dir)
	return err
}

func rewriteConfig(t *testing.T, dir, old, new string) {
	p := filepath.Join(dir, "config.json")
	b, _ := os.ReadFile(p)
	if !strings.Contains(string(b), old) {
		t.Fatalf("config has no %q", old)
	}
	os.WriteFile(p, []byte(strings.Replace(string(b), old, new, 1)), 0o644)
}

func TestBadCheckpoints(t *testing.T) {
	weights := func(dir string) string { return filepath.Join(dir, "model.safetensors") }
	cases := map[string]struct {
		damage func(t *testing.T, dir string)
		want   string
	}{
		"truncated": {func(t *testing.T, dir string) {
			st, _ := os.Stat(weights(dir))
			os.Truncate(weights(dir), st.Size()-100)
		}, "outside"},
		"header lies": {func(t *testing.T, dir string) {
			b, _ := os.ReadFile(weights(dir))
			n := binary.LittleEndian.Uint64(b)
			binary.LittleEndian.PutUint64(b, n+1000)
			os.WriteFile(weights(dir), b, 0o644)
		}, "outside"},
		"unknown dtype": {func(t *testing.T, dir string) {
			b, _ := os.ReadFile(weights(dir))
			s := strings.Replace(string(b), `"F32"`, `"F8_X"`, 1)
			os.WriteFile(weights(dir), []byte(s), 0o644)
		}, "unknown dtype"},
		"NaN weight": {func(t *testing.T, dir string) {
			f, err := safetensors.Open(weights(dir))
			if err != nil {
				t.Fatal(err)
			}
			info, _ := f.Header.Lookup("model.layers.3.mlp.up_proj.weight")
			off := f.Header.DataStart + info.Begin + 40
			f.Close()
			b, _ := os.ReadFile(weights(dir))
			binary.LittleEndian.PutUint32(b[off:], math.Float32bits(float32(math.NaN())))
			os.WriteFile(weights(dir), b, 0o644)
		}, "non-finite"},
		"more layers than weights": {func(t *testing.T, dir string) {
			rewriteConfig(t, dir, `"num_hidden_layers": 7`, `"num_hidden_layers": 8`)
			rewriteConfig(t, dir, `"full_attention",`, `"full_attention", "sliding_attention",`)
		}, "does not match"},
		"fewer layers in the config": {func(t *testing.T, dir string) {
			rewriteConfig(t, dir, `"num_hidden_layers": 7`, `"num_hidden_layers": 6`)
			rewriteConfig(t, dir, `"sliding_attention",`, ``)
		}, "the weights hold layer 6"},
		"other hidden size": {func(t *testing.T, dir string) {
			rewriteConfig(t, dir, `"hidden_size": 32`, `"hidden_size": 64`)
		}, "do not match"},
		"no weights": {func(t *testing.T, dir string) { os.Remove(weights(dir)) }, "no model.safetensors"},
		"not gemma": {func(t *testing.T, dir string) {
			b, _ := os.ReadFile(weights(dir))
			os.WriteFile(weights(dir), []byte(strings.ReplaceAll(string(b), "model.embed_tokens", "model.embed_tokenz")), 0o644)
		}, "not a Gemma 3 checkpoint"},
		"shard escapes": {func(t *testing.T, dir string) {
			os.Remove(weights(dir)) // an index beside model.safetensors goes unread, as in transformers
			os.WriteFile(filepath.Join(dir, "model.safetensors.index.json"), []byte(`{"weight_map": {"model.embed_tokens.weight": "../x.safetensors"}}`), 0o644)
		}, "leaves the checkpoint"},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			err := corrupt(t, func(dir string) { c.damage(t, dir) })
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("err = %v, want one mentioning %q", err, c.want)
			}
		})
	}
}

func TestAdapterRoundTripAndMismatch(t *testing.T) {
	c := tinyConfig()
	m := tinyModel(t, c)
	a, _ := NewAdapter(c, LoRAConfig{R: 2, Alpha: 4, Dropout: 0.1, Targets: []Module{QProj, DownProj}}, 1)
	randomizeB(a, 2)
	dir := t.TempDir()
	if err := m.SaveAdapter(dir, a, BaseModel{NameOrPath: "base"}); err != nil {
		t.Fatal(err)
	}
	f, err := safetensors.Open(filepath.Join(dir, AdapterWeightsFile))
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := f.Header.Lookup("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"); !ok {
		t.Error("PEFT key for Gemma3ForCausalLM missing")
	}
	f.Close()
	back, err := m.LoadAdapter(dir)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(back.Config, a.Config) {
		t.Errorf("config %+v, saved %+v", back.Config, a.Config)
	}
	for i, p := range a.Params() {
		if !reflect.DeepEqual(p.Data, back.Params()[i].Data) {
			t.Errorf("%s changed in the round trip", p.Name)
		}
	}
	other := tinyConfig()
	other.Layers, other.LayerTypes = 6, other.LayerTypes[:6]
	om := tinyModel(t, other)
	if _, err := om.LoadAdapter(dir); err == nil || !strings.Contains(err.Error(), "another model") {
		t.Errorf("adapter for 7 layers loaded into 6: %v", err)
	}
	// PEFT options an adapter of every layer's projections does not have
	// are named, not taken for another model.
	cfgPath := filepath.Join(dir, AdapterConfigFile)
	saved, _ := os.ReadFile(cfgPath)
	for field, want := range map[string]string{
		`"use_dora": true`:               "not supported: use_dora: true (DoRA); a plain LoRA adapter",
		`"bias": "lora_only"`:            `not supported: bias: "lora_only" (trained biases)`,
		`"layers_to_transform": [0, 1]`:  "layers_to_transform and modules_to_save are not supported",
		`"modules_to_save": ["lm_head"]`: "layers_to_transform and modules_to_save are not supported",
		`"r": "8"`:                       "adapter_config.json: r is a JSON string, want an integer",
	} {
		name := strings.SplitN(field, ":", 2)[0]
		edited := regexp.MustCompile(name+`: [^,\n]*(\[[^\]]*\])?`).ReplaceAllString(string(saved), field)
		if edited == string(saved) {
			t.Fatalf("adapter_config.json has no %s", name)
		}
		os.WriteFile(cfgPath, []byte(edited), 0o644)
		if _, err := m.LoadAdapter(dir); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v, want %q", field, err, want)
		}
	}
	os.WriteFile(cfgPath, saved, 0o644)
	// lora_alpha left out is PEFT's default, 8.
	os.WriteFile(cfgPath, regexp.MustCompile(`"lora_alpha": [^,\n]*,?\n`).ReplaceAll(saved, nil), 0o644)
	if a, err := m.LoadAdapter(dir); err != nil || a.Config.Alpha != 8 {
		t.Errorf("adapter_config.json without lora_alpha: %v", err)
	}
	os.WriteFile(cfgPath, saved, 0o644)
}

// TestAdapterFilesNamed: an adapter whose files disagree, or whose
// tensors are not in safetensors, is named for that, not for the model;
// and OpenDecoder reads the adapter before the base's weights.
func TestAdapterFilesNamed(t *testing.T) {
	c := tinyConfig()
	dir := t.TempDir()
	model := filepath.Join(dir, "model")
	if err := WriteRandomCheckpoint(model, c, InitOptions{Seed: 3}); err != nil {
		t.Fatal(err)
	}
	ck, err := OpenCheckpoint(model)
	if err != nil {
		t.Fatal(err)
	}
	a, _ := NewAdapter(c, LoRAConfig{R: 4, Alpha: 8, Targets: []Module{QProj, DownProj}}, 1)
	ad := filepath.Join(dir, "adapter")
	if err := ck.SaveAdapter(ad, a, BaseModel{NameOrPath: model}); err != nil {
		t.Fatal(err)
	}
	cfgPath := filepath.Join(ad, AdapterConfigFile)
	cfg, err := os.ReadFile(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(cfgPath, []byte(strings.Replace(string(cfg), `"r": 4`, `"r": 8`, 1)), 0o644)
	if _, err := ck.LoadAdapter(ad); err == nil || !strings.Contains(err.Error(), "has rank 4, but adapter_config.json says r 8: the adapter's files disagree") {
		t.Errorf("r 8 over rank-4 tensors: %v", err)
	}
	os.WriteFile(cfgPath, cfg, 0o644)
	os.Rename(filepath.Join(ad, AdapterWeightsFile), filepath.Join(ad, "adapter_model.bin"))
	if _, err := ck.LoadAdapter(ad); err == nil || !strings.Contains(err.Error(), "holds adapter_model.bin (PyTorch's pickle), not adapter_model.safetensors") {
		t.Errorf("a pickled adapter: %v", err)
	}
	// A NaN in the base's last weight, which only reading the weights
	// finds: the adapter's error comes first, as it is read before them.
	w := filepath.Join(model, "model.safetensors")
	b, err := os.ReadFile(w)
	if err != nil {
		t.Fatal(err)
	}
	copy(b[len(b)-4:], []byte{0xff, 0xff, 0xff, 0xff})
	os.WriteFile(w, b, 0o644)
	if _, err := OpenDecoder(DecoderConfig{Model: model}); err == nil || !strings.Contains(err.Error(), "non-finite") {
		t.Fatalf("the base alone: %v", err)
	}
	if _, err := OpenDecoder(DecoderConfig{Model: model, Adapter: ad}); err == nil || !strings.Contains(err.Error(), "adapter_model.bin") {
		t.Errorf("a bad adapter on a base that would not load: %v", err)
	}
	os.Rename(filepath.Join(ad, "adapter_model.bin"), filepath.Join(ad, AdapterWeightsFile))
	os.WriteFile(cfgPath, []byte(strings.Replace(string(cfg), `"r": 4`, `"r": 8`, 1)), 0o644)
	if _, err := OpenDecoder(DecoderConfig{Model: model, Adapter: ad}); err == nil || !strings.Contains(err.Error(), "the adapter's files disagree") {
		t.Errorf("an adapter whose files disagree, on a base that would not load: %v", err)
	}
}

// TestLoadConfigSaysWhatTheFolderIs: a folder given for a checkpoint that
// holds an adapter, or the checkpoint one folder down, is named so.
func TestLoadConfigSaysWhatTheFolderIs(t *testing.T) {
	dir := t.TempDir()
	model := filepath.Join(dir, "entry", "model")
	if err := WriteRandomCheckpoint(model, tinyConfig(), InitOptions{Seed: 1}); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{filepath.Join(dir, "ad", AdapterConfigFile), filepath.Join(dir, "qlora", AdapterDirName, AdapterConfigFile)} {
		os.MkdirAll(filepath.Dir(p), 0o755)
		os.WriteFile(p, []byte("{}"), 0o644)
	}
	for folder, want := range map[string]string{
		filepath.Join(dir, "entry"): model + " does: the checkpoint is one folder down",
		filepath.Join(dir, "ad"):    "it is a PEFT adapter",
		filepath.Join(dir, "qlora"): "it holds an adapter in " + filepath.Join(dir, "qlora", AdapterDirName),
	} {
		if _, err := LoadConfig(folder); err == nil || !strings.Contains(err.Error(), folder+" holds no config.json: "+want) {
			t.Errorf("%s: %v, want %q", folder, err, want)
		}
	}
	if _, err := LoadConfig(dir); !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), dir+" holds no config.json: a Hugging Face checkpoint folder holds") {
		t.Errorf("a folder of nothing known: %v", err)
	}
}

func TestFloat16Checkpoint(t *testing.T) {
	c := tinyConfig()
	c.Hidden = 48 // sqrt(48) = 6.928..., which float16 and bfloat16 round differently
	dir := t.TempDir()
	if err := WriteRandomCheckpoint(dir, c, InitOptions{Seed: 2, DType: "float16", NormStd: 0.1}); err != nil {
		t.Fatal(err)
	}
	m, err := LoadModel(dir)
	if err != nil {
		t.Fatal(err)
	}
	if m.Config.DType != "float16" || m.EmbedScale() != half.RoundF16(float32(math.Sqrt(48))) {
		t.Errorf("dtype %s, embed scale %v", m.Config.DType, m.EmbedScale())
	}
	for _, v := range m.Embed[:100] {
		if v != half.RoundF16(v) {
			t.Fatalf("weight %v is not a float16 value", v)
		}
	}
	b := tinyBatch(t, c.VocabSize, 1)
	if s, n, err := m.Loss(nil, b); err != nil || n == 0 || math.IsNaN(s) {
		t.Errorf("loss %v over %d tokens: %v", s, n, err)
	}
}

// TestVisionWeightsIgnored: a multimodal checkpoint's vision tower and
// projector tensors are skipped.
func TestVisionWeightsIgnored(t *testing.T) {
	c := tinyConfig()
	c.Multimodal = true
	dir := t.TempDir()
	if err := WriteRandomCheckpoint(dir, c, InitOptions{Seed: 4}); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "model.safetensors")
	f, err := safetensors.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	var ts []safetensors.Tensor
	for _, info := range f.Header.Tensors {
		_, raw, err := f.Raw(info.Name)
		if err != nil {
			t.Fatal(err)
		}
		ts = append(ts, safetensors.Tensor{Name: info.Name, DType: info.DType, Shape: info.Shape, Data: raw})
	}
	f.Close()
	ts = append(ts,
		safetensors.Tensor{Name: "vision_tower.vision_model.embeddings.patch_embedding.weight", DType: safetensors.U8, Shape: []int{3}, Data: []byte{1, 2, 3}},
		safetensors.Tensor{Name: "multi_modal_projector.mm_input_projection_weight", DType: safetensors.I32, Shape: []int{1}, Data: []byte{0, 0, 0, 0}})
	if err := safetensors.WriteFile(path, ts, nil); err != nil {
		t.Fatal(err)
	}
	m, err := LoadModel(dir)
	if err != nil {
		t.Fatal(err)
	}
	if m.Prefix != "language_model.model." || len(m.Layers) != c.Layers {
		t.Errorf("prefix %q, %d layers", m.Prefix, len(m.Layers))
	}
}

// TestAdapterFromOtherTools: adapters of a multimodal Gemma 3 as other
// tools save them load as the same adapter: Unsloth's target_modules regex
// (the file says which projections it adapted), and the key prefix PEFT
// wrote under transformers 4.51 and older (language_model.model.layers).
func TestAdapterFromOtherTools(t *testing.T) {
	ref := filepath.Join("testdata", "reference", "mm_f32")
	m, err := LoadModel(filepath.Join(ref, "model"))
	if err != nil {
		t.Fatal(err)
	}
	want, err := m.LoadAdapter(filepath.Join(ref, "adapter"))
	if err != nil {
		t.Fatal(err)
	}
	copyAdapter := func(rename func(string) string, targets string) string {
		dir := t.TempDir()
		cfg, _ := os.ReadFile(filepath.Join(ref, "adapter", AdapterConfigFile))
		var ac map[string]any
		json.Unmarshal(cfg, &ac)
		ac["target_modules"] = targets
		cfg, _ = json.Marshal(ac)
		os.WriteFile(filepath.Join(dir, AdapterConfigFile), cfg, 0o644)
		f, err := safetensors.Open(filepath.Join(ref, "adapter", AdapterWeightsFile))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		var ts []safetensors.Tensor
		for _, info := range f.Header.Tensors {
			_, raw, err := f.Raw(info.Name)
			if err != nil {
				t.Fatal(err)
			}
			ts = append(ts, safetensors.Tensor{Name: rename(info.Name), DType: info.DType, Shape: info.Shape, Data: raw})
		}
		if err := safetensors.WriteFile(filepath.Join(dir, AdapterWeightsFile), ts, map[string]string{"format": "pt"}); err != nil {
			t.Fatal(err)
		}
		return dir
	}
	same := func(s string) string { return s }
	legacy := func(s string) string {
		return strings.Replace(s, "base_model.model.model.language_model.", "base_model.model.language_model.model.", 1)
	}
	const unsloth = `(?:.*?(?:language|text).*?(?:self_attn|attention|attn|mlp|feed_forward|ffn|dense).*?(?:k_proj|o_proj|gate_proj).*?)`
	for name, dir := range map[string]string{
		"Unsloth's regex":                   copyAdapter(same, unsloth),
		"transformers 4.51's keys":          copyAdapter(legacy, `.*language_model.*\.(k_proj|o_proj|gate_proj)`),
		"transformers 4.51's keys, a regex": copyAdapter(legacy, unsloth),
	} {
		got, err := m.LoadAdapter(dir)
		if err != nil {
			t.Errorf("%s: %v", name, err)
			continue
		}
		if !reflect.DeepEqual(got.Config, want.Config) {
			t.Errorf("%s: config %+v, want %+v", name, got.Config, want.Config)
		}
		for i, p := range want.Params() {
			if !reflect.DeepEqual(p.Data, got.Params()[i].Data) {
				t.Errorf("%s: %s differs", name, p.Name)
			}
		}
	}
	// Keys of another layout are named beside the model's.
	other := copyAdapter(func(s string) string { return strings.Replace(s, "model.language_model.", "model.text_model.", 1) }, unsloth)
	if _, err := m.LoadAdapter(other); err == nil || !strings.Contains(err.Error(), `no LoRA tensors of the text model's projections (under "base_model.model.model.language_model.layers.")`) {
		t.Errorf("another layout: %v", err)
	}
	other = copyAdapter(func(s string) string { return strings.Replace(s, "model.language_model.", "model.text_model.", 1) }, `.*language_model.*\.(k_proj|o_proj|gate_proj)`)
	if _, err := m.LoadAdapter(other); err == nil || !strings.Contains(err.Error(), `the adapter's keys begin "base_model.model.model.text_model.layers.", where an adapter of this model's begin "base_model.model.model.language_model."`) {
		t.Errorf("another layout, listed targets: %v", err)
	}
}
