package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"gemmaft/gguf"
	"gemmaft/pipeline"
)

func init() {
	var modelDir, adapterDir, out, typeName, name string
	cmd := &cobra.Command{
		Use:   "gguf --model DIR [--adapter DIR] --out NAME.TYPE.gguf [--type q8_0|q4_k_m|...]",
		Short: "Convert a Gemma 3 checkpoint folder, or a LoRA adapter, to a GGUF file for llama.cpp and Ollama",
		Long: `gguf converts the Hugging Face checkpoint folder --model (a merged model, from
pipeline merge or another tool's merge, with its tokenizer.json) to the GGUF file
--out (which must not exist), as a gguf stage does in a DAG: llama.cpp's gemma3
layout, the tokenizer and chat template inside, a multimodal checkpoint's text
model only.

--type is one of llama-quantize's types: q8_0 (the default: near-lossless,
53% of bf16's size), q6_k (41%), q5_k_m (36%), q5_k_s, q4_k_m (30%, Ollama's
usual choice), q4_k_s, q5_1, q5_0, q4_0 (28%), or f16, bf16, f32 (the sizes
are the 4B's and larger; q4_k and q5_k read as their _m mixes). Each tensor
gets the type and the bytes llama-quantize would give it without an importance
matrix: the embedding (tied to the output head) q6_K, and in the _m mixes
attn_v and ffn_down of an eighth of the layers at each end and every third
between; where a k-quant's 256-value blocks do not fit a row (the 1B's 1152)
a 32-value type stands in, and the embedding is q8_0. An --out named NAME.TYPE.gguf (or NAME-TYPE.gguf, as the Hub names them) gives the type when --type is
left out. llama.cpp's 2- and 3-bit and i-quants are made from a q8_0 or f16 file
with its llama-quantize. general.name is --name, by default --out's NAME. The
file appears only complete; an interrupt leaves nothing.

With --adapter, a PEFT LoRA adapter folder (this tool's, or PEFT's or
Unsloth's) made for --model, --out is the adapter as a GGUF LoRA file, as
llama.cpp's convert_lora_to_gguf.py writes it, in f32 (the default), f16 or
bf16 (of an hf:// base only its config and weight index are fetched): llama.cpp
applies it to a GGUF of that base (llama-cli -m BASE.gguf
--lora ADAPTER.gguf; llama-server --lora loads several and switches between
them), so a retrained adapter ships without a new model file. A
rank-stabilised adapter is written with the alpha that gives llama.cpp its
scale. Under QLoRA the adapter was trained against the NF4 base; applied to a
q8_0 or f16 GGUF of the original weights it computes what PEFT computes on
them.`,
		Example: `  pipeline gguf --model gemma3-12b-tr --out gemma3-12b-tr.q8_0.gguf
  pipeline gguf --model gemma3-12b-tr --type q4_k_m --out tr.gguf --name gemma3-12b-tr
  pipeline gguf --model hf://google/gemma-3-12b-it --adapter tr-adapter --out tr-lora.f16.gguf`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if modelDir == "" || out == "" {
				return usageErr(errors.New("gguf: --model and --out are required"))
			}
			if typeName == "" {
				typeName = "q8_0" // or what --out's name says
			}
			typ, err := gguf.ParseFileType(typeName)
			if err != nil {
				return usageErr(fmt.Errorf("--type: %w", err))
			}
			flagged := cmd.Flags().Changed("type")
			given := flagged
			if typ, given, err = ggufOutType(out, typ, given); err != nil {
				return err
			}
			if adapterDir != "" {
				switch {
				case !given:
					typ = gguf.AllF32
				case typ != gguf.AllF32 && typ != gguf.MostlyF16 && typ != gguf.MostlyBF16:
					why := "--type " + typ.String() + ":"
					if !flagged {
						why = "--out " + out + " is named for type " + typ.String() + ", but"
					}
					return usageErr(fmt.Errorf("%s a LoRA adapter is written in f32, f16 or bf16 (llama.cpp applies it to a base of any type)", why))
				}
			}
			if !strings.EqualFold(filepath.Ext(out), ".gguf") {
				return usageErr(fmt.Errorf("--out %s: name the file NAME.gguf (or NAME.%s.gguf)", out, typ))
			}
			// --out is checked before an hf:// model downloads.
			if err := modelOutFree(out); err != nil {
				return err
			}
			if err := makeOutDir(out); err != nil { // as export makes its --out's
				return err
			}
			if err := checkWritable(out, "model.gguf"); err != nil {
				return usageErr(fmt.Errorf("--out: %w", err))
			}
			kind := argFolder
			if adapterDir != "" {
				kind = argShapes // an adapter's base: its weights are not read
			}
			if modelDir, err = localArg(cmd.Context(), "model", modelDir, kind); err != nil {
				return err
			}
			if adapterDir != "" {
				if adapterDir, err = localArg(cmd.Context(), "adapter", adapterDir, argFolder); err != nil {
					return err
				}
			}
			if name == "" {
				name = ggufName(out)
			}
			ctx, stop := signalContext(10 * time.Second)
			defer stop()
			if adapterDir != "" {
				if err := gguf.Gemma3LoRA(ctx, modelDir, adapterDir, out, gguf.LoRAOptions{Type: typ, Name: name}); err != nil {
					return failErr(err)
				}
				notice(slog.LevelInfo, fmt.Sprintf("wrote %s (a LoRA adapter, %s): llama-cli -m BASE.gguf --lora %s", out, typ, shellQuote(out)))
				return nil
			}
			if err := convertGGUF(ctx, modelDir, out, gguf.Options{Type: typ, Name: name}); err != nil {
				return failErr(err)
			}
			notice(slog.LevelInfo, fmt.Sprintf("wrote %s (%s)", out, typ))
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&modelDir, "model", "", "checkpoint folder with tokenizer.json, or hf://ORG/NAME[@REV]; with --adapter, the base it was made for")
	f.StringVar(&adapterDir, "adapter", "", "a PEFT LoRA adapter folder (or hf://ORG/NAME[@REV]) to write as a GGUF LoRA adapter instead of a model")
	f.StringVar(&out, "out", "", "the GGUF file to write (must not exist)")
	f.StringVar(&typeName, "type", "", "q8_0, q6_k, q5_k_m, q5_k_s, q4_k_m, q4_k_s, q5_1, q5_0, q4_0, f16, bf16 or f32 (Q4_K_M too); by default as --out NAME.TYPE.gguf says, else q8_0 for a model and f32 for --adapter")
	f.StringVar(&name, "name", "", "general.name (default: --out's NAME)")
	completeValues(cmd, "type", gguf.FileTypeNames()...)
	root.AddCommand(cmd)
}

// ggufName is general.name for a file called out: its name less .gguf and
// a .TYPE or -TYPE before it.
func ggufName(out string) string {
	name := filepath.Base(out)
	if strings.EqualFold(filepath.Ext(name), ".gguf") {
		name = strings.TrimSuffix(name, filepath.Ext(name))
	}
	if _, ok, _ := typeOfName(out); ok {
		name = name[:strings.LastIndexAny(name, ".-")]
	}
	return name
}

// convertGGUF converts a checkpoint folder to a GGUF file, showing the
// tensors written.
func convertGGUF(ctx context.Context, modelDir, out string, opts gguf.Options) error {
	return showProgress(filepath.Base(out), "gguf", func(tr *pipeline.Tracker) error {
		opts.Progress = func(done, total int) { tr.Report(int64(done), int64(total), "tensors", "") }
		return gguf.Gemma3(ctx, modelDir, out, opts)
	})
}
