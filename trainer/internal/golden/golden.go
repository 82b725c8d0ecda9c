// Package golden reads the Hugging Face parity cases under
// trainer/testdata/reference: each case's inputs (written by
// trainer/internal/refgen) and the float64 outputs of transformers + PEFT
// (written by scripts/reference/reference.py). It imports no trainer code,
// so the trainer's own tests and the backend conformance suite both use it.
package golden

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"sort"

	"gemmaft/trainer/safetensors"
)

// Golden is what scripts/reference/reference.py computed for a case with
// transformers + PEFT in float64.
type Golden struct {
	Loss         float64 `json:"loss"`
	Tokens       int     `json:"tokens"`
	GradNorm     float64 `json:"grad_norm"`
	MaxNorm      float64 `json:"max_norm"`
	PostStepLoss float64 `json:"post_step_loss"`
	EmbedScale   float64 `json:"embed_scale"`
	LoRATensors  int     `json:"lora_tensors"`
}

// Optimizer holds a case's AdamW settings.
type Optimizer struct {
	LR          float64 `json:"lr"`
	WeightDecay float64 `json:"weight_decay"`
	Beta1       float64 `json:"beta1"`
	Beta2       float64 `json:"beta2"`
	Eps         float64 `json:"eps"`
}

// Case is one committed parity case with its golden outputs.
type Case struct {
	Name      string
	Dir       string // the case's inputs: model/, adapter/, batch.jsonl
	Golden    Golden
	Optimizer Optimizer
	tensors   string // golden.safetensors
}

// Cases lists the cases under a reference folder (testdata/reference).
func Cases(refDir string) ([]Case, error) {
	paths, err := filepath.Glob(filepath.Join(refDir, "golden", "*", "golden.json"))
	if err != nil {
		return nil, err
	}
	sort.Strings(paths)
	var out []Case
	for _, p := range paths {
		name := filepath.Base(filepath.Dir(p))
		c := Case{Name: name, Dir: filepath.Join(refDir, name), tensors: filepath.Join(filepath.Dir(p), "golden.safetensors")}
		if err := ReadJSON(p, &c.Golden); err != nil {
			return nil, err
		}
		if err := ReadJSON(filepath.Join(c.Dir, "case.json"), &c.Optimizer); err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	return out, nil
}

// ReadJSON decodes a golden JSON file (schedules.json, nf4.json, ...).
func ReadJSON(path string, v any) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}

// Model is the case's checkpoint folder, AdapterDir its PEFT adapter.
func (c Case) Model() string      { return filepath.Join(c.Dir, "model") }
func (c Case) AdapterDir() string { return filepath.Join(c.Dir, "adapter") }

// RowsFile is the case's packed rows (JSON lines).
func (c Case) RowsFile() string { return filepath.Join(c.Dir, "batch.jsonl") }

// Tensor reads a float64 golden tensor ("grad.<peft key>", "logits.row0.ex0").
func (c Case) Tensor(name string) ([]float64, error) {
	f, err := safetensors.Open(c.tensors)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	info, raw, err := f.Raw(name)
	if err != nil {
		return nil, err
	}
	if info.DType != safetensors.F64 {
		return nil, fmt.Errorf("%s: %s is %s, want F64", c.tensors, name, info.DType)
	}
	out := make([]float64, len(raw)/8)
	for i := range out {
		out[i] = math.Float64frombits(binary.LittleEndian.Uint64(raw[8*i:]))
	}
	return out, nil
}

// GradKey is the golden tensor name of a LoRA parameter's gradient.
func GradKey(peftPrefix, param string) string { return "grad." + peftPrefix + param + ".weight" }
