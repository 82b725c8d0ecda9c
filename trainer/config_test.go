package trainer

import (
	"reflect"
	"strings"
	"testing"
)

// The released configs as published (abridged to the fields transformers
// reads): 1B is text-only, 4B and up nest the text model in text_config and
// leave many fields to Gemma3TextConfig's defaults.
const gemma1bConfig = `{
  "architectures": ["Gemma3ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "attn_logit_softcapping": null, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": [1, 106],
  "final_logit_softcapping": null, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152,
  "initializer_range": 0.02, "intermediate_size": 6912, "max_position_embeddings": 32768, "model_type": "gemma3_text",
  "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1, "pad_token_id": 0,
  "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000, "rope_scaling": null,
  "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6, "torch_dtype": "bfloat16",
  "transformers_version": "4.50.0.dev0", "use_cache": true, "vocab_size": 262144}`

const gemma4bConfig = `{
  "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999, "eoi_token_index": 256000,
  "eos_token_id": [1, 106], "image_token_index": 262144, "initializer_range": 0.02, "mm_tokens_per_image": 256,
  "model_type": "gemma3",
  "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
    "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024},
  "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0",
  "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304, "model_type": "siglip_vision_model",
    "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": false}}`

const gemma27bConfig = `{
  "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
  "text_config": {"head_dim": 128, "hidden_size": 5376, "intermediate_size": 21504, "model_type": "gemma3_text",
    "num_attention_heads": 32, "num_hidden_layers": 62, "num_key_value_heads": 16, "query_pre_attn_scalar": 168,
    "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024},
  "torch_dtype": "bfloat16", "vision_config": {"model_type": "siglip_vision_model"}}`

func TestParseReleasedConfigs(t *testing.T) {
	for _, c := range []struct {
		name, json, preset string
		multimodal         bool
	}{{"1b", gemma1bConfig, "1b", false}, {"4b", gemma4bConfig, "4b", true}, {"27b", gemma27bConfig, "27b", true}} {
		got, err := ParseConfig([]byte(c.json))
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		want, _ := Preset(c.preset)
		if got.Multimodal != c.multimodal {
			t.Errorf("%s: multimodal %v", c.name, got.Multimodal)
		}
		got.Multimodal, got.Architecture, got.MaxPositions = false, want.Architecture, want.MaxPositions
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%s:\n got %+v\nwant %+v", c.name, got, want)
		}
	}
}

func TestConfigRoundTrip(t *testing.T) {
	for _, name := range []string{"tiny", "1b", "4b", "12b", "27b"} {
		c, _ := Preset(name)
		for _, format := range []ConfigFormat{FormatTransformers5, FormatOriginal} {
			for _, mm := range []bool{false, true} {
				c.Multimodal = mm
				b, err := c.MarshalConfig(format)
				if err != nil {
					t.Fatal(err)
				}
				back, err := ParseConfig(b)
				if err != nil {
					t.Fatalf("%s %s: %v", name, format, err)
				}
				want := *c
				if mm {
					want.Architecture = "Gemma3ForConditionalGeneration"
				}
				if !reflect.DeepEqual(back, &want) {
					t.Errorf("%s %s multimodal=%v:\n got %+v\nwant %+v", name, format, mm, back, &want)
				}
			}
		}
	}
}

func TestConfigErrors(t *testing.T) {
	for _, c := range []struct{ json, want string }{
		{`{"model_type": "llama"}`, "not Gemma 3"},
		{`{"hidden_size": 0}`, "hidden_size"},
		{`{"num_attention_heads": 6, "num_key_value_heads": 4}`, "multiple"},
		{`{"rope_scaling": {"rope_type": "yarn", "factor": 4}}`, "not supported"},
		{`{"rope_parameters": {"full_attention": {"rope_type": "linear"}}}`, "factor"},
		{`{"final_logit_softcapping": 30.0}`, "softcapping"},
		{`{"layer_types": ["sliding_attention"], "num_hidden_layers": 2}`, "layer_types"},
		{`{"torch_dtype": "int8"}`, "dtype"},
		{`{"hidden_size": "big"}`, "config"},
		{`not json`, "config"},
		{`{"num_hidden_layers": 1000000000}`, "exceeds"},
	} {
		if _, err := ParseConfig([]byte(c.json)); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: err = %v, want one mentioning %q", c.json, err, c.want)
		}
	}
}
