package converse

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// GenerationConfig is what a checkpoint's generation_config.json says
// about decoding, in transformers' terms. Gemma 3's releases sample
// (do_sample true) with top_k 64 and top_p 0.95 at temperature 1, and stop
// at <eos> and <end_of_turn>.
type GenerationConfig struct {
	DoSample     bool     `json:"do_sample"`
	Temperature  *float64 `json:"temperature"`
	TopK         *int     `json:"top_k"`
	TopP         *float64 `json:"top_p"`
	MaxNewTokens int      `json:"max_new_tokens"`
	// EOS is eos_token_id, which may be one id or a list.
	EOS []int32 `json:"-"`
}

// ReadGenerationConfig reads dir/generation_config.json; a folder without
// one gives nil and no error.
func ReadGenerationConfig(dir string) (*GenerationConfig, error) {
	path := filepath.Join(dir, "generation_config.json")
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var gc GenerationConfig
	if err := json.Unmarshal(b, &gc); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	var raw struct {
		EOS json.RawMessage `json:"eos_token_id"`
	}
	json.Unmarshal(b, &raw)
	if len(raw.EOS) > 0 && string(raw.EOS) != "null" {
		var one int32
		if err := json.Unmarshal(raw.EOS, &one); err == nil {
			gc.EOS = []int32{one}
		} else if err := json.Unmarshal(raw.EOS, &gc.EOS); err != nil {
			return nil, fmt.Errorf("%s: eos_token_id %s is neither an id nor a list of ids", path, raw.EOS)
		}
	}
	return &gc, nil
}

// Sampling returns the temperature, top_k and top_p the file asks for:
// temperature 0 (greedy) unless it samples, as transformers' generate
// decodes greedily when do_sample is false; transformers' defaults
// (temperature 1, top_k 50, top_p 1) where it samples and leaves one out.
// A nil config decodes greedily. A top_p of 0 is returned as it is: the
// caller applies it after its own settings (see TopPZero).
func (gc *GenerationConfig) Sampling() (temperature float64, topK int, topP float64) {
	if gc == nil || !gc.DoSample {
		return 0, 0, 1
	}
	temperature = 1
	if gc.Temperature != nil {
		temperature = *gc.Temperature
	}
	topK, topP = gc.Filters()
	return temperature, topK, topP
}

// Filters are the top_k and top_p that sampling takes from gc, whether or
// not gc samples itself (a caller's temperature may ask for sampling), with
// transformers' defaults (50, 1) for what gc leaves out.
func (gc *GenerationConfig) Filters() (topK int, topP float64) {
	topK, topP = 50, 1
	if gc == nil {
		return topK, topP
	}
	if gc.TopK != nil {
		topK = *gc.TopK
	}
	if gc.TopP != nil {
		topP = *gc.TopP
	}
	return topK, topP
}

// TopPZero gives top_p 0 the meaning transformers gives it, the most
// likely token alone (its top-p filter keeps at least one), as top_k 1:
// GenerateOptions reads a top_p of 0 as no cut.
func TopPZero(topK int, topP float64) (int, float64) {
	if topP == 0 {
		return 1, 1
	}
	return topK, topP
}
