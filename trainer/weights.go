package trainer

import (
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"math"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"

	"gemmaft/internal/half"
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
// When the base is quantised, W holds the dequantised NF4 values the CPU
// reference computes with, and NF4 the packed form.
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

// ModelInfo is what the training loop and adapter files need to know of a
// checkpoint, whatever device holds its weights: its shape and the key
// prefix of the text model ("model." or a multimodal checkpoint's
// language-model prefix).
type ModelInfo struct {
	Config *Config
	Prefix string
}

// Model is a Gemma 3 text model's frozen weights in float32, as the CPU
// reference backend computes with them.
type Model struct {
	ModelInfo
	Embed     []float32 // [VocabSize, Hidden]; also the tied lm_head
	FinalNorm []float32 // [Hidden]
	Layers    []Layer
}

// EmbedScale is sqrt(hidden) rounded to the checkpoint dtype, as
// transformers multiplies the embeddings in the weights' own dtype.
func (m *ModelInfo) EmbedScale() float32 {
	return RoundToDType(m.Config.DType, float32(math.Sqrt(float64(m.Config.Hidden))))
}

// RoundToDType rounds v to the precision of a checkpoint dtype
// ("bfloat16", "float16"; anything else leaves v as it is).
func RoundToDType(dtype string, v float32) float32 {
	switch dtype {
	case "bfloat16":
		return half.RoundBF16(v)
	case "float16":
		return half.RoundF16(v)
	}
	return v
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

// Roles of the text model's tensors besides the seven projections (whose
// role is their Module name).
const (
	RoleEmbed        = "embed_tokens"
	RoleFinalNorm    = "norm"
	RoleInputNorm    = "input_layernorm"
	RolePostAttnNorm = "post_attention_layernorm"
	RolePreFFNorm    = "pre_feedforward_layernorm"
	RolePostFFNorm   = "post_feedforward_layernorm"
	RoleQNorm        = "q_norm"
	RoleKNorm        = "k_norm"
)

// tensorSpec is one checkpoint tensor's name (without the model prefix),
// shape and place in the model.
type tensorSpec struct {
	name  string
	shape []int
	kind  string // "embed", "norm", "qknorm", "proj"
	layer int    // -1 outside the decoder blocks
	role  string // a Role constant or a Module name
	// base is the name without the checkpoint's prefix; random weights are
	// seeded by it, so a seed gives the same model in every layout.
	base string
}

// tensorSpecs lists every text-model tensor a checkpoint of c holds, in the
// order the forward pass uses them.
func (c *Config) tensorSpecs() []tensorSpec {
	specs := []tensorSpec{{name: "embed_tokens.weight", shape: []int{c.VocabSize, c.Hidden}, kind: "embed", layer: -1, role: RoleEmbed}}
	for i := 0; i < c.Layers; i++ {
		p := fmt.Sprintf("layers.%d.", i)
		for _, n := range []string{RoleInputNorm, RolePostAttnNorm, RolePreFFNorm, RolePostFFNorm} {
			specs = append(specs, tensorSpec{name: p + n + ".weight", shape: []int{c.Hidden}, kind: "norm", layer: i, role: n})
		}
		for _, n := range []string{RoleQNorm, RoleKNorm} {
			specs = append(specs, tensorSpec{name: p + "self_attn." + n + ".weight", shape: []int{c.HeadDim}, kind: "qknorm", layer: i, role: n})
		}
		for _, m := range AllModules {
			o, in := c.ProjShape(m)
			specs = append(specs, tensorSpec{name: p + m.parent() + "." + string(m) + ".weight", shape: []int{o, in}, kind: "proj", layer: i, role: string(m)})
		}
	}
	return append(specs, tensorSpec{name: "norm.weight", shape: []int{c.Hidden}, kind: "norm", layer: -1, role: RoleFinalNorm})
}

// WeightTensors lists the text model's tensors in the order Checkpoint.Each
// yields them (without their bytes), for backends that create weights
// instead of reading them.
func (c *Config) WeightTensors() []WeightTensor {
	var out []WeightTensor
	for _, s := range c.tensorSpecs() {
		out = append(out, WeightTensor{Name: s.name, Layer: s.layer, Role: s.role, Shape: s.shape})
	}
	return out
}

// textPrefixes are the key prefixes under which checkpoints hold the text
// model: text-only, the original multimodal release, transformers 5's
// multimodal layout.
var textPrefixes = []string{"model.", "language_model.model.", "model.language_model."}

// shardsOf maps each tensor name of a checkpoint directory to the
// safetensors file (shard) holding it.
func shardsOf(dir string) (map[string]string, error) {
	idx := filepath.Join(dir, "model.safetensors.index.json")
	single := filepath.Join(dir, "model.safetensors")
	if !fileExists(single) { // transformers reads model.safetensors first
		b, err := os.ReadFile(idx)
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				return nil, fmt.Errorf("%s has no model.safetensors or model.safetensors.index.json", dir)
			}
			return nil, err
		}
		var index struct {
			WeightMap map[string]string `json:"weight_map"`
		}
		if err := json.Unmarshal(b, &index); err != nil {
			return nil, fmt.Errorf("%s: %w", idx, err)
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
	f, err := safetensors.Open(single)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	out := map[string]string{}
	for _, t := range f.Header.Tensors {
		out[t.Name] = single
	}
	return out, nil
}

// WeightFiles lists the files that hold dir's weights, as transformers
// reads them: model.safetensors, else model.safetensors.index.json and the
// shards it names, in name order. What tells one checkpoint from another
// is these files' content with config.json's: two checkpoints of one
// architecture have the same index.
func WeightFiles(dir string) ([]string, error) {
	if single := filepath.Join(dir, "model.safetensors"); fileExists(single) {
		return []string{single}, nil
	}
	shards, err := shardsOf(dir)
	if err != nil {
		return nil, err
	}
	files := map[string]bool{filepath.Join(dir, "model.safetensors.index.json"): true}
	for _, f := range shards {
		files[f] = true
	}
	return slices.Sorted(maps.Keys(files)), nil
}

// fileExists says whether path is there, as a link too: a model.safetensors
// linking to a blob a download never finished is that checkpoint's weights,
// to be named as missing, not passed over for an index.
func fileExists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}

// IsCheckpointFile says whether a file of that name is one WeightFiles
// lists or config.json.
func IsCheckpointFile(name string) bool {
	return name == "config.json" || name == "model.safetensors.index.json" || strings.HasSuffix(name, ".safetensors")
}

// Checkpoint is an opened Hugging Face checkpoint folder: its config, the
// text model's key prefix and the shard of each tensor. Its weights are
// read one tensor at a time by Each, so that no consumer (the CPU model's
// loader, the GPU backend's uploader) ever holds more than one tensor's
// bytes beside what it keeps.
type Checkpoint struct {
	ModelInfo
	Dir    string
	shards map[string]string
}

// OpenCheckpoint reads dir's config.json and weight index.
func OpenCheckpoint(dir string) (*Checkpoint, error) {
	cfg, err := LoadConfig(dir)
	if err != nil {
		return nil, err
	}
	shards, err := shardsOf(dir)
	if err != nil {
		return nil, err
	}
	prefix := ""
	for _, p := range textPrefixes {
		if _, ok := shards[p+"embed_tokens.weight"]; ok {
			prefix = p
			break
		}
	}
	if prefix == "" {
		return nil, fmt.Errorf("%s: no embed_tokens.weight under any of the prefixes %v: not a Gemma 3 checkpoint", dir, textPrefixes)
	}
	// Weights of more layers than the config has would be left out of
	// the model unsaid (transformers warns of them): config and weights
	// do not match.
	for name := range shards {
		var layer int
		if rest, ok := strings.CutPrefix(name, prefix+"layers."); ok {
			if _, err := fmt.Sscanf(rest, "%d.", &layer); err == nil && layer >= cfg.Layers {
				return nil, fmt.Errorf("%s: the weights hold layer %d (%s) and config.json has %d layers: config and weights do not match", dir, layer, name, cfg.Layers)
			}
		}
	}
	return &Checkpoint{ModelInfo: ModelInfo{Config: cfg, Prefix: prefix}, Dir: dir, shards: shards}, nil
}

// WeightTensor is one text-model tensor as the checkpoint stores it.
type WeightTensor struct {
	// Name is the tensor's name without the checkpoint's prefix, e.g.
	// "layers.3.mlp.up_proj.weight".
	Name string
	// Layer is the decoder block, -1 for the embedding and the final norm.
	Layer int
	// Role is one of the Role constants or a projection's Module name.
	Role  string
	Shape []int
	DType safetensors.DType
	// Raw holds the little-endian stored values; it is valid only during
	// the call that receives it.
	Raw []byte
}

// Float32 decodes the tensor's values.
func (t WeightTensor) Float32() ([]float32, error) { return safetensors.DecodeFloat32(t.DType, t.Raw) }

// Each calls fn with every text-model tensor in the order the forward pass
// uses them: the embedding, each block's norms and projections, the final
// norm. Vision tower weights of multimodal checkpoints and a stored
// lm_head.weight are skipped (Gemma 3 ties the head to the embedding, as
// transformers does when it loads such a checkpoint). Each tensor's shape
// is checked against the config and a non-finite value is an error, before
// fn sees it.
func (c *Checkpoint) Each(fn func(WeightTensor) error) error {
	for _, spec := range c.Config.WeightTensors() {
		t, err := c.Read(spec)
		if err != nil {
			return err
		}
		if err := fn(t); err != nil {
			return fmt.Errorf("%s: %w", c.Prefix+t.Name, err)
		}
	}
	return nil
}

// Read returns one of the tensors Config.WeightTensors lists, with its
// stored bytes, checked as Each checks them. Consumers that write tensors
// in an order of their own (format converters) read them one by one.
func (c *Checkpoint) Read(spec WeightTensor) (WeightTensor, error) {
	name := c.Prefix + spec.Name
	path, ok := c.shards[name]
	if !ok {
		return spec, fmt.Errorf("%s: tensor %s missing: the config (%d layers) does not match the weights", c.Dir, name, c.Config.Layers)
	}
	f, err := safetensors.Open(path)
	if err != nil {
		return spec, err
	}
	defer f.Close()
	info, raw, err := f.Raw(name)
	if err != nil {
		return spec, fmt.Errorf("%s: index names %s but the shard lacks it: %w", path, name, err)
	}
	if err := checkTensorInfo(path, name, info, spec); err != nil {
		return spec, err
	}
	if err := checkFinite(path, name, info.DType, raw); err != nil {
		return spec, err
	}
	spec.DType, spec.Raw = info.DType, raw
	return spec, nil
}

// CheckTensors checks, from the files' headers alone, that every tensor
// Config.WeightTensors lists is there with its shape and a floating-point
// type, as Read checks each: a consumer that copies the checkpoint's
// tensors without reading them through Read (a merge) checks so before it
// writes anything.
func (c *Checkpoint) CheckTensors() error {
	files := map[string]*safetensors.File{}
	defer func() {
		for _, f := range files {
			f.Close()
		}
	}()
	for _, spec := range c.Config.WeightTensors() {
		name := c.Prefix + spec.Name
		path, ok := c.shards[name]
		if !ok {
			return fmt.Errorf("%s: tensor %s missing: the config (%d layers) does not match the weights", c.Dir, name, c.Config.Layers)
		}
		f := files[path]
		if f == nil {
			var err error
			if f, err = safetensors.Open(path); err != nil {
				return err
			}
			files[path] = f
		}
		info, ok := f.Header.Lookup(name)
		if !ok {
			return fmt.Errorf("%s: index names %s but the shard lacks it", path, name)
		}
		if err := checkTensorInfo(path, name, info, spec); err != nil {
			return err
		}
	}
	return nil
}

// checkTensorInfo checks a stored tensor's header against what the config
// implies for it.
func checkTensorInfo(path, name string, info safetensors.TensorInfo, spec WeightTensor) error {
	if !equalShape(info.Shape, spec.Shape) {
		return fmt.Errorf("%s: tensor %s has shape %v, the config implies %v: config and weights do not match", path, name, info.Shape, spec.Shape)
	}
	switch info.DType {
	case safetensors.BF16, safetensors.F16, safetensors.F32:
	default:
		return fmt.Errorf("%s: tensor %s is stored as %s; weights must be BF16, F16 or F32", path, name, info.DType)
	}
	return nil
}

// checkFinite refuses a tensor holding a NaN or an infinity.
func checkFinite(path, name string, dtype safetensors.DType, raw []byte) error {
	if i := safetensors.FirstNonFinite(dtype, raw); i >= 0 {
		return fmt.Errorf("%s: tensor %s holds a non-finite value at element %d", path, name, i)
	}
	return nil
}

// LoadModel reads config.json and the safetensors weights in dir into a
// float32 Model for the CPU reference backend.
func LoadModel(dir string) (*Model, error) {
	ck, err := OpenCheckpoint(dir)
	if err != nil {
		return nil, err
	}
	return ck.Load()
}

// Load reads the checkpoint's weights into a Model in float32.
func (ck *Checkpoint) Load() (*Model, error) {
	m := &Model{ModelInfo: ck.ModelInfo, Layers: make([]Layer, ck.Config.Layers)}
	err := ck.Each(func(t WeightTensor) error {
		data, err := t.Float32()
		if err != nil {
			return err
		}
		m.place(t, data)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", ck.Dir, err)
	}
	return m, nil
}

func (m *Model) place(t WeightTensor, data []float32) {
	if t.Layer < 0 {
		if t.Role == RoleEmbed {
			m.Embed = data
		} else {
			m.FinalNorm = data
		}
		return
	}
	l := &m.Layers[t.Layer]
	switch t.Role {
	case RoleInputNorm:
		l.InputNorm = data
	case RolePostAttnNorm:
		l.PostAttnNorm = data
	case RolePreFFNorm:
		l.PreFFNorm = data
	case RolePostFFNorm:
		l.PostFFNorm = data
	case RoleQNorm:
		l.QNorm = data
	case RoleKNorm:
		l.KNorm = data
	default:
		if l.Proj == nil {
			l.Proj = map[Module]*Linear{}
		}
		l.Proj[Module(t.Role)] = &Linear{Out: t.Shape[0], In: t.Shape[1], W: data}
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
