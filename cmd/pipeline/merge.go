package main

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"gemmaft/stages"
	"gemmaft/trainer"
)

func init() {
	var modelDir, adapterDir, out, base, tokDir string
	var otherBase bool
	var shardGB float64
	cmd := &cobra.Command{
		Use:   "merge --model DIR --adapter DIR --out DIR [--base dequantized|original]",
		Short: "Merge a LoRA adapter into its base checkpoint",
		Long: `merge writes --model with the PEFT LoRA adapter --adapter merged into it as a new
Hugging Face checkpoint folder --out (which must not exist): bf16 safetensors in
shards of at most --max-shard-gb (with model.safetensors.index.json when there
are several), the base's config.json and generation_config.json, and its
tokenizer files with the chat template. A multimodal checkpoint keeps its vision tower. Tensors stream one at a
time, so a 27B merge needs a few GiB of memory.

--base dequantized (the default) merges into the NF4 round trip of the weights:
the base a QLoRA adapter was trained against, so the merged model computes what
training optimised. --base original merges into the weights as stored, which is
right for an adapter trained without quantisation (qlora's quantize: none), and
the default for such an adapter given as a qlora stage's entry. A cached adapter
is also checked against --model: the checkpoint it was trained on, unless
--other-base.

--tokenizer names a folder with tokenizer.json when --model has none; for an
adapter of the cache it defaults to the tokenizer its training data was
tokenized with, as the merge stage's.
In a DAG, the merge stage kind does the same from a qlora stage, and adds a
model card (README.md) and the Gemma NOTICE.`,
		Example: `  pipeline merge --model models/gemma-3-12b-it --adapter run/adapter --out gemma3-12b-tr`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if modelDir == "" || adapterDir == "" || out == "" {
				return usageErr(errors.New("merge: --model, --adapter and --out are required"))
			}
			if strings.EqualFold(filepath.Ext(out), ".gguf") {
				return usageErr(fmt.Errorf("merge: --out %s: merge writes a Hugging Face checkpoint folder; merge into a folder, then convert it with pipeline gguf --model FOLDER --out %s", out, out))
			}
			mb := trainer.MergeBase(base)
			if mb != trainer.MergeDequantized && mb != trainer.MergeOriginal {
				return usageErr(fmt.Errorf("merge: --base %q: want dequantized or original", base))
			}
			if !(shardGB > 0) {
				return usageErr(fmt.Errorf("merge: --max-shard-gb must be positive"))
			}
			var err error
			for _, a := range []struct {
				flag string
				v    *string
				kind argKind
			}{{"model", &modelDir, argFolder}, {"adapter", &adapterDir, argFolder}, {"tokenizer", &tokDir, argTokenizerDir}} {
				if *a.v, err = localArg(cmd.Context(), a.flag, *a.v, a.kind); err != nil {
					return err
				}
			}
			if err := modelOutFree(out); err != nil {
				return err
			}
			// A folder that is no checkpoint is said so before its lack
			// of a tokenizer.
			if _, err := trainer.LoadConfig(modelDir); err != nil {
				return usageErr(fmt.Errorf("merge: --model: %w", err))
			}
			if tokDir == "" && !trainer.ShipsOwnTokenizer(modelDir) {
				// An adapter of the cache: the tokenizer its data was
				// tokenized with, as the merge stage takes it.
				found, err := stages.CachedAdapterTokenizer(adapterDir)
				if found == "" {
					why := ""
					if err != nil {
						why = " (" + err.Error() + ")"
					}
					return usageErr(fmt.Errorf("merge: %s has no tokenizer.json; give --tokenizer DIR, the folder of the tokenizer the adapter was trained with%s", modelDir, why))
				}
				tokDir = found
				notice(slog.LevelInfo, "merge: the tokenizer the adapter's training data was tokenized with: "+filepath.Join(found, "tokenizer.json"))
			}
			trainedOn, err := checkAdapterArg("merge", modelDir, adapterDir, otherBase)
			if err != nil {
				return err
			}
			// As the merge stage does: the weights the adapter trained against.
			switch {
			case trainedOn == "none" && !cmd.Flags().Changed("base"):
				mb = trainer.MergeOriginal
				notice(slog.LevelInfo, "merge: the adapter was trained on the unquantised base (quantize: none); merging into the original weights")
			case trainedOn == "none" && mb == trainer.MergeDequantized:
				notice(slog.LevelWarn, "merge: warning: the adapter was trained on the unquantised base (quantize: none), and --base dequantized merges it into the NF4 round trip of the weights; leave --base out to merge into the original weights it trained against")
			case trainedOn == "nf4" && mb == trainer.MergeOriginal:
				notice(slog.LevelWarn, "merge: warning: the adapter was trained against the NF4 round trip of the base (quantize: nf4), and --base original merges it into the original weights; the default, dequantized, is what it trained against")
			}
			ctx, stop := signalContext(10 * time.Second)
			defer stop()
			err = trainer.MergeAdapter(ctx, modelDir, adapterDir, out, trainer.MergeOptions{
				Base: mb, TokenizerDir: tokDir, MaxShardBytes: int64(shardGB * 1e9)})
			if err != nil {
				return failErr(err)
			}
			notice(slog.LevelInfo, "wrote "+out)
			if _, err := os.Stat(filepath.Join(out, "tokenizer_config.json")); err != nil {
				// What --tokenizer named held tokenizer.json alone.
				notice(slog.LevelWarn, fmt.Sprintf("pipeline: warning: %s has no tokenizer_config.json (special tokens and the chat template), which apply_chat_template and pipeline gguf need: copy the base model's into it", out))
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&modelDir, "model", "", "base checkpoint folder, or hf://ORG/NAME[@REV]")
	f.StringVar(&adapterDir, "adapter", "", "PEFT LoRA adapter folder, or hf://ORG/NAME[@REV]")
	f.StringVar(&out, "out", "", "new checkpoint folder (must not exist)")
	f.StringVar(&base, "base", string(trainer.MergeDequantized), "dequantized or original")
	f.StringVar(&tokDir, "tokenizer", "", "folder with tokenizer.json (or hf://ORG/NAME[@REV]), when --model has none (an adapter of the cache: the one its data was tokenized with)")
	f.BoolVar(&otherBase, "other-base", false, "merge an adapter of the cache into --model even where that is not the checkpoint it was trained on")
	f.Float64Var(&shardGB, "max-shard-gb", 5, "largest shard, in GB")
	root.AddCommand(cmd)
}
