package trainer

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"

	"gemmaft/internal/atomicfile"
	"gemmaft/internal/half"
	"gemmaft/trainer/safetensors"
)

// MergeBase says which base weights an adapter is merged into.
type MergeBase string

const (
	// MergeDequantized merges into the NF4-dequantised weights: the base the
	// adapter was trained against under QLoRA, so the merged model computes
	// what training optimised. Merging into the original weights instead
	// adds the adapter to weights it never saw, and the difference between
	// the two bases (the NF4 rounding) is then left uncorrected.
	MergeDequantized MergeBase = "dequantized"
	// MergeOriginal merges into the checkpoint's weights as stored, which is
	// right for an adapter trained with quantize: none.
	MergeOriginal MergeBase = "original"
)

// MergeOptions configures MergeAdapter.
type MergeOptions struct {
	Base MergeBase
	// TokenizerDir holds the tokenizer files to ship with the model when
	// the base checkpoint has none (a model stage's random checkpoint).
	TokenizerDir string
	// MaxShardBytes splits the weights into shards (default 5 GB).
	MaxShardBytes int64
}

// TokenizerFiles are the files a checkpoint folder carries for its
// tokenizer and chat template; merged and exported models copy them.
var TokenizerFiles = []string{"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
	"chat_template.jinja", "chat_template.json", "added_tokens.json", "preprocessor_config.json", "processor_config.json"}

// MergeAdapter writes base + adapter as one Hugging Face checkpoint into
// out, which must not exist: bf16 safetensors (sharded with an index past
// MaxShardBytes), config.json, generation_config.json and the tokenizer
// files with the chat template. Every tensor of the base is carried over,
// a multimodal checkpoint's vision tower too, under the same names, so the
// result loads as the base's architecture; each adapted projection becomes
// W + (alpha/r)·B·A. Tensors are read, merged and written one at a time,
// so memory holds about two copies of the largest projection in float32.
// The folder appears only complete: it is written under a temporary name
// and renamed. A canceled ctx stops it between tensors, leaving nothing.
func MergeAdapter(ctx context.Context, baseDir, adapterDir, out string, opts MergeOptions) error {
	if opts.Base == "" {
		opts.Base = MergeDequantized
	}
	if opts.Base != MergeDequantized && opts.Base != MergeOriginal {
		return fmt.Errorf("merge: base %q: use dequantized or original", opts.Base)
	}
	if opts.MaxShardBytes == 0 {
		opts.MaxShardBytes = 5_000_000_000
	}
	if _, err := os.Stat(out); err == nil {
		return fmt.Errorf("merge: %s already exists; merge into a new folder", out)
	}
	ck, err := OpenCheckpoint(baseDir)
	if err != nil {
		return err
	}
	// Tensors are copied as they are stored: those the model reads are
	// checked first, as every loader checks them, so that no merge writes
	// a checkpoint that nothing can load.
	if err := ck.CheckTensors(); err != nil {
		return fmt.Errorf("merge: the base: %w", err)
	}
	a, err := ck.LoadAdapter(adapterDir)
	if err != nil {
		return fmt.Errorf("merge: the adapter in %s: %w", adapterDir, err)
	}
	tokDir, err := tokenizerSource(baseDir, opts.TokenizerDir)
	if err != nil {
		return err
	}
	projections := map[string]WeightTensor{}
	textModel := map[string]bool{} // the tensors the model reads
	for _, t := range ck.Config.WeightTensors() {
		textModel[ck.Prefix+t.Name] = true
		if t.Layer >= 0 && isModule(t.Role) {
			projections[ck.Prefix+t.Name] = t
		}
	}
	files := map[string]*safetensors.File{}
	defer func() {
		for _, f := range files {
			f.Close()
		}
	}()
	read := func(name string) (safetensors.TensorInfo, []byte, error) {
		path := ck.shards[name]
		f := files[path]
		if f == nil {
			var err error
			if f, err = safetensors.Open(path); err != nil {
				return safetensors.TensorInfo{}, nil, err
			}
			files[path] = f
		}
		return f.Raw(name)
	}
	var tensors []safetensors.StreamTensor
	for _, name := range ck.tensorNames() {
		path := ck.shards[name]
		f := files[path]
		if f == nil {
			if f, err = safetensors.Open(path); err != nil {
				return err
			}
			files[path] = f
		}
		info, ok := f.Header.Lookup(name)
		if !ok {
			return fmt.Errorf("%s: the index names %s but the shard lacks it", path, name)
		}
		switch info.DType {
		case safetensors.BF16, safetensors.F16, safetensors.F32:
		default:
			return fmt.Errorf("%s: tensor %s is %s; merge handles floating-point checkpoints", path, name, info.DType)
		}
		// Under "dequantized" every projection is its NF4 round trip, the
		// adapted ones and the others alike: the base training saw.
		var w *LoRAWeights
		t, isProj := projections[name]
		if isProj {
			w = a.Layers[t.Layer][Module(t.Role)]
		}
		transform := w != nil || (isProj && opts.Base == MergeDequantized)
		tensors = append(tensors, safetensors.StreamTensor{Name: name, DType: safetensors.BF16, Shape: info.Shape,
			Write: func(wr io.Writer) error {
				if err := ctx.Err(); err != nil {
					return err
				}
				info, raw, err := read(name)
				if err != nil {
					return err
				}
				if textModel[name] {
					if err := checkFinite(ck.shards[name], name, info.DType, raw); err != nil {
						return err
					}
				}
				if !transform && info.DType == safetensors.BF16 {
					_, err := wr.Write(raw)
					return err
				}
				v, err := safetensors.DecodeFloat32(info.DType, raw)
				if err != nil {
					return err
				}
				if transform {
					if v, err = mergeProjection(v, info.Shape, w, a.Config.Scale(), opts.Base, ck.Config.DType); err != nil {
						return fmt.Errorf("%s: %w", name, err)
					}
				}
				buf := make([]byte, 2*len(v))
				for i, x := range v {
					binary.LittleEndian.PutUint16(buf[2*i:], half.BF16(x))
				}
				_, err = wr.Write(buf)
				return err
			}})
	}
	return atomicfile.Dir(out, func(tmp string) error {
		if err := safetensors.WriteSharded(tmp, tensors, opts.MaxShardBytes, map[string]string{"format": "pt"}); err != nil {
			return err
		}
		if err := writeMergedConfig(baseDir, tmp); err != nil {
			return err
		}
		if err := copyTokenizerFiles(tokDir, tmp); err != nil {
			return err
		}
		if err := writeGenerationConfig(baseDir, tokDir, tmp); err != nil {
			return err
		}
		return ctx.Err() // a stop asked for while the last files were written: no folder
	})
}

// mergeProjection returns W + scale·B·A for a projection of the given
// [out, in] shape (just W without an adapter, l nil), W first replaced by
// its NF4 round trip when merging into the dequantised base.
func mergeProjection(wv []float32, shape []int, l *LoRAWeights, scale float32, base MergeBase, dtype string) ([]float32, error) {
	if l != nil && (len(shape) != 2 || shape[0] != l.Out || shape[1] != l.In) {
		return nil, fmt.Errorf("shape %v, the adapter's is [%d %d]", shape, l.Out, l.In)
	}
	if base == MergeDequantized {
		q, err := QuantizeNF4(wv, shape, dtype)
		if err != nil {
			return nil, err
		}
		wv = q.Dequantize()
	}
	if l == nil {
		return wv, nil
	}
	// delta = B·A = B [out×r] times (Aᵀ)ᵀ, with Matmul's weight layout [in×r].
	at := make([]float32, l.In*l.R)
	for r := 0; r < l.R; r++ {
		for i := 0; i < l.In; i++ {
			at[i*l.R+r] = l.A[r*l.In+i]
		}
	}
	delta := make([]float32, l.Out*l.In)
	Matmul(delta, l.B, at, l.Out, l.In, l.R, false)
	for i, d := range delta {
		wv[i] += scale * d
	}
	return wv, nil
}

func isModule(role string) bool {
	_, err := ParseModule(role)
	return err == nil
}

// tensorNames lists every tensor of the checkpoint, in name order.
func (c *Checkpoint) tensorNames() []string {
	names := make([]string, 0, len(c.shards))
	for n := range c.shards {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// ShipsOwnTokenizer reports whether a merge into base ships base's own
// tokenizer files (it has tokenizer.json), so that MergeOptions.TokenizerDir
// goes unread.
func ShipsOwnTokenizer(base string) bool {
	_, err := os.Stat(filepath.Join(base, "tokenizer.json"))
	return err == nil
}

// tokenizerSource is the folder whose tokenizer files ship with a merged
// model: the base's own when it has tokenizer.json, else dir.
func tokenizerSource(base, dir string) (string, error) {
	if ShipsOwnTokenizer(base) {
		return base, nil
	}
	if dir == "" {
		return "", fmt.Errorf("merge: %s has no tokenizer.json; give the folder of the tokenizer the adapter was trained with", base)
	}
	if _, err := os.Stat(filepath.Join(dir, "tokenizer.json")); err != nil {
		return "", fmt.Errorf("merge: no tokenizer.json in %s", dir)
	}
	return dir, nil
}

func copyTokenizerFiles(from, to string) error {
	for _, name := range TokenizerFiles {
		b, err := os.ReadFile(filepath.Join(from, name))
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return err
		}
		if err := atomicfile.WriteFile(filepath.Join(to, name), b); err != nil {
			return err
		}
	}
	return nil
}

// writeMergedConfig copies the base's config.json with the dtype set to
// bfloat16, the dtype of the merged weights (at the top and in a
// multimodal text_config, in both spellings transformers reads).
func writeMergedConfig(base, to string) error {
	b, err := os.ReadFile(filepath.Join(base, "config.json"))
	if err != nil {
		return err
	}
	var cfg map[string]any
	if err := json.Unmarshal(b, &cfg); err != nil {
		return fmt.Errorf("%s: %w", filepath.Join(base, "config.json"), err)
	}
	setDType := func(m map[string]any) {
		m["torch_dtype"] = "bfloat16"
		if _, ok := m["dtype"]; ok {
			m["dtype"] = "bfloat16"
		}
	}
	setDType(cfg)
	if tc, ok := cfg["text_config"].(map[string]any); ok {
		setDType(tc)
	}
	out, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.WriteFile(filepath.Join(to, "config.json"), out)
}

// writeGenerationConfig copies the base's generation_config.json, or writes
// one that stops at <eos> and <end_of_turn>, as Gemma 3's releases do.
func writeGenerationConfig(base, tokDir, to string) error {
	if b, err := os.ReadFile(filepath.Join(base, "generation_config.json")); err == nil {
		return atomicfile.WriteFile(filepath.Join(to, "generation_config.json"), b)
	}
	ids, err := specialTokenIDs(filepath.Join(tokDir, "tokenizer.json"), "<bos>", "<eos>", "<end_of_turn>", "<pad>")
	if err != nil {
		return err
	}
	gc := map[string]any{"bos_token_id": ids[0], "eos_token_id": []int32{ids[1], ids[2]}, "pad_token_id": ids[3],
		"cache_implementation": "hybrid"}
	out, _ := json.MarshalIndent(gc, "", "  ")
	return atomicfile.WriteFile(filepath.Join(to, "generation_config.json"), out)
}

// specialTokenIDs finds added tokens by content in a tokenizer.json.
func specialTokenIDs(path string, names ...string) ([]int32, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var tj struct {
		AddedTokens []struct {
			ID      int32  `json:"id"`
			Content string `json:"content"`
		} `json:"added_tokens"`
	}
	if err := json.Unmarshal(b, &tj); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	out := make([]int32, len(names))
	for i, n := range names {
		found := false
		for _, t := range tj.AddedTokens {
			if t.Content == n {
				out[i], found = t.ID, true
				break
			}
		}
		if !found {
			return nil, fmt.Errorf("%s: no added token %s: not a Gemma 3 tokenizer", path, n)
		}
	}
	return out, nil
}
