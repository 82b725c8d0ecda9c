package trainer

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"gemmaft/trainer/safetensors"
)

// Module names the seven projections LoRA and NF4 apply to, in PEFT's
// spelling.
type Module string

const (
	QProj    Module = "q_proj"
	KProj    Module = "k_proj"
	VProj    Module = "v_proj"
	OProj    Module = "o_proj"
	GateProj Module = "gate_proj"
	UpProj   Module = "up_proj"
	DownProj Module = "down_proj"
)

// AllModules lists the projections in a block's order.
var AllModules = []Module{QProj, KProj, VProj, OProj, GateProj, UpProj, DownProj}

// ParseModule checks a target-module name.
func ParseModule(s string) (Module, error) {
	for _, m := range AllModules {
		if string(m) == s {
			return m, nil
		}
	}
	return "", fmt.Errorf("unknown target module %q (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)", s)
}

// parent is the submodule a projection lives in.
func (m Module) parent() string {
	switch m {
	case GateProj, UpProj, DownProj:
		return "mlp"
	}
	return "self_attn"
}

// Linear is a frozen projection y = x Wᵀ with W stored row-major [Out, In].
// When the base is quantised, W holds the dequantised NF4 values (what the
// GPU computes with) and NF4 the packed form.
type Linear struct {
	Out, In int
	W       []float32
	NF4     *NF4Tensor
}

// Layer is one decoder block's frozen weights.
type Layer struct {
	InputNorm, PostAttnNorm, PreFFNorm, PostFFNorm []float32 // [Hidden]
	QNorm, KNorm                                   []float32 // [HeadDim]
	Proj                                           map[Module]*Linear
}

// Model is a Gemma 3 text model's frozen weights in float32.
type Model struct {
	Config    *Config
	Embed     []float32 // [VocabSize, Hidden]; also the tied lm_head
	FinalNorm []float32 // [Hidden]
	Layers    []Layer
	// Prefix is the checkpoint's key prefix of the text model ("model." or a
	// multimodal checkpoint's language-model prefix).
	Prefix string
}

// EmbedScale is sqrt(hidden) rounded to the checkpoint dtype, as
// transformers multiplies the embeddings in the weights' own dtype.
func (m *Model) EmbedScale() float32 {
	s := float32(math.Sqrt(float64(m.Config.Hidden)))
	switch m.Config.DType {
	case "bfloat16":
		return safetensors.RoundBF16(s)
	case "float16":
		return safetensors.RoundF16(s)
	}
	return s
}

// ProjShape is the [out, in] shape of a projection's weight.
func (c *Config) ProjShape(m Module) (out, in int) {
	switch m {
	case QProj:
		return c.Heads * c.HeadDim, c.Hidden
	case KProj, VProj:
		return c.KVHeads * c.HeadDim, c.Hidden
	case OProj:
		return c.Hidden, c.Heads * c.HeadDim
	case GateProj, UpProj:
		return c.Intermediate, c.Hidden
	case DownProj:
		return c.Hidden, c.Intermediate
	}
	panic("unknown module " + string(m))
}

// tensorSpec is one checkpoint tensor's name (without the model prefix)
// and shape.
type tensorSpec struct {
	name  string
	shape []int
	kind  string // "embed", "norm", "qknorm", "proj"
	// base is the name without the checkpoint's prefix; random weights are
	// seeded by it, so a seed gives the same model in every layout.
	base string
}

// tensorSpecs lists every text-model tensor a checkpoint of c holds.
func (c *Config) tensorSpecs() []tensorSpec {
	add := func(specs []tensorSpec, name string, shape []int, kind string) []tensorSpec {
		return append(specs, tensorSpec{name: name, shape: shape, kind: kind})
	}
	specs := add(nil, "embed_tokens.weight", []int{c.VocabSize, c.Hidden}, "embed")
	for i := 0; i < c.Layers; i++ {
		p := fmt.Sprintf("layers.%d.", i)
		for _, n := range []string{"input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"} {
			specs = add(specs, p+n+".weight", []int{c.Hidden}, "norm")
		}
		specs = add(specs, p+"self_attn.q_norm.weight", []int{c.HeadDim}, "qknorm")
		specs = add(specs, p+"self_attn.k_norm.weight", []int{c.HeadDim}, "qknorm")
		for _, m := range AllModules {
			o, in := c.ProjShape(m)
			specs = add(specs, p+m.parent()+"."+string(m)+".weight", []int{o, in}, "proj")
		}
	}
	return add(specs, "norm.weight", []int{c.Hidden}, "norm")
}

// textPrefixes are the key prefixes under which checkpoints hold the text
// model: text-only, the original multimodal release, transformers 5's
// multimodal layout.
var textPrefixes = []string{"model.", "language_model.model.", "model.language_model."}

// checkpointFiles lists the safetensors files of a checkpoint directory and
// maps each tensor name to its file.
func checkpointFiles(dir string) (map[string]string, error) {
	idx := filepath.Join(dir, "model.safetensors.index.json")
	if b, err := os.ReadFile(idx); err == nil {
		var index struct {
			WeightMap map[string]string `json:"weight_map"`
		}
		if err := json.Unmarshal(b, &index); err != nil {
			return nil, fmt.Errorf("%s: %v", idx, err)
		}
		if len(index.WeightMap) == 0 {
			return nil, fmt.Errorf("%s: empty weight_map", idx)
		}
		out := map[string]string{}
		for name, file := range index.WeightMap {
			if strings.Contains(file, "/") || strings.Contains(file, `\`) || file == ".." {
				return nil, fmt.Errorf("%s: shard name %q leaves the checkpoint directory", idx, file)
			}
			out[name] = filepath.Join(dir, file)
		}
		return out, nil
	}
	single := filepath.Join(dir, "model.safetensors")
	f, err := safetensors.Open(single)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("%s: no model.safetensors or model.safetensors.index.json", dir)
		}
		return nil, err
	}
	defer f.Close()
	out := map[string]string{}
	for _, t := range f.Header.Tensors {
		out[t.Name] = single
	}
	return out, nil
}

// LoadModel reads config.json and the safetensors weights in dir. Vision
// tower weights of multimodal checkpoints are ignored. Every tensor's shape
// is checked against the config, and NaN or infinite weights are an error.
func LoadModel(dir string) (*Model, error) {
	cfg, err := LoadConfig(dir)
	if err != nil {
		return nil, err
	}
	files, err := checkpointFiles(dir)
	if err != nil {
		return nil, err
	}
	prefix := ""
	for _, p := range textPrefixes {
		if _, ok := files[p+"embed_tokens.weight"]; ok {
			prefix = p
			break
		}
	}
	if prefix == "" {
		return nil, fmt.Errorf("%s: no embed_tokens.weight under any of the prefixes %v: not a Gemma 3 checkpoint", dir, textPrefixes)
	}
	m := &Model{Config: cfg, Prefix: prefix, Layers: make([]Layer, cfg.Layers)}
	open := map[string]*safetensors.File{}
	defer func() {
		for _, f := range open {
			f.Close()
		}
	}()
	for _, spec := range cfg.tensorSpecs() {
		name := prefix + spec.name
		path, ok := files[name]
		if !ok {
			return nil, fmt.Errorf("%s: tensor %s missing: the config (%d layers) does not match the weights", dir, name, cfg.Layers)
		}
		f := open[path]
		if f == nil {
			if f, err = safetensors.Open(path); err != nil {
				return nil, err
			}
			open[path] = f
		}
		info, ok := f.Header.Lookup(name)
		if !ok {
			return nil, fmt.Errorf("%s: index names %s but the shard lacks it", path, name)
		}
		if !equalShape(info.Shape, spec.shape) {
			return nil, fmt.Errorf("%s: tensor %s has shape %v, the config implies %v: config and weights do not match", path, name, info.Shape, spec.shape)
		}
		_, data, err := f.Float32(name)
		if err != nil {
			return nil, err
		}
		if i := firstNonFinite(data); i >= 0 {
			return nil, fmt.Errorf("%s: tensor %s holds a non-finite value (%v at element %d)", path, name, data[i], i)
		}
		m.place(spec, data)
	}
	// A stored lm_head.weight is not read: Gemma 3 ties the head to the
	// embedding, as transformers does when it loads such a checkpoint.
	return m, nil
}

func (m *Model) place(spec tensorSpec, data []float32) {
	if spec.name == "embed_tokens.weight" {
		m.Embed = data
		return
	}
	if spec.name == "norm.weight" {
		m.FinalNorm = data
		return
	}
	var li int
	var rest string
	fmt.Sscanf(spec.name, "layers.%d.", &li)
	rest = spec.name[strings.Index(spec.name[len("layers."):], ".")+len("layers.")+1:]
	l := &m.Layers[li]
	switch rest {
	case "input_layernorm.weight":
		l.InputNorm = data
	case "post_attention_layernorm.weight":
		l.PostAttnNorm = data
	case "pre_feedforward_layernorm.weight":
		l.PreFFNorm = data
	case "post_feedforward_layernorm.weight":
		l.PostFFNorm = data
	case "self_attn.q_norm.weight":
		l.QNorm = data
	case "self_attn.k_norm.weight":
		l.KNorm = data
	default:
		if l.Proj == nil {
			l.Proj = map[Module]*Linear{}
		}
		mod := Module(strings.TrimSuffix(rest[strings.Index(rest, ".")+1:], ".weight"))
		l.Proj[mod] = &Linear{Out: spec.shape[0], In: spec.shape[1], W: data}
	}
}

func equalShape(a, b []int) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func firstNonFinite(v []float32) int {
	for i, x := range v {
		if x != x || x > math.MaxFloat32 || x < -math.MaxFloat32 {
			return i
		}
	}
	return -1
}

// sortedKeys returns a map's keys in order, for deterministic output.
func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
