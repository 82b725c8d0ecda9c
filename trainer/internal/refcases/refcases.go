// Package refcases writes the inputs of the Hugging Face parity check:
// tiny random Gemma 3 checkpoints in several layouts, LoRA adapters with
// non-zero B (one written by Train), packed batches and optimizer settings.
// The Python reference (scripts/reference/reference.py) reads them and
// writes the golden outputs that trainer's tests compare with; a test
// checks that Write still reproduces the committed inputs byte for byte.
package refcases

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"

	"gemmaft/trainer"
	"gemmaft/trainer/safetensors"
)

// Write writes every case, and the NF4 test weight, under out.
func Write(out string) error {
	for i, c := range cases {
		if err := writeCase(filepath.Join(out, c.Name), c, uint64(100+i)); err != nil {
			return fmt.Errorf("%s: %w", c.Name, err)
		}
	}
	return writeNF4Input(filepath.Join(out, "nf4"))
}

// refCase is one parity case; the JSON fields are what the reference reads.
type refCase struct {
	Name        string  `json:"name"`
	LR          float64 `json:"lr"`
	WeightDecay float64 `json:"weight_decay"`
	Beta1       float64 `json:"beta1"`
	Beta2       float64 `json:"beta2"`
	Eps         float64 `json:"eps"`
	ClipFrac    float64 `json:"clip_fraction"` // max_norm = clip_fraction × the gradient norm
	config      func() *trainer.Config
	format      trainer.ConfigFormat
	lora        trainer.LoRAConfig
	rows        [][]int32 // seq_lengths of each row; rows are seqLen long
	seqLen      int
	// trained replaces the random adapter by the one Train writes after a
	// few QLoRA steps (NF4 base, dropout) on the case's rows.
	trained bool
}

func shape(vocab, hidden, mlp, layers, heads, kv, headDim int, qpas float64, window int, dtype string) *trainer.Config {
	c, _ := trainer.Preset("tiny")
	c.VocabSize, c.Hidden, c.Intermediate, c.Layers = vocab, hidden, mlp, layers
	c.Heads, c.KVHeads, c.HeadDim, c.QueryPreAttnScalar, c.SlidingWindow = heads, kv, headDim, qpas, window
	c.DType = dtype
	c.LayerTypes = nil
	for i := 0; i < layers; i++ {
		lt := trainer.SlidingAttention
		if (i+1)%6 == 0 {
			lt = trainer.FullAttention
		}
		c.LayerTypes = append(c.LayerTypes, lt)
	}
	return c
}

var cases = []refCase{
	{
		Name: "t5_gqa", LR: 1e-2, WeightDecay: 0.1, Beta1: 0.9, Beta2: 0.999, Eps: 1e-8, ClipFrac: 0.5,
		config: func() *trainer.Config {
			c := shape(128, 32, 48, 7, 4, 2, 8, 12, 3, "bfloat16")
			c.Rope[trainer.FullAttention] = trainer.Rope{Theta: 1e6, Type: "linear", Factor: 2}
			return c
		},
		format: trainer.FormatTransformers5,
		lora:   trainer.LoRAConfig{R: 4, Alpha: 8, Targets: trainer.AllModules},
		rows:   [][]int32{{5, 7}, {16}, {3, 9, 4}}, seqLen: 16,
	},
	{
		Name: "orig_mqa", LR: 5e-3, WeightDecay: 0.0, Beta1: 0.9, Beta2: 0.99, Eps: 1e-6, ClipFrac: 2,
		config: func() *trainer.Config {
			c := shape(96, 48, 64, 8, 4, 1, 16, 24, 5, "bfloat16")
			c.Rope[trainer.FullAttention] = trainer.Rope{Theta: 1e6, Type: "linear", Factor: 8}
			return c
		},
		format: trainer.FormatOriginal,
		lora:   trainer.LoRAConfig{R: 2, Alpha: 16, Targets: []trainer.Module{trainer.QProj, trainer.VProj, trainer.UpProj, trainer.DownProj}},
		rows:   [][]int32{{10, 6}, {20}}, seqLen: 20,
	},
	{
		Name: "mm_f32", LR: 2e-3, WeightDecay: 0.01, Beta1: 0.8, Beta2: 0.999, Eps: 1e-8, ClipFrac: 0.25,
		config: func() *trainer.Config {
			c := shape(80, 32, 64, 7, 2, 2, 16, 16, 4, "float32")
			c.Multimodal = true
			c.Architecture = "Gemma3ForConditionalGeneration"
			return c
		},
		format: trainer.FormatOriginal,
		lora:   trainer.LoRAConfig{R: 3, Alpha: 3, Targets: []trainer.Module{trainer.KProj, trainer.OProj, trainer.GateProj}},
		rows:   [][]int32{{4, 4, 4}, {11}}, seqLen: 12,
	},
	{
		Name: "trained_qlora", LR: 1e-2, WeightDecay: 0.01, Beta1: 0.9, Beta2: 0.999, Eps: 1e-8, ClipFrac: 0.5,
		config: func() *trainer.Config {
			c := shape(112, 32, 64, 7, 4, 1, 8, 8, 6, "bfloat16")
			c.Rope[trainer.FullAttention] = trainer.Rope{Theta: 1e6, Type: "linear", Factor: 8}
			return c
		},
		format: trainer.FormatTransformers5,
		lora:   trainer.LoRAConfig{R: 4, Alpha: 8, Dropout: 0.05, Targets: trainer.AllModules},
		rows:   [][]int32{{9, 7}, {16}, {5, 5, 6}, {12}}, seqLen: 16,
		trained: true,
	},
	{
		// Rank-stabilised LoRA: PEFT scales by alpha / √r (16 / √8 ≈ 5.66,
		// where alpha / r would give 2).
		Name: "rslora_gqa", LR: 1e-2, WeightDecay: 0.05, Beta1: 0.9, Beta2: 0.999, Eps: 1e-8, ClipFrac: 0.5,
		config: func() *trainer.Config {
			return shape(88, 32, 48, 7, 4, 2, 16, 16, 4, "bfloat16")
		},
		format: trainer.FormatTransformers5,
		lora:   trainer.LoRAConfig{R: 8, Alpha: 16, RSLoRA: true, Targets: []trainer.Module{trainer.QProj, trainer.KProj, trainer.VProj, trainer.OProj, trainer.DownProj}},
		rows:   [][]int32{{6, 8}, {14}, {4, 10}}, seqLen: 14,
	},
}

func writeCase(dir string, c refCase, seed uint64) error {
	cfg := c.config()
	modelDir := filepath.Join(dir, "model")
	if err := trainer.WriteRandomCheckpoint(modelDir, cfg, trainer.InitOptions{Seed: seed, Std: 0.1, NormStd: 0.5, Format: c.format}); err != nil {
		return err
	}
	m, err := trainer.LoadModel(modelDir)
	if err != nil {
		return err
	}
	a, err := trainer.NewAdapter(cfg, c.lora, seed)
	if err != nil {
		return err
	}
	rng := rand.New(rand.NewPCG(seed, 77))
	for _, p := range a.Params() {
		if len(p.Name) > 6 && p.Name[len(p.Name)-6:] == "lora_B" {
			for i := range p.Data {
				p.Data[i] = float32(rng.NormFloat64() * 0.05)
			}
		}
	}
	if err := m.SaveAdapter(filepath.Join(dir, "adapter"), a, trainer.BaseModel{NameOrPath: "model"}); err != nil {
		return err
	}
	f, err := os.Create(filepath.Join(dir, "batch.jsonl"))
	if err != nil {
		return err
	}
	defer f.Close()
	enc := json.NewEncoder(f)
	for _, lens := range c.rows {
		row := map[string][]int32{"seq_lengths": lens}
		used := 0
		for _, l := range lens {
			for j := 0; j < int(l); j++ {
				row["input_ids"] = append(row["input_ids"], int32(rng.IntN(cfg.VocabSize)))
				label := int32(rng.IntN(cfg.VocabSize))
				if j == 0 || j < int(l)/3 { // the prompt part is not trained
					label = trainer.IgnoreIndex
				}
				row["labels"] = append(row["labels"], label)
				row["position_ids"] = append(row["position_ids"], int32(j))
			}
			used += int(l)
		}
		for ; used < c.seqLen; used++ {
			row["input_ids"] = append(row["input_ids"], 0)
			row["labels"] = append(row["labels"], trainer.IgnoreIndex)
			row["position_ids"] = append(row["position_ids"], 0)
		}
		if err := enc.Encode(row); err != nil {
			return err
		}
	}
	if c.trained {
		if err := trainAdapter(dir, m, c); err != nil {
			return err
		}
	}
	b, _ := json.MarshalIndent(c, "", "  ")
	return os.WriteFile(filepath.Join(dir, "case.json"), b, 0o644)
}

// trainAdapter runs Train as the qlora stage does (NF4 base, dropout,
// gradient accumulation) on the case's rows and puts its adapter in place
// of the random one.
func trainAdapter(dir string, m *trainer.Model, c refCase) error {
	rows, err := trainer.ReadPackedRows(filepath.Join(dir, "batch.jsonl"))
	if err != nil {
		return err
	}
	if err := m.QuantizeBase(); err != nil {
		return err
	}
	out, err := os.MkdirTemp("", "refgen-train")
	if err != nil {
		return err
	}
	defer os.RemoveAll(out)
	s, err := trainer.NewCPUSession(m, trainer.SessionConfig{LoRA: c.lora, GradientCheckpointing: true})
	if err != nil {
		return err
	}
	res, err := trainer.Train(context.Background(), s, trainer.Rows(rows), trainer.TrainOptions{
		LR: 2e-2, BatchSize: 1, GradAccum: 2, Epochs: 2, Seed: 9, OutDir: out, BaseModel: trainer.BaseModel{NameOrPath: "model"},
	})
	if err != nil {
		return err
	}
	for _, name := range []string{trainer.AdapterWeightsFile, trainer.AdapterConfigFile} {
		b, err := os.ReadFile(filepath.Join(res.AdapterDir, name))
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(dir, "adapter", name), b, 0o644); err != nil {
			return err
		}
	}
	return nil
}

// writeNF4Input writes a bf16 weight whose NF4 quantisation the reference
// computes independently. Its 3 × 64 × 96 elements span several 256-block
// groups of absmax values, the last one partial.
func writeNF4Input(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	rng := rand.New(rand.NewPCG(5, 5))
	rows, cols := 3*64, 96*2
	w := make([]float32, rows*cols)
	for i := range w {
		// Heavy-ish tails and varying block scales, like real weights.
		w[i] = float32(rng.NormFloat64() * 0.02 * (1 + float64(i/640%7)))
	}
	raw, err := safetensors.EncodeFloat32(safetensors.BF16, w)
	if err != nil {
		return err
	}
	return safetensors.WriteFile(filepath.Join(dir, "weight.safetensors"),
		[]safetensors.Tensor{{Name: "weight", DType: safetensors.BF16, Shape: []int{rows, cols}, Data: raw}}, nil)
}
