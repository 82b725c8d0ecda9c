package gguf

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"gemmaft/tokenizer"
	"gemmaft/trainer"
	"gemmaft/trainer/safetensors"
)

// Options configures Gemma3.
type Options struct {
	// Type is the file's type (q8_0, q4_k_m, f16, …); its tensors' types
	// follow from it as llama.cpp's quantiser gives them (FileType's
	// tensorType).
	Type FileType
	// Name is general.name (default: the model folder's name).
	Name string
	// Progress, when set, hears after each tensor written how many of
	// how many are done: a 12B conversion takes minutes.
	Progress func(done, total int)
}

// Gemma3 converts the Gemma 3 checkpoint in modelDir (a text-only or
// multimodal Hugging Face folder with its tokenizer) into the GGUF file out,
// which must not exist. A multimodal checkpoint's vision tower is left out:
// llama.cpp reads it from a separate projector file. Tensors are read and
// written one at a time; a canceled ctx stops it between them, leaving
// nothing.
func Gemma3(ctx context.Context, modelDir, out string, opts Options) error {
	if _, err := os.Stat(out); err == nil {
		return fmt.Errorf("gguf: %s already exists", out)
	}
	ck, err := trainer.OpenCheckpoint(modelDir)
	if err != nil {
		return err
	}
	c := ck.Config
	if err := llamaCppSupports(c); err != nil {
		return fmt.Errorf("gguf: %s: %w", modelDir, err)
	}
	if opts.Name == "" {
		opts.Name = filepath.Base(filepath.Clean(modelDir))
	}
	kvs := []KV{
		{"general.architecture", "gemma3"},
		{"general.name", opts.Name},
		{"general.file_type", uint32(opts.Type)},
		{"general.quantization_version", uint32(2)},
		{"gemma3.context_length", uint32(c.MaxPositions)},
		{"gemma3.embedding_length", uint32(c.Hidden)},
		{"gemma3.block_count", uint32(c.Layers)},
		{"gemma3.feed_forward_length", uint32(c.Intermediate)},
		{"gemma3.attention.head_count", uint32(c.Heads)},
		{"gemma3.attention.head_count_kv", uint32(c.KVHeads)},
		{"gemma3.attention.key_length", uint32(c.HeadDim)},
		{"gemma3.attention.value_length", uint32(c.HeadDim)},
		{"gemma3.attention.layer_norm_rms_epsilon", float32(c.RMSNormEps)},
		{"gemma3.attention.sliding_window", uint32(c.SlidingWindow)},
		{"gemma3.rope.freq_base", float32(c.Rope[trainer.FullAttention].Theta)},
	}
	if r := c.Rope[trainer.FullAttention]; r.Type == "linear" {
		kvs = append(kvs, KV{"gemma3.rope.scaling.type", "linear"}, KV{"gemma3.rope.scaling.factor", float32(r.Factor)})
	}
	vocab, err := vocabulary(modelDir, c.VocabSize)
	if err != nil {
		return fmt.Errorf("gguf: %w", err)
	}
	kvs = append(kvs, vocab...)

	var tensors []Tensor
	specs := c.WeightTensors()
	written := 0
	for _, spec := range specs {
		name, err := tensorName(spec)
		if err != nil {
			return err
		}
		typ := opts.Type.tensorType(spec, c.Layers)
		shift := float32(0)
		if strings.HasSuffix(spec.Name, "norm.weight") {
			// Gemma's RMSNorm scales by 1 + w; llama.cpp's by its weight.
			shift = 1
		}
		tensors = append(tensors, Tensor{Name: name, Shape: spec.Shape, Type: typ,
			Write: func(w io.Writer) error {
				if err := ctx.Err(); err != nil {
					return err
				}
				t, err := ck.Read(spec)
				if err != nil {
					return err
				}
				if err := writeConverted(w, t, typ, shift); err != nil {
					return err
				}
				if written++; opts.Progress != nil {
					opts.Progress(written, len(specs))
				}
				return nil
			}})
	}
	return WriteFile(out, kvs, tensors)
}

// llamaCppSupports checks the shape facts llama.cpp's gemma3 model fixes
// instead of reading: a global layer every sixth, local RoPE base 10000
// without scaling, and queries scaled by 1/√head_dim (by 1/√(hidden/heads)
// for the 62-layer 27B).
func llamaCppSupports(c *trainer.Config) error {
	for i, lt := range c.LayerTypes {
		if want := (i+1)%6 == 0; (lt == trainer.FullAttention) != want {
			return fmt.Errorf("layer %d is %s; llama.cpp's gemma3 makes every sixth layer, and only those, global", i, lt)
		}
	}
	if r := c.Rope[trainer.SlidingAttention]; r.Theta != 10000 || r.Type != "default" {
		return fmt.Errorf("sliding layers' RoPE is %s with base %g; llama.cpp's gemma3 fixes unscaled base 10000", r.Type, r.Theta)
	}
	if r := c.Rope[trainer.FullAttention]; r.Type != "default" && r.Type != "linear" {
		return fmt.Errorf("global layers' RoPE scaling %q: llama.cpp's gemma3 takes none or linear", r.Type)
	}
	scalar := float64(c.HeadDim)
	if c.Layers == 62 {
		scalar = float64(c.Hidden / c.Heads)
	}
	if c.QueryPreAttnScalar != scalar {
		return fmt.Errorf("query_pre_attn_scalar %g; llama.cpp's gemma3 scales queries by 1/√%g for %d layers", c.QueryPreAttnScalar, scalar, c.Layers)
	}
	return nil
}

// tensorName is the GGUF name llama.cpp's converter gives a Gemma 3 tensor.
func tensorName(t trainer.WeightTensor) (string, error) {
	switch t.Role {
	case trainer.RoleEmbed:
		return "token_embd.weight", nil
	case trainer.RoleFinalNorm:
		return "output_norm.weight", nil
	}
	names := map[string]string{
		trainer.RoleInputNorm:    "attn_norm",
		trainer.RolePostAttnNorm: "post_attention_norm",
		trainer.RolePreFFNorm:    "ffn_norm",
		trainer.RolePostFFNorm:   "post_ffw_norm",
		trainer.RoleQNorm:        "attn_q_norm",
		trainer.RoleKNorm:        "attn_k_norm",
		string(trainer.QProj):    "attn_q",
		string(trainer.KProj):    "attn_k",
		string(trainer.VProj):    "attn_v",
		string(trainer.OProj):    "attn_output",
		string(trainer.GateProj): "ffn_gate",
		string(trainer.UpProj):   "ffn_up",
		string(trainer.DownProj): "ffn_down",
	}
	n, ok := names[t.Role]
	if !ok || t.Layer < 0 {
		return "", fmt.Errorf("gguf: no GGUF name for %s", t.Name)
	}
	return fmt.Sprintf("blk.%d.%s.weight", t.Layer, n), nil
}

// writeConverted writes a tensor's values plus shift in type typ, a few
// million values at a time so that no float32 copy of a whole embedding
// is ever held.
func writeConverted(w io.Writer, t trainer.WeightTensor, typ Type, shift float32) error {
	size := t.DType.Size()
	row := t.Shape[len(t.Shape)-1]
	rows := max(1, (4<<20)/row)
	var buf []byte
	for start := 0; start < len(t.Raw); start += rows * row * size {
		end := min(len(t.Raw), start+rows*row*size)
		v, err := safetensors.DecodeFloat32(t.DType, t.Raw[start:end])
		if err != nil {
			return err
		}
		if shift != 0 {
			for i := range v {
				v[i] += shift
			}
		}
		if buf, err = Encode(buf[:0], typ, v); err != nil {
			return err
		}
		if _, err := w.Write(buf); err != nil {
			return err
		}
	}
	return nil
}

// SentencePiece token types, as GGUF's tokenizer.ggml.token_type stores them.
const (
	tokenNormal      int32 = 1
	tokenUnknown     int32 = 2
	tokenControl     int32 = 3
	tokenUserDefined int32 = 4
	tokenUnused      int32 = 5
	tokenByte        int32 = 6
)

// vocabulary returns the tokenizer keys: the vocabulary as llama.cpp's
// SentencePiece ("llama") tokenizer reads it, padded to the embedding's
// rows with unused [PADn] tokens; the special ids; add_bos as the
// tokenizer config says; the chat template.
func vocabulary(dir string, rows int) ([]KV, error) {
	path := filepath.Join(dir, "tokenizer.json")
	tok, err := tokenizer.LoadFile(path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("%s has no tokenizer.json: a GGUF file carries its tokenizer; copy the base model's tokenizer.json and tokenizer_config.json into the folder", dir)
		}
		return nil, err
	}
	// Gemma 3's tokenizer ends with <image_soft_token> (262144), past the
	// 1B's 262144 embedding rows; a token without a row cannot be used, so
	// the vocabulary stops at the embedding, as the SentencePiece model
	// llama.cpp's converter reads does.
	n := min(tok.VocabSize(), rows)
	mismatch := rows-n > 1024
	for id := n; id < tok.VocabSize() && !mismatch; id++ {
		// Only special tokens may lack a row; a text token would be cut
		// from the vocabulary the file carries.
		k := tok.Kind(int32(id))
		mismatch = k != tokenizer.Control && k != tokenizer.UserDefined
	}
	if mismatch {
		return nil, fmt.Errorf("%s: %d tokens for an embedding of %d rows: tokenizer and model do not match", path, tok.VocabSize(), rows)
	}
	scores := tok.MergeScores()
	tokens := make([]string, rows)
	outScores := make([]float32, rows)
	types := make([]int32, rows)
	for id := 0; id < rows; id++ {
		s, ok := "", false
		if id < n {
			s, ok = tok.Token(int32(id))
		}
		if !ok {
			tokens[id], outScores[id], types[id] = fmt.Sprintf("[PAD%d]", id), -1000, tokenUnused
			continue
		}
		tokens[id], outScores[id] = s, scores[id]
		switch tok.Kind(int32(id)) {
		case tokenizer.Unknown:
			types[id] = tokenUnknown
		case tokenizer.Control:
			types[id] = tokenControl
		case tokenizer.UserDefined:
			// llama.cpp writes a user-defined token's text as it is, where
			// a normal token's ▁ reads as a space: Gemma's runs of spaces
			// (ids 138–167) would print as ▁▁▁▁. Its converter writes them
			// with spaces, as here.
			tokens[id], types[id] = strings.ReplaceAll(s, "\u2581", " "), tokenUserDefined
		case tokenizer.Byte:
			types[id] = tokenByte
		default:
			types[id] = tokenNormal
		}
	}
	cfg, err := readTokenizerConfig(dir)
	if err != nil {
		return nil, err
	}
	kvs := []KV{
		{"tokenizer.ggml.model", "llama"},
		{"tokenizer.ggml.pre", "default"},
		{"tokenizer.ggml.tokens", tokens},
		{"tokenizer.ggml.scores", outScores},
		{"tokenizer.ggml.token_type", types},
		{"tokenizer.ggml.add_bos_token", cfg.AddBOS},
		{"tokenizer.ggml.add_eos_token", cfg.AddEOS},
		{"tokenizer.ggml.add_space_prefix", false},
	}
	for _, sp := range []struct{ key, token string }{
		{"tokenizer.ggml.bos_token_id", cfg.BOS},
		{"tokenizer.ggml.eos_token_id", cfg.EOS},
		{"tokenizer.ggml.unknown_token_id", cfg.UNK},
		{"tokenizer.ggml.padding_token_id", cfg.PAD},
		{"tokenizer.ggml.eot_token_id", "<end_of_turn>"},
	} {
		if sp.token == "" {
			continue
		}
		id, ok := tok.ID(sp.token)
		if !ok {
			return nil, fmt.Errorf("%s: the tokenizer has no %s for %s", path, sp.token, sp.key)
		}
		kvs = append(kvs, KV{sp.key, uint32(id)})
	}
	if cfg.ChatTemplate == "" {
		return nil, fmt.Errorf("%s has no chat template (tokenizer_config.json's chat_template or chat_template.jinja): the runtime would not format turns as training did", dir)
	}
	return append(kvs, KV{"tokenizer.chat_template", cfg.ChatTemplate}), nil
}

// TokenizerConfig is what export needs of tokenizer_config.json.
type TokenizerConfig struct {
	BOS, EOS, UNK, PAD string
	AddBOS, AddEOS     bool
	ChatTemplate       string
}

// readTokenizerConfig reads dir/tokenizer_config.json, whose special
// tokens are strings or {"content": ...} objects, and the chat template,
// from chat_template.jinja when transformers saved it apart.
func readTokenizerConfig(dir string) (TokenizerConfig, error) {
	path := filepath.Join(dir, "tokenizer_config.json")
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return TokenizerConfig{}, fmt.Errorf("%s has no tokenizer_config.json, whose special tokens and chat template a GGUF carries: copy the base model's there", dir)
	}
	if err != nil {
		return TokenizerConfig{}, fmt.Errorf("the tokenizer's config: %w", err)
	}
	var raw struct {
		AddBOS       *bool  `json:"add_bos_token"`
		AddEOS       bool   `json:"add_eos_token"`
		ChatTemplate string `json:"chat_template"`
	}
	var named map[string]json.RawMessage
	if err := json.Unmarshal(b, &raw); err != nil {
		return TokenizerConfig{}, fmt.Errorf("%s: %w", path, err)
	}
	json.Unmarshal(b, &named)
	tc := TokenizerConfig{AddBOS: raw.AddBOS == nil || *raw.AddBOS, AddEOS: raw.AddEOS, ChatTemplate: raw.ChatTemplate}
	for _, f := range []struct {
		key string
		dst *string
	}{{"bos_token", &tc.BOS}, {"eos_token", &tc.EOS}, {"unk_token", &tc.UNK}, {"pad_token", &tc.PAD}} {
		v := named[f.key]
		if len(v) == 0 || string(v) == "null" {
			continue
		}
		if json.Unmarshal(v, f.dst) == nil {
			continue
		}
		var obj struct{ Content string }
		if err := json.Unmarshal(v, &obj); err != nil {
			return tc, fmt.Errorf("%s: %s: %w", path, f.key, err)
		}
		*f.dst = obj.Content
	}
	if j, err := os.ReadFile(filepath.Join(dir, "chat_template.jinja")); err == nil {
		tc.ChatTemplate = string(j)
	}
	return tc, nil
}
