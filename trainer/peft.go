package trainer

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"strings"

	"gemmaft/trainer/safetensors"

	"gemmaft/internal/atomicfile"
)

// PEFT's file names inside an adapter directory.
const (
	AdapterWeightsFile = "adapter_model.safetensors"
	AdapterConfigFile  = "adapter_config.json"
)

// peftPrefix is the key prefix PEFT gives the text model's layers for the
// base checkpoint m was loaded from: PEFT wraps the model as
// base_model.model, and transformers 5 names the text decoder model.* in
// Gemma3ForCausalLM and model.language_model.* in the multimodal class.
func (m *ModelInfo) peftPrefix() string { return m.PEFTPrefix() }

// PEFTPrefix is the key prefix of the text model's layers in PEFT adapter
// files made for this checkpoint.
func (m *ModelInfo) PEFTPrefix() string {
	if m.Prefix == "model." {
		return "base_model.model.model."
	}
	return "base_model.model.model.language_model."
}

// legacyPEFTPrefix is the prefix adapters of a multimodal checkpoint have
// when PEFT ran with transformers 4.51 or older, which named the text
// decoder language_model.model.*; "" for a text-only checkpoint, whose
// names did not change.
func (m *ModelInfo) legacyPEFTPrefix() string {
	if m.Prefix == "model." {
		return ""
	}
	return "base_model.model.language_model.model."
}

// adapterConfigJSON is the subset of PEFT's LoraConfig we write and read.
type adapterConfigJSON struct {
	PeftType            string         `json:"peft_type"`
	TaskType            string         `json:"task_type"`
	BaseModelNameOrPath string         `json:"base_model_name_or_path"`
	R                   int            `json:"r"`
	LoraAlpha           float64        `json:"lora_alpha"`
	LoraDropout         float64        `json:"lora_dropout"`
	TargetModules       any            `json:"target_modules"`
	Bias                string         `json:"bias"`
	FanInFanOut         bool           `json:"fan_in_fan_out"`
	InferenceMode       bool           `json:"inference_mode"`
	InitLoraWeights     bool           `json:"init_lora_weights"`
	UseRSLora           bool           `json:"use_rslora"`
	UseDora             bool           `json:"use_dora"`
	ModulesToSave       []string       `json:"modules_to_save"`
	LayersToTransform   []int          `json:"layers_to_transform"`
	LayersPattern       []string       `json:"layers_pattern"`
	RankPattern         map[string]int `json:"rank_pattern"`
	AlphaPattern        map[string]int `json:"alpha_pattern"`
	Revision            *string        `json:"revision"`
}

// parseAdapterConfig reads adapter_config.json as PEFT's LoraConfig does:
// r and lora_alpha left out are its defaults (8 and 8), and a value of the
// wrong type is named by its field.
func parseAdapterConfig(b []byte) (adapterConfigJSON, error) {
	var ac adapterConfigJSON
	if err := json.Unmarshal(b, &ac); err != nil {
		var te *json.UnmarshalTypeError
		switch {
		case errors.As(err, &te) && te.Field != "":
			return ac, fmt.Errorf("%s is a JSON %s, want %s", te.Field, te.Value, jsonTypeName(te.Type))
		case errors.As(err, &te):
			return ac, fmt.Errorf("a JSON %s, not an object", te.Value)
		}
		return ac, err
	}
	var present map[string]json.RawMessage
	json.Unmarshal(b, &present) // an object: decoded above
	if _, ok := present["r"]; !ok {
		ac.R = 8
	}
	if _, ok := present["lora_alpha"]; !ok {
		ac.LoraAlpha = 8
	}
	return ac, nil
}

// jsonTypeName says what JSON a Go type decodes from.
func jsonTypeName(t reflect.Type) string {
	switch t.Kind() {
	case reflect.Int, reflect.Int64, reflect.Int32:
		return "an integer"
	case reflect.Float64, reflect.Float32:
		return "a number"
	case reflect.Bool:
		return "true or false"
	case reflect.String:
		return "a string"
	case reflect.Slice, reflect.Array:
		return "a list"
	case reflect.Map, reflect.Struct:
		return "an object"
	}
	return t.String()
}

// BaseModel names the checkpoint an adapter was trained on, as PEFT's
// adapter_config.json records it: AutoPeftModelForCausalLM loads
// base_model_name_or_path at revision, so a Hub model is its repository id
// with the commit, never an hf:// reference, which it cannot resolve.
type BaseModel struct {
	NameOrPath string // a repository id (ORG/NAME) or a folder; "" when unknown
	Revision   string // a Hub commit; "" for a folder
}

// SaveAdapter writes a in PEFT's format into dir: adapter_model.safetensors
// with the key names PEFT uses for m's checkpoint, in float32, and
// adapter_config.json naming base.
func (m *ModelInfo) SaveAdapter(dir string, a *Adapter, base BaseModel) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	prefix := m.peftPrefix()
	var ts []safetensors.Tensor
	for li, mods := range a.Layers {
		for _, mod := range AllModules {
			w, ok := mods[mod]
			if !ok {
				continue
			}
			key := fmt.Sprintf("%slayers.%d.%s.%s", prefix, li, mod.parent(), mod)
			ab, _ := safetensors.EncodeFloat32(safetensors.F32, w.A)
			bb, _ := safetensors.EncodeFloat32(safetensors.F32, w.B)
			ts = append(ts,
				safetensors.Tensor{Name: key + ".lora_A.weight", DType: safetensors.F32, Shape: []int{w.R, w.In}, Data: ab},
				safetensors.Tensor{Name: key + ".lora_B.weight", DType: safetensors.F32, Shape: []int{w.Out, w.R}, Data: bb})
		}
	}
	if err := safetensors.WriteFile(filepath.Join(dir, AdapterWeightsFile), ts, map[string]string{"format": "pt"}); err != nil {
		return err
	}
	var names []string
	for _, mod := range a.Config.sortedModules() {
		names = append(names, string(mod))
	}
	var targets any = names
	if m.Prefix != "model." {
		// PEFT matches a list of names against every module, the vision
		// tower's k_proj and o_proj too; a regex restricted to the language
		// model adapts exactly the layers trained here.
		targets = multimodalTargetPrefix + strings.Join(names, "|") + ")"
	}
	cfg := adapterConfigJSON{
		PeftType: "LORA", TaskType: "CAUSAL_LM", BaseModelNameOrPath: base.NameOrPath,
		R: a.Config.R, LoraAlpha: a.Config.Alpha, LoraDropout: a.Config.Dropout,
		TargetModules: targets, Bias: "none", InferenceMode: true, InitLoraWeights: true, UseRSLora: a.Config.RSLoRA,
		RankPattern: map[string]int{}, AlphaPattern: map[string]int{},
	}
	if base.Revision != "" {
		cfg.Revision = &base.Revision
	}
	b, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.WriteFile(filepath.Join(dir, AdapterConfigFile), b)
}

// CheckAdapterDir says whether dir looks like a PEFT adapter folder,
// before a base model is loaded for it. A qlora stage's entry holds its
// adapter one folder down, a common slip that the error names.
func CheckAdapterDir(dir string) error {
	_, err := os.Stat(filepath.Join(dir, AdapterConfigFile))
	if err == nil {
		return checkAdapterWeights(dir)
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	if _, err := os.Stat(filepath.Join(dir, AdapterDirName, AdapterConfigFile)); err == nil {
		return fmt.Errorf("%s holds no %s, but %s does: a qlora stage's entry keeps its adapter there",
			dir, AdapterConfigFile, filepath.Join(dir, AdapterDirName))
	}
	return fmt.Errorf("%s holds no %s: a PEFT adapter folder has %s and %s", dir, AdapterConfigFile, AdapterConfigFile, AdapterWeightsFile)
}

// checkAdapterWeights says whether dir holds the adapter's tensors in the
// one format read here.
func checkAdapterWeights(dir string) error {
	_, err := os.Stat(filepath.Join(dir, AdapterWeightsFile))
	if !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	if _, berr := os.Stat(filepath.Join(dir, "adapter_model.bin")); berr == nil {
		return fmt.Errorf("%s holds adapter_model.bin (PyTorch's pickle), not %s: save the adapter with safe_serialization=True, PEFT's default",
			dir, AdapterWeightsFile)
	}
	return fmt.Errorf("%s holds %s but no %s", dir, AdapterConfigFile, AdapterWeightsFile)
}

// LoadAdapter reads a PEFT LoRA adapter from dir and checks that it was
// made for m: every key must name one of m's layers and projections under
// the prefix PEFT uses for m's checkpoint, with shapes m implies.
func (m *ModelInfo) LoadAdapter(dir string) (*Adapter, error) {
	cb, err := os.ReadFile(filepath.Join(dir, AdapterConfigFile))
	if errors.Is(err, fs.ErrNotExist) {
		if cerr := CheckAdapterDir(dir); cerr != nil {
			return nil, cerr // what the folder is instead
		}
	}
	if err != nil {
		return nil, err
	}
	ac, err := parseAdapterConfig(cb)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(dir, AdapterConfigFile), err)
	}
	if ac.PeftType != "LORA" {
		return nil, fmt.Errorf("%s: peft_type %q is not LORA", dir, ac.PeftType)
	}
	var unsupported []string
	for _, u := range []struct {
		set  bool
		what string
	}{
		{ac.UseDora, "use_dora: true (DoRA)"},
		{ac.FanInFanOut, "fan_in_fan_out: true"},
		{ac.Bias != "" && ac.Bias != "none", fmt.Sprintf("bias: %q (trained biases)", ac.Bias)},
		{len(ac.RankPattern) > 0, "rank_pattern (a rank per module)"},
		{len(ac.AlphaPattern) > 0, "alpha_pattern (an alpha per module)"},
	} {
		if u.set {
			unsupported = append(unsupported, u.what)
		}
	}
	if len(unsupported) > 0 {
		return nil, fmt.Errorf("%s: not supported: %s; a plain LoRA adapter (one r and lora_alpha, no bias) is", dir, strings.Join(unsupported, ", "))
	}
	// An adapter of some layers only, or one that saves whole modules,
	// would otherwise fail as made for another model.
	if len(ac.LayersToTransform) > 0 || len(ac.ModulesToSave) > 0 {
		return nil, fmt.Errorf("%s: layers_to_transform and modules_to_save are not supported (an adapter of every layer's projections is)", dir)
	}
	lc := LoRAConfig{R: ac.R, Alpha: ac.LoraAlpha, Dropout: ac.LoraDropout, RSLoRA: ac.UseRSLora}
	if err := checkAdapterWeights(dir); err != nil {
		return nil, err
	}
	path := filepath.Join(dir, AdapterWeightsFile)
	f, err := safetensors.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	prefix := m.peftPrefix()
	if legacy := m.legacyPEFTPrefix(); legacy != "" && !hasKeyPrefix(f, prefix) && hasKeyPrefix(f, legacy) {
		prefix = legacy
	}
	names, err := targetNames(ac.TargetModules)
	if errors.Is(err, errForeignRegex) {
		// Another tool's regex (Unsloth writes one for multimodal
		// models): the file says which projections it adapted.
		names, err = fileTargets(f, prefix)
	}
	if err != nil {
		return nil, fmt.Errorf("%s: %w", dir, err)
	}
	for _, t := range names {
		mod, err := ParseModule(t)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", dir, err)
		}
		lc.Targets = append(lc.Targets, mod)
	}
	if err := lc.Validate(); err != nil {
		return nil, fmt.Errorf("%s: %w", dir, err)
	}
	a := &Adapter{Config: lc, Layers: make([]map[Module]*LoRAWeights, m.Config.Layers)}
	want := map[string]bool{}
	for li := range a.Layers {
		a.Layers[li] = map[Module]*LoRAWeights{}
		for _, mod := range lc.Targets {
			out, in := m.Config.ProjShape(mod)
			key := fmt.Sprintf("%slayers.%d.%s.%s", prefix, li, mod.parent(), mod)
			w := &LoRAWeights{R: lc.R, In: in, Out: out}
			for _, part := range []struct {
				name  string
				shape []int
				dst   *[]float32
			}{{".lora_A.weight", []int{lc.R, in}, &w.A}, {".lora_B.weight", []int{out, lc.R}, &w.B}} {
				name := key + part.name
				want[name] = true
				info, ok := f.Header.Lookup(name)
				if !ok {
					hint := ""
					if !hasKeyPrefix(f, prefix) && len(f.Header.Tensors) > 0 {
						hint = fmt.Sprintf("; the adapter's keys begin %q, where an adapter of this model's begin %q", keyStem(f.Header.Tensors[0].Name), prefix)
					}
					return nil, fmt.Errorf("%s: tensor %s missing: the adapter was not made for this model (%d layers, %s checkpoint)%s", path, name, m.Config.Layers, m.Config.Architecture, hint)
				}
				if !equalShape(info.Shape, part.shape) {
					if r, ok := otherRank(info.Shape, part.shape, part.name == ".lora_A.weight"); ok {
						return nil, fmt.Errorf("%s: tensor %s has rank %d, but %s says r %d: the adapter's files disagree",
							path, name, r, AdapterConfigFile, lc.R)
					}
					return nil, fmt.Errorf("%s: tensor %s has shape %v, this model needs %v: the adapter was made for another model", path, name, info.Shape, part.shape)
				}
				_, data, err := f.Float32(name)
				if err != nil {
					return nil, err
				}
				if i := firstNonFinite(data); i >= 0 {
					return nil, fmt.Errorf("%s: tensor %s holds a non-finite value at element %d", path, name, i)
				}
				*part.dst = data
			}
			// Gradients only once the file has shown the shapes are real.
			w.GradA, w.GradB = make([]float32, len(w.A)), make([]float32, len(w.B))
			a.Layers[li][mod] = w
		}
	}
	for _, t := range f.Header.Tensors {
		if !want[t.Name] {
			hint := ""
			if !strings.HasPrefix(t.Name, prefix) {
				hint = fmt.Sprintf(" (keys for this model start with %q)", prefix)
			}
			return nil, fmt.Errorf("%s: unexpected tensor %s%s: the adapter was made for another model or target modules", path, t.Name, hint)
		}
	}
	return a, nil
}

// otherRank says whether a LoRA tensor of shape got differs from want
// only in its rank (A is [r × in], B is [out × r]), and what that rank is.
func otherRank(got, want []int, isA bool) (int, bool) {
	if len(got) != 2 || len(want) != 2 {
		return 0, false
	}
	if isA {
		return got[0], got[1] == want[1]
	}
	return got[1], got[0] == want[0]
}

// multimodalTargetPrefix begins the target_modules regex written for
// multimodal checkpoints: `.*language_model.*\.(q_proj|v_proj)`.
const multimodalTargetPrefix = `.*language_model.*\.(`

// errForeignRegex: target_modules is a regex other than the one SaveAdapter
// writes.
var errForeignRegex = errors.New("target_modules is a regex")

// hasKeyPrefix says whether a tensor of f begins with prefix.
func hasKeyPrefix(f *safetensors.File, prefix string) bool {
	for _, t := range f.Header.Tensors {
		if strings.HasPrefix(t.Name, prefix) {
			return true
		}
	}
	return false
}

// keyStem is a LoRA tensor's name up to its layer number, for messages.
func keyStem(name string) string {
	if i := strings.Index(name, "layers."); i >= 0 {
		return name[:i+len("layers.")]
	}
	return name
}

// fileTargets are the projections whose LoRA tensors f holds under prefix,
// in AllModules' order.
func fileTargets(f *safetensors.File, prefix string) ([]string, error) {
	seen := map[string]bool{}
	for _, t := range f.Header.Tensors {
		rest, ok := strings.CutPrefix(t.Name, prefix+"layers.")
		if !ok {
			continue
		}
		parts := strings.Split(rest, ".") // N, self_attn|mlp, q_proj, lora_A, weight
		if len(parts) == 5 {
			seen[parts[2]] = true
		}
	}
	var names []string
	for _, m := range AllModules {
		if seen[string(m)] {
			names = append(names, string(m))
		}
	}
	if len(names) == 0 {
		return nil, fmt.Errorf("%s: no LoRA tensors of the text model's projections (under %q)", AdapterWeightsFile, prefix+"layers.")
	}
	return names, nil
}

// targetNames reads target_modules: a list of module names, or the
// language-model regex SaveAdapter writes for multimodal checkpoints;
// another regex is errForeignRegex.
func targetNames(v any) ([]string, error) {
	switch t := v.(type) {
	case []any:
		var out []string
		for _, x := range t {
			s, ok := x.(string)
			if !ok {
				return nil, fmt.Errorf("target_modules holds %v, not a name", x)
			}
			out = append(out, s)
		}
		return out, nil
	case string:
		if strings.HasPrefix(t, multimodalTargetPrefix) && strings.HasSuffix(t, ")") {
			return strings.Split(t[len(multimodalTargetPrefix):len(t)-1], "|"), nil
		}
		return nil, fmt.Errorf("%w (%q)", errForeignRegex, t)
	}
	return nil, fmt.Errorf("target_modules must be a list of module names, got %v", v)
}
