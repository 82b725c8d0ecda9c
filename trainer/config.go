// Package trainer is the Gemma 3 QLoRA trainer: model configuration and
// weights, LoRA, NF4 quantisation, the forward and backward passes, the
// optimizer and schedules, checkpoints and PEFT adapter export.
//
// The CPU backend in this package is the reference for every operation.
// Activations and weights are float32, as a GPU keeps them for its GEMMs;
// norms, softmax, attention probabilities and the loss accumulate in
// float64, where float32 sums would cost the agreement with Hugging Face
// (loss within 1e-5, LoRA gradients within 1e-4, checked against golden
// files from transformers + PEFT in float64, see scripts/reference). Each
// operation is one exported function over row-major slices (Matmul,
// RMSNorm, ApplyRope, Attention, GeGLU, LMHeadLoss and their backward
// passes, QuantizeNF4, AdamW.Update), so a GPU backend can be checked
// against it op by op.
//
// Every output element is summed in an order fixed by its position, never
// by the number of cores, so a run is bit-for-bit reproducible on a given
// machine; on amd64 with AVX2 and FMA the products and the softmax's exp
// use the kernels in kernels_amd64.s, elsewhere portable code (gonum's BLAS
// and math.Exp), whose last bits differ.
package trainer

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
)

// LayerType is an attention layer's kind, spelled as transformers does.
type LayerType string

const (
	SlidingAttention LayerType = "sliding_attention"
	FullAttention    LayerType = "full_attention"
)

// Rope is one layer type's rotary embedding: the base and, for linear
// scaling, the factor that positions are divided by.
type Rope struct {
	Theta  float64
	Type   string  // "default" or "linear"
	Factor float64 // 1 for "default"
}

// Config is the Gemma 3 text model's shape, from a Hugging Face config.json
// of either the original release or transformers 5.
type Config struct {
	// Architecture is the checkpoint's class, Gemma3ForCausalLM or
	// Gemma3ForConditionalGeneration (multimodal: text under text_config,
	// weights under a language_model prefix).
	Architecture       string
	Multimodal         bool
	VocabSize          int
	Hidden             int
	Intermediate       int
	Layers             int
	Heads              int
	KVHeads            int
	HeadDim            int
	QueryPreAttnScalar float64
	SlidingWindow      int
	LayerTypes         []LayerType
	Rope               map[LayerType]Rope
	RMSNormEps         float64
	MaxPositions       int
	// DType is the checkpoint's stored dtype ("bfloat16", "float16",
	// "float32"); the embedding scale is rounded to it as transformers does.
	DType string
}

// textConfigJSON holds every field either config format may set; pointers
// tell "absent" (take transformers' default) from zero.
type textConfigJSON struct {
	Architectures         []string                   `json:"architectures"`
	ModelType             string                     `json:"model_type"`
	TextConfig            json.RawMessage            `json:"text_config"`
	VocabSize             *int                       `json:"vocab_size"`
	HiddenSize            *int                       `json:"hidden_size"`
	IntermediateSize      *int                       `json:"intermediate_size"`
	NumHiddenLayers       *int                       `json:"num_hidden_layers"`
	NumAttentionHeads     *int                       `json:"num_attention_heads"`
	NumKeyValueHeads      *int                       `json:"num_key_value_heads"`
	HeadDim               *int                       `json:"head_dim"`
	QueryPreAttnScalar    *float64                   `json:"query_pre_attn_scalar"`
	SlidingWindow         *int                       `json:"sliding_window"`
	SlidingWindowPattern  *int                       `json:"sliding_window_pattern"`
	LayerTypes            []LayerType                `json:"layer_types"`
	RopeTheta             *float64                   `json:"rope_theta"`
	RopeLocalBaseFreq     *float64                   `json:"rope_local_base_freq"`
	RopeScaling           map[string]any             `json:"rope_scaling"`
	RopeParameters        map[string]json.RawMessage `json:"rope_parameters"`
	RMSNormEps            *float64                   `json:"rms_norm_eps"`
	MaxPositionEmbeddings *int                       `json:"max_position_embeddings"`
	HiddenActivation      *string                    `json:"hidden_activation"`
	AttentionBias         *bool                      `json:"attention_bias"`
	FinalLogitSoftcapping *float64                   `json:"final_logit_softcapping"`
	AttnLogitSoftcapping  *float64                   `json:"attn_logit_softcapping"`
	TieWordEmbeddings     *bool                      `json:"tie_word_embeddings"`
	TorchDType            string                     `json:"torch_dtype"`
	DType                 string                     `json:"dtype"`
}

// LoadConfig reads dir/config.json.
func LoadConfig(dir string) (*Config, error) {
	b, err := os.ReadFile(filepath.Join(dir, "config.json"))
	if errors.Is(err, fs.ErrNotExist) {
		hint := notACheckpoint(dir)
		if hint == "" {
			hint = "a Hugging Face checkpoint folder holds config.json, safetensors weights and tokenizer.json"
		}
		return nil, &noConfigError{dir: dir, hint: hint}
	}
	if err != nil {
		return nil, err
	}
	c, err := ParseConfig(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(dir, "config.json"), err)
	}
	return c, nil
}

// noConfigError is LoadConfig's error for a folder without config.json: an
// fs.ErrNotExist that says what the folder is instead.
type noConfigError struct{ dir, hint string }

func (e *noConfigError) Error() string { return e.dir + " holds no config.json: " + e.hint }
func (e *noConfigError) Unwrap() error { return fs.ErrNotExist }

// notACheckpoint says what a folder without config.json holds instead,
// where that is something a checkpoint is often confused with: an adapter,
// a stage's entry with the adapter or the checkpoint one folder down.
func notACheckpoint(dir string) string {
	has := func(parts ...string) bool {
		_, err := os.Stat(filepath.Join(append([]string{dir}, parts...)...))
		return err == nil
	}
	switch {
	case has(AdapterConfigFile):
		return "it is a PEFT adapter; give the base checkpoint it was made for, and the adapter apart"
	case has(AdapterDirName, AdapterConfigFile):
		return fmt.Sprintf("it holds an adapter in %s; give the base checkpoint it was made for, and the adapter apart",
			filepath.Join(dir, AdapterDirName))
	}
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if e.IsDir() && has(e.Name(), "config.json") {
			return fmt.Sprintf("%s does: the checkpoint is one folder down", filepath.Join(dir, e.Name()))
		}
	}
	return ""
}

// ParseConfig decodes a Gemma 3 config.json. Fields the file leaves out take
// the defaults of transformers' Gemma3TextConfig, as the released 4B-27B
// configs rely on.
func ParseConfig(b []byte) (*Config, error) {
	var top textConfigJSON
	if err := json.Unmarshal(b, &top); err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	arch := "Gemma3ForCausalLM"
	if len(top.Architectures) > 0 {
		arch = top.Architectures[0]
	}
	text := top
	multimodal := false
	if len(top.TextConfig) > 0 && string(top.TextConfig) != "null" {
		multimodal = true
		text = textConfigJSON{}
		if err := json.Unmarshal(top.TextConfig, &text); err != nil {
			return nil, fmt.Errorf("config: text_config: %w", err)
		}
		if text.TorchDType == "" && text.DType == "" {
			text.TorchDType, text.DType = top.TorchDType, top.DType
		}
		if len(top.Architectures) == 0 {
			arch = "Gemma3ForConditionalGeneration"
		}
	}
	switch mt := top.ModelType; mt {
	case "gemma3", "gemma3_text", "":
	default:
		return nil, fmt.Errorf("config: model_type %q is not Gemma 3 (want gemma3 or gemma3_text)", mt)
	}
	return text.toConfig(arch, multimodal)
}

func intOr(p *int, d int) int {
	if p == nil {
		return d
	}
	return *p
}

func floatOr(p *float64, d float64) float64 {
	if p == nil {
		return d
	}
	return *p
}

func (t textConfigJSON) toConfig(arch string, multimodal bool) (*Config, error) {
	c := &Config{
		Architecture:       arch,
		Multimodal:         multimodal,
		VocabSize:          intOr(t.VocabSize, 262208),
		Hidden:             intOr(t.HiddenSize, 2304),
		Intermediate:       intOr(t.IntermediateSize, 9216),
		Layers:             intOr(t.NumHiddenLayers, 26),
		Heads:              intOr(t.NumAttentionHeads, 8),
		KVHeads:            intOr(t.NumKeyValueHeads, 4),
		HeadDim:            intOr(t.HeadDim, 256),
		QueryPreAttnScalar: floatOr(t.QueryPreAttnScalar, 256),
		SlidingWindow:      intOr(t.SlidingWindow, 4096),
		RMSNormEps:         floatOr(t.RMSNormEps, 1e-6),
		MaxPositions:       intOr(t.MaxPositionEmbeddings, 131072),
		DType:              t.DType,
	}
	if c.DType == "" {
		c.DType = t.TorchDType
	}
	if c.DType == "" {
		c.DType = "bfloat16"
	}
	if t.HiddenActivation != nil && *t.HiddenActivation != "gelu_pytorch_tanh" {
		return nil, fmt.Errorf("config: hidden_activation %q is not supported (Gemma 3 uses gelu_pytorch_tanh)", *t.HiddenActivation)
	}
	if t.AttentionBias != nil && *t.AttentionBias {
		return nil, errors.New("config: attention_bias true is not supported (Gemma 3 has none)")
	}
	if t.FinalLogitSoftcapping != nil || t.AttnLogitSoftcapping != nil {
		return nil, errors.New("config: logit softcapping is not supported (Gemma 3 has none)")
	}
	if t.TieWordEmbeddings != nil && !*t.TieWordEmbeddings {
		return nil, errors.New("config: tie_word_embeddings false is not supported (Gemma 3 ties lm_head to the embedding)")
	}

	if err := c.checkLimits(); err != nil {
		return nil, err
	}
	if len(t.LayerTypes) > 0 {
		c.LayerTypes = t.LayerTypes
	} else {
		pattern := intOr(t.SlidingWindowPattern, 6)
		if pattern <= 0 {
			return nil, fmt.Errorf("config: sliding_window_pattern %d must be positive", pattern)
		}
		for i := 0; i < c.Layers; i++ {
			lt := SlidingAttention
			if (i+1)%pattern == 0 {
				lt = FullAttention
			}
			c.LayerTypes = append(c.LayerTypes, lt)
		}
	}

	rope, err := t.ropes()
	if err != nil {
		return nil, err
	}
	c.Rope = rope
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return c, nil
}

// ropes reads rotary settings: transformers 5's rope_parameters keyed by
// layer type, or the original rope_theta / rope_local_base_freq /
// rope_scaling, where the scaling applies to global layers only.
func (t textConfigJSON) ropes() (map[LayerType]Rope, error) {
	full := Rope{Theta: floatOr(t.RopeTheta, 1e6), Type: "default", Factor: 1}
	local := Rope{Theta: floatOr(t.RopeLocalBaseFreq, 1e4), Type: "default", Factor: 1}
	if t.RopeScaling != nil {
		r, err := parseRope(t.RopeScaling, full.Theta)
		if err != nil {
			return nil, fmt.Errorf("config: rope_scaling: %w", err)
		}
		full = r
	}
	if t.RopeParameters != nil {
		for key, raw := range t.RopeParameters {
			var m map[string]any
			if err := json.Unmarshal(raw, &m); err != nil {
				// A flat rope_parameters (one set for all layers) holds
				// scalars; it is handled below.
				m = nil
			}
			switch LayerType(key) {
			case FullAttention, SlidingAttention:
				def := full.Theta
				if LayerType(key) == SlidingAttention {
					def = local.Theta
				}
				if m == nil {
					return nil, fmt.Errorf("config: rope_parameters.%s must be an object", key)
				}
				r, err := parseRope(m, def)
				if err != nil {
					return nil, fmt.Errorf("config: rope_parameters.%s: %w", key, err)
				}
				if LayerType(key) == FullAttention {
					full = r
				} else {
					local = r
				}
			}
		}
		if _, ok := t.RopeParameters["rope_type"]; ok {
			var m map[string]any
			all, _ := json.Marshal(t.RopeParameters)
			json.Unmarshal(all, &m)
			r, err := parseRope(m, full.Theta)
			if err != nil {
				return nil, fmt.Errorf("config: rope_parameters: %w", err)
			}
			full = r
		}
	}
	return map[LayerType]Rope{FullAttention: full, SlidingAttention: local}, nil
}

func parseRope(m map[string]any, defTheta float64) (Rope, error) {
	r := Rope{Theta: defTheta, Type: "default", Factor: 1}
	if v, ok := m["rope_theta"]; ok {
		f, ok := v.(float64)
		if !ok || f <= 0 {
			return r, fmt.Errorf("rope_theta %v must be a positive number", v)
		}
		r.Theta = f
	}
	typ, _ := m["rope_type"].(string)
	if typ == "" {
		typ, _ = m["type"].(string)
	}
	switch typ {
	case "", "default":
	case "linear":
		f, ok := m["factor"].(float64)
		if !ok || f <= 0 {
			return r, fmt.Errorf("linear scaling needs a positive factor, got %v", m["factor"])
		}
		r.Type, r.Factor = "linear", f
	default:
		return r, fmt.Errorf("rope_type %q is not supported (default or linear)", typ)
	}
	return r, nil
}

// Validate checks that the shape is one the model code can run.
func (c *Config) Validate() error {
	pos := map[string]int{"vocab_size": c.VocabSize, "hidden_size": c.Hidden, "intermediate_size": c.Intermediate,
		"num_hidden_layers": c.Layers, "num_attention_heads": c.Heads, "num_key_value_heads": c.KVHeads,
		"head_dim": c.HeadDim, "sliding_window": c.SlidingWindow}
	names := make([]string, 0, len(pos))
	for k := range pos {
		names = append(names, k)
	}
	sort.Strings(names)
	for _, k := range names {
		if pos[k] <= 0 {
			return fmt.Errorf("config: %s = %d must be positive", k, pos[k])
		}
	}
	if err := c.checkLimits(); err != nil {
		return err
	}
	if c.Heads%c.KVHeads != 0 {
		return fmt.Errorf("config: num_attention_heads %d is not a multiple of num_key_value_heads %d", c.Heads, c.KVHeads)
	}
	if c.HeadDim%2 != 0 {
		return fmt.Errorf("config: head_dim %d must be even for rotary embeddings", c.HeadDim)
	}
	if c.QueryPreAttnScalar <= 0 {
		return fmt.Errorf("config: query_pre_attn_scalar %v must be positive", c.QueryPreAttnScalar)
	}
	if len(c.LayerTypes) != c.Layers {
		return fmt.Errorf("config: layer_types has %d entries for %d layers", len(c.LayerTypes), c.Layers)
	}
	for i, lt := range c.LayerTypes {
		if lt != SlidingAttention && lt != FullAttention {
			return fmt.Errorf("config: layer_types[%d] = %q (want sliding_attention or full_attention)", i, lt)
		}
	}
	switch c.DType {
	case "bfloat16", "float16", "float32":
	default:
		return fmt.Errorf("config: dtype %q is not supported (bfloat16, float16, float32)", c.DType)
	}
	return nil
}

// checkLimits bounds the sizes far above any Gemma 3, so a hostile config
// cannot make the loader allocate before it finds the weights missing.
func (c *Config) checkLimits() error {
	limits := map[string][2]int{"vocab_size": {c.VocabSize, 1 << 22}, "hidden_size": {c.Hidden, 1 << 16},
		"intermediate_size": {c.Intermediate, 1 << 18}, "num_hidden_layers": {c.Layers, 1024},
		"num_attention_heads": {c.Heads, 1024}, "head_dim": {c.HeadDim, 4096}}
	for _, k := range sortedKeys(limits) {
		if v := limits[k]; v[0] > v[1] {
			return fmt.Errorf("config: %s = %d exceeds %d", k, v[0], v[1])
		}
	}
	return nil
}

// IsGlobal reports whether layer i attends over the whole example.
func (c *Config) IsGlobal(i int) bool { return c.LayerTypes[i] == FullAttention }

// ConfigFormat selects how WriteConfig spells the rotary and layer-pattern
// settings.
type ConfigFormat string

const (
	// FormatTransformers5 writes layer_types and rope_parameters per layer type.
	FormatTransformers5 ConfigFormat = "transformers5"
	// FormatOriginal writes rope_theta, rope_local_base_freq, rope_scaling and
	// sliding_window_pattern, as the original Gemma 3 release did.
	FormatOriginal ConfigFormat = "original"
)

// MarshalConfig renders c as a config.json that transformers loads: a
// text-only Gemma3ForCausalLM, or with c.Multimodal a
// Gemma3ForConditionalGeneration whose text model is c.
func (c *Config) MarshalConfig(format ConfigFormat) ([]byte, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	m := map[string]any{
		"architectures":           []string{"Gemma3ForCausalLM"},
		"model_type":              "gemma3_text",
		"vocab_size":              c.VocabSize,
		"hidden_size":             c.Hidden,
		"intermediate_size":       c.Intermediate,
		"num_hidden_layers":       c.Layers,
		"num_attention_heads":     c.Heads,
		"num_key_value_heads":     c.KVHeads,
		"head_dim":                c.HeadDim,
		"query_pre_attn_scalar":   c.QueryPreAttnScalar,
		"sliding_window":          c.SlidingWindow,
		"rms_norm_eps":            c.RMSNormEps,
		"max_position_embeddings": c.MaxPositions,
		"hidden_activation":       "gelu_pytorch_tanh",
		"attention_bias":          false,
		"attention_dropout":       0.0,
		"final_logit_softcapping": nil,
		"attn_logit_softcapping":  nil,
		"tie_word_embeddings":     true,
		"pad_token_id":            0,
		"eos_token_id":            1,
		"bos_token_id":            2,
		"initializer_range":       0.02,
		"use_cache":               true,
	}
	ropeJSON := func(r Rope) map[string]any {
		o := map[string]any{"rope_type": r.Type, "rope_theta": r.Theta}
		if r.Type == "linear" {
			o["factor"] = r.Factor
		}
		return o
	}
	full, local := c.Rope[FullAttention], c.Rope[SlidingAttention]
	switch format {
	case FormatTransformers5, "":
		m["layer_types"] = c.LayerTypes
		m["rope_parameters"] = map[string]any{
			string(FullAttention):    ropeJSON(full),
			string(SlidingAttention): ropeJSON(local),
		}
		m["dtype"] = c.DType
	case FormatOriginal:
		pattern := 0
		for p := 1; p <= c.Layers+1 && pattern == 0; p++ {
			ok := true
			for i, lt := range c.LayerTypes {
				if ((i+1)%p == 0) != (lt == FullAttention) {
					ok = false
					break
				}
			}
			if ok {
				pattern = p
			}
		}
		if pattern == 0 {
			return nil, errors.New("config: layer_types follow no sliding_window_pattern; use the transformers5 format")
		}
		if local.Type != "default" {
			return nil, errors.New("config: the original format cannot scale local rope; use the transformers5 format")
		}
		m["sliding_window_pattern"] = pattern
		m["rope_theta"] = full.Theta
		m["rope_local_base_freq"] = local.Theta
		if full.Type == "linear" {
			m["rope_scaling"] = map[string]any{"rope_type": "linear", "factor": full.Factor}
		} else {
			m["rope_scaling"] = nil
		}
		m["torch_dtype"] = c.DType
	default:
		return nil, fmt.Errorf("config: unknown format %q", format)
	}
	if c.Multimodal {
		// The multimodal layout nests the text model under text_config.
		// The vision tower is described minimally; its weights are never
		// written, as text fine-tuning does not read them.
		delete(m, "architectures")
		top := map[string]any{
			"architectures": []string{"Gemma3ForConditionalGeneration"},
			"model_type":    "gemma3",
			"text_config":   m,
			"vision_config": map[string]any{
				"model_type": "siglip_vision_model", "hidden_size": 16, "intermediate_size": 32,
				"num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 28, "patch_size": 14,
			},
			"mm_tokens_per_image": 4,
			"boi_token_index":     255999,
			"eoi_token_index":     256000,
			"image_token_index":   262144,
		}
		for _, k := range []string{"dtype", "torch_dtype"} {
			if v, ok := m[k]; ok {
				top[k] = v
			}
		}
		return json.MarshalIndent(top, "", "  ")
	}
	return json.MarshalIndent(m, "", "  ")
}

// Preset returns a named shape: the released Gemma 3 sizes (1b, 4b, 12b,
// 27b, as text-only models) or tiny, a small model with the real vocabulary
// for tests and the demo.
func Preset(name string) (*Config, error) {
	type shape struct {
		vocab, layers, hidden, mlp, heads, kv, headDim, window int
		qpas                                                   float64
		scaling                                                float64
	}
	shapes := map[string]shape{
		"tiny": {262144, 6, 64, 256, 4, 2, 16, 64, 16, 0},
		"1b":   {262144, 26, 1152, 6912, 4, 1, 256, 512, 256, 0},
		"4b":   {262208, 34, 2560, 10240, 8, 4, 256, 1024, 256, 8},
		"12b":  {262208, 48, 3840, 15360, 16, 8, 256, 1024, 256, 8},
		"27b":  {262208, 62, 5376, 21504, 32, 16, 128, 1024, 168, 8},
	}
	s, ok := shapes[name]
	if !ok {
		return nil, fmt.Errorf("unknown model preset %q (tiny, 1b, 4b, 12b, 27b)", name)
	}
	c := &Config{
		Architecture: "Gemma3ForCausalLM", VocabSize: s.vocab, Hidden: s.hidden, Intermediate: s.mlp,
		Layers: s.layers, Heads: s.heads, KVHeads: s.kv, HeadDim: s.headDim, QueryPreAttnScalar: s.qpas,
		SlidingWindow: s.window, RMSNormEps: 1e-6, MaxPositions: 131072, DType: "bfloat16",
		Rope: map[LayerType]Rope{
			FullAttention:    {Theta: 1e6, Type: "default", Factor: 1},
			SlidingAttention: {Theta: 1e4, Type: "default", Factor: 1},
		},
	}
	if s.scaling > 0 {
		c.Rope[FullAttention] = Rope{Theta: 1e6, Type: "linear", Factor: s.scaling}
	}
	for i := 0; i < c.Layers; i++ {
		lt := SlidingAttention
		if (i+1)%6 == 0 {
			lt = FullAttention
		}
		c.LayerTypes = append(c.LayerTypes, lt)
	}
	return c, nil
}
