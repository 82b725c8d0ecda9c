package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"

	"github.com/spf13/cobra"

	"gemmaft/trainer"
)

func init() {
	var modelDir, adapterDir, quantize, dataPath, backend string
	var otherBase bool
	cmd := &cobra.Command{
		Use:   "loss --model DIR [--adapter DIR] [--quantize nf4|none] [--backend auto|cpu|cuda] --data FILE",
		Short: "Print the mean token loss of packed rows under a model",
		Long: `loss runs the model over packed rows and prints {"loss": ..., "tokens": ...,
"backend": ...}: the mean cross-entropy over trained tokens (logits at t
predict labels[t+1]; -100 is not trained) and their number.

--data is the pack stage's Arrow IPC file or JSON lines of
{"input_ids": [...], "labels": [...], "seq_lengths": [...]}.
--model is a Hugging Face Gemma 3 checkpoint directory (or hf://ORG/NAME@REV,
fetched into the Hugging Face cache); --adapter a PEFT
LoRA adapter directory for it; --quantize nf4 quantises the projections as
QLoRA does before computing (the default for an adapter of the cache that a
qlora stage trained on the NF4 base, as the eval stage scores it; none
keeps the stored weights). --backend picks the CPU reference or the GPU
trainer (auto: the GPU when one is usable).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if modelDir == "" || dataPath == "" {
				return usageErr(errors.New("loss: --model and --data are required"))
			}
			if quantize != "" && quantize != "nf4" && quantize != "none" {
				return usageErr(fmt.Errorf("loss: --quantize %q: use nf4 or none", quantize))
			}
			b, _, err := trainer.ResolveBackend(backend)
			if err != nil {
				return failErr(fmt.Errorf("loss: %w", err))
			}
			if modelDir, err = localArg(cmd.Context(), "model", modelDir, argFolder); err != nil {
				return err
			}
			if adapterDir, err = localArg(cmd.Context(), "adapter", adapterDir, argFolder); err != nil {
				return err
			}
			if adapterDir != "" {
				trainedOn, err := checkAdapterArg("loss", modelDir, adapterDir, otherBase)
				if err != nil {
					return err
				}
				if trainedOn == "nf4" && quantize == "" {
					quantize = "nf4"
					fmt.Fprintln(os.Stderr, "loss: the adapter was trained on the NF4 base (a qlora stage's quantize: nf4); scoring through NF4 as the eval stage does (--quantize none for the original weights)")
				}
			}
			rows, err := trainer.ReadPackedRows(dataPath)
			if err != nil {
				return failErr(err)
			}
			if len(rows) == 0 {
				return failErr(fmt.Errorf("%s: no rows", dataPath))
			}
			ck, err := trainer.OpenCheckpoint(modelDir)
			if err != nil {
				return failErr(err)
			}
			// Without an adapter the session's LoRA B stays zero: the base model.
			var a *trainer.Adapter
			lora := trainer.LoRAConfig{R: 1, Alpha: 1, Targets: []trainer.Module{trainer.QProj}}
			if adapterDir != "" {
				if a, err = ck.LoadAdapter(adapterDir); err != nil {
					return failErr(err)
				}
				lora = a.Config
			}
			maxTokens := 0
			for _, r := range rows {
				maxTokens = max(maxTokens, len(r.InputIDs))
			}
			if c := ck.Config; c.MaxPositions > 0 && maxTokens > c.MaxPositions {
				notice(slog.LevelWarn, fmt.Sprintf("loss: warning: rows of up to %d tokens, more than the model's context of %d positions (max_position_embeddings): the loss past it is of positions the model was never trained for", maxTokens, c.MaxPositions))
			}
			cfg := trainer.SessionConfig{Model: modelDir, Quantize: "none", LoRA: lora, Inference: true, MaxTokens: maxTokens}
			if quantize == "nf4" {
				cfg.Quantize = "nf4"
			}
			if err := cfg.Validate(); err != nil {
				return failErr(err)
			}
			sess, err := b.Open(cmd.Context(), cfg)
			if err != nil {
				return failErr(err)
			}
			defer sess.Close()
			if a == nil {
				if a, err = trainer.NewAdapter(ck.Config, lora, 0); err != nil {
					return failErr(err)
				}
			}
			if err := sess.SetState(a, nil); err != nil {
				return failErr(err)
			}
			var sum float64
			var tokens int
			for i, row := range rows {
				batch, err := trainer.NewBatch([]trainer.PackedRow{row})
				if err != nil {
					return failErr(fmt.Errorf("%s: packed row %d: %w", dataPath, i+1, err))
				}
				s, n, err := sess.Loss(batch)
				if err != nil {
					return failErr(fmt.Errorf("%s: packed row %d: %w", dataPath, i+1, err))
				}
				sum, tokens = sum+s, tokens+n
			}
			if tokens == 0 {
				return failErr(fmt.Errorf("%s: no trained tokens (every label is -100)", dataPath))
			}
			out, _ := json.Marshal(map[string]any{"loss": sum / float64(tokens), "tokens": tokens, "backend": b.Name()})
			fmt.Fprintln(cmd.OutOrStdout(), string(out))
			return nil
		},
	}
	cmd.Flags().StringVar(&modelDir, "model", "", "Gemma 3 checkpoint directory (config.json + safetensors), or hf://ORG/NAME[@REV]")
	cmd.Flags().StringVar(&adapterDir, "adapter", "", "PEFT LoRA adapter directory, or hf://ORG/NAME[@REV]")
	cmd.Flags().BoolVar(&otherBase, "other-base", false, "score an adapter of the cache on --model even where that is not the checkpoint it was trained on")
	cmd.Flags().StringVar(&quantize, "quantize", "", "quantise the base projections: nf4, or none (default: nf4 for an adapter a qlora stage trained on NF4, else none)")
	cmd.Flags().StringVar(&dataPath, "data", "", "packed rows: Arrow IPC file or JSON lines")
	cmd.Flags().StringVar(&backend, "backend", "auto", "cpu, cuda, or auto (the GPU when usable)")
	root.AddCommand(cmd)
}
