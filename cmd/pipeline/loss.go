package main

import (
	"encoding/json"
	"errors"
	"fmt"

	"github.com/spf13/cobra"

	"gemmaft/trainer"
)

func init() {
	var modelDir, adapterDir, quantize, dataPath string
	cmd := &cobra.Command{
		Use:   "loss --model DIR [--adapter DIR] [--quantize nf4] --data FILE",
		Short: "Print the mean token loss of packed rows under a model",
		Long: `loss runs the CPU reference model over packed rows and prints
{"loss": ..., "tokens": ...}: the mean cross-entropy over trained tokens
(logits at t predict labels[t+1]; -100 is not trained) and their number.

--data is the pack stage's Arrow IPC file or JSON lines of
{"input_ids": [...], "labels": [...], "seq_lengths": [...]}.
--model is a Hugging Face Gemma 3 checkpoint directory; --adapter a PEFT
LoRA adapter directory for it; --quantize nf4 quantises the projections as
QLoRA does before computing.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if modelDir == "" || dataPath == "" {
				return usageErr(errors.New("loss: --model and --data are required"))
			}
			if quantize != "" && quantize != "nf4" {
				return usageErr(fmt.Errorf("loss: --quantize %q: only nf4 is supported", quantize))
			}
			m, err := trainer.LoadModel(modelDir)
			if err != nil {
				return failErr(err)
			}
			if quantize == "nf4" {
				if err := m.QuantizeNF4(); err != nil {
					return failErr(err)
				}
			}
			var a *trainer.Adapter
			if adapterDir != "" {
				if a, err = m.LoadAdapter(adapterDir); err != nil {
					return failErr(err)
				}
			}
			rows, err := trainer.ReadPackedRows(dataPath)
			if err != nil {
				return failErr(err)
			}
			var sum float64
			var tokens int
			for i, row := range rows {
				b, err := trainer.NewBatch([]trainer.PackedRow{row})
				if err != nil {
					return failErr(fmt.Errorf("%s: row %d: %w", dataPath, i, err))
				}
				s, n, err := m.Loss(a, b)
				if err != nil {
					return failErr(fmt.Errorf("%s: row %d: %w", dataPath, i, err))
				}
				sum, tokens = sum+s, tokens+n
			}
			if tokens == 0 {
				return failErr(fmt.Errorf("%s: no trained tokens (every label is -100)", dataPath))
			}
			out, _ := json.Marshal(map[string]any{"loss": sum / float64(tokens), "tokens": tokens})
			fmt.Fprintln(cmd.OutOrStdout(), string(out))
			return nil
		},
	}
	cmd.Flags().StringVar(&modelDir, "model", "", "Gemma 3 checkpoint directory (config.json + safetensors)")
	cmd.Flags().StringVar(&adapterDir, "adapter", "", "PEFT LoRA adapter directory")
	cmd.Flags().StringVar(&quantize, "quantize", "", "quantise the base projections: nf4")
	cmd.Flags().StringVar(&dataPath, "data", "", "packed rows: Arrow IPC file or JSON lines")
	root.AddCommand(cmd)
}
