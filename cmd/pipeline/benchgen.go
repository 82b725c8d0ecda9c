package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/spf13/cobra"

	"gemmaft/cuda"
	"gemmaft/trainer"
	"gemmaft/trainer/gpu"
)

// benchGenerateCommand is `pipeline bench generate`.
func benchGenerateCommand() *cobra.Command {
	var o benchGenOptions
	cmd := &cobra.Command{
		Use:   "generate (--preset 1b|4b|12b|27b | --model DIR) [flags]",
		Short: "Time decoding: tokens/s, time to the first token, and the memory-bandwidth bound",
		Long: `bench generate times the decoder the chat command and the generate stage use:
--batch-size prompts of --prompt-len random tokens each, continued by exactly
--new-tokens tokens (stop tokens do not end them), --runs times after
--warmup untimed runs. It reports tokens/s (new tokens of every sequence over the
median run's time, prefill included), the median time to the first token, the
first run's tokens/s (the session's first decoding, which pays its one-time
costs and whatever grows with the longest context yet, as a chat's first answer
does; the warm-up runs keep them out of the median), the peak device memory,
and the bandwidth bound: the steps per second at which reading the weights once
a step (trainer.DecodeStepBytes) takes all of the card's memory bandwidth,
times the batch size. With --quantize nf4 the weights
are NF4 (as the chat command and the generate stage hold a QLoRA base): steps
of at most ` + strconv.Itoa(gpu.NF4StepTokens) + ` sequences read that form directly, larger ones a dequantised copy
stored when the GPU has the room; "weights" says which form the steps read.

Decoding is greedy unless --temperature is given; then tokens are drawn as the
chat command draws them, from the --top-k most likely, then --top-p's share,
with --seed. Both keep every token unless given, the slow path (the host sorts
the whole vocabulary each step); Gemma 3's generation_config.json samples with
--top-k 64 --top-p 0.95. A step
that samples from the top k hands the host each sequence's likeliest tokens,
not its logits (1 MB a sequence at Gemma's vocabulary).

--preset makes a model of a released Gemma 3 size with random weights on the
GPU, with --lora-rank an adapter on all seven projections too (initialised as
PEFT does, B zero: the tokens are the base's, the work an adapter's); --model
reads a checkpoint folder (with --adapter, a PEFT adapter too).

A step of one token runs as one launch, with an adapter too (the JSON's
token_kernel_steps counts them); PIPELINE_TOKEN_KERNEL=off runs it as a launch per
operation instead, for comparison. With an NF4 base, that launch and every other step
of up to 8 sequences (with an adapter too) read a copy of the codes stored per 16-row
tile where the GPU has the room (half a byte a weight more); PIPELINE_NF4_TILES=off
leaves it out.`,
		Example: `  pipeline bench generate --preset 1b
  pipeline bench generate --preset 12b --batch-size 16 --json
  pipeline bench generate --preset 1b --temperature 1 --top-k 64 --top-p 0.95
  pipeline bench generate --preset 12b --quantize nf4 --lora-rank 16`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if o.sample.Temperature == 0 {
				for _, name := range []string{"top-k", "top-p", "seed"} {
					if cmd.Flags().Changed(name) {
						return usageErr(fmt.Errorf("bench generate: --%s applies only when sampling: give --temperature too", name))
					}
				}
			}
			return runBenchGenerate(cmd.Context(), cmd.OutOrStdout(), o)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.preset, "preset", "", "model shape with random weights: 1b, 4b, 12b, 27b (or tiny)")
	f.StringVar(&o.model, "model", "", "Gemma 3 checkpoint folder (or hf://ORG/NAME[@REV]) instead of a preset")
	f.StringVar(&o.adapter, "adapter", "", "PEFT LoRA adapter folder for --model")
	f.IntVar(&o.loraRank, "lora-rank", 0, "with --preset: an adapter of this rank (alpha twice it) on all seven projections")
	f.StringVar(&o.quantize, "quantize", "none", "base weights: none (bfloat16) or nf4")
	f.StringVar(&o.backend, "backend", "cuda", "with --model: cuda, cpu, or auto (the GPU when one is usable)")
	f.IntVar(&o.batch, "batch-size", 1, "prompts decoded together")
	f.IntVar(&o.promptLen, "prompt-len", 128, "tokens in each prompt")
	f.IntVar(&o.newTokens, "new-tokens", 128, "tokens generated after each prompt")
	f.IntVar(&o.runs, "runs", 3, "timed runs")
	f.IntVar(&o.warmup, "warmup", 1, "untimed runs first")
	f.Float64Var(&o.sample.Temperature, "temperature", 0, "sampling temperature; 0 decodes greedily")
	f.IntVar(&o.sample.TopK, "top-k", 0, "with --temperature: sample from the k most likely tokens; 0 keeps all")
	f.Float64Var(&o.sample.TopP, "top-p", 0, "with --temperature: then from the smallest set whose probability reaches p; 0 or 1 keeps all")
	f.Uint64Var(&o.sample.Seed, "seed", 1, "with --temperature: the seed of the draws")
	f.BoolVar(&o.json, "json", false, "print one JSON line")
	f.BoolVar(&o.profile, "profile", false, "time every kernel of the timed runs and print the device time by kernel group and the longest kernels, and a one-launch step by phase (on stderr; the steps run without CUDA graphs, so slower)")
	return cmd
}

type benchGenOptions struct {
	preset, model, adapter, quantize, backend string
	batch, promptLen, newTokens, runs, warmup int
	loraRank                                  int
	sample                                    trainer.GenerateOptions // its sampling fields
	json, profile                             bool
}

// benchGenResult is bench generate's report; its JSON field names are fixed.
type benchGenResult struct {
	Preset    string `json:"preset"`
	BatchSize int    `json:"batch_size"`
	PromptLen int    `json:"prompt_len"`
	NewTokens int    `json:"new_tokens"`
	Quantize  string `json:"quantize"`
	LoRARank  int    `json:"lora_rank,omitempty"`
	// Temperature, TopK and TopP are the sampling's (all zero: greedy).
	Temperature float64 `json:"temperature,omitempty"`
	TopK        int     `json:"top_k,omitempty"`
	TopP        float64 `json:"top_p,omitempty"`
	// Weights is the form decoding steps read them in: on the GPU nf4 or
	// bf16 (also an NF4 base's dequantised copy, at larger batches); on
	// the CPU f32.
	Weights      string  `json:"weights"`
	TokensPerSec float64 `json:"tokens_per_sec"`
	RunSec       float64 `json:"run_sec"`
	FirstSec     float64 `json:"first_token_sec"`
	// DecodeTokensPerSec leaves the prefill out: the steps after the first.
	DecodeTokensPerSec float64 `json:"decode_tokens_per_sec"`
	// FirstRunTokensPerSec is the session's first run's (a warm-up run
	// unless --warmup 0): what `pipeline chat --prompt` pays.
	FirstRunTokensPerSec float64 `json:"first_run_tokens_per_sec"`
	BoundTokensPerSec    float64 `json:"bound_tokens_per_sec"`
	PeakGiB              float64 `json:"peak_gib"`
	GPU                  string  `json:"gpu"`
	// TokenKernelSteps counts the steps that ran as one launch
	// (decode_token; PIPELINE_TOKEN_KERNEL=off turns it off), over every run.
	TokenKernelSteps int `json:"token_kernel_steps,omitempty"`
}

func runBenchGenerate(ctx context.Context, w io.Writer, o benchGenOptions) error {
	if (o.preset == "") == (o.model == "") {
		return usageErr(errors.New("bench generate: give one of --preset and --model"))
	}
	if o.batch < 1 || o.promptLen < 1 || o.newTokens < 1 || o.runs < 1 {
		return usageErr(errors.New("bench generate: --batch-size, --prompt-len, --new-tokens and --runs must be positive"))
	}
	if o.warmup < 0 {
		return usageErr(fmt.Errorf("bench generate: --warmup %d: must not be negative", o.warmup))
	}
	switch o.quantize {
	case "none", "nf4":
	default:
		return usageErr(fmt.Errorf("bench generate: --quantize %q: want none or nf4", o.quantize))
	}
	switch o.backend {
	case "cuda", "cpu", "auto":
	default:
		return usageErr(fmt.Errorf("bench generate: --backend %q: want cuda, cpu or auto", o.backend))
	}
	if o.preset != "" && o.backend == "cpu" {
		return usageErr(errors.New("bench generate: --preset makes its model on the GPU; --backend cpu goes with --model"))
	}
	if o.profile && o.backend == "cpu" {
		return usageErr(errors.New("bench generate: --profile times GPU kernels; it does not go with --backend cpu"))
	}
	if o.adapter != "" && o.model == "" {
		return usageErr(errors.New("bench generate: --adapter goes with --model"))
	}
	if o.loraRank < 0 || o.loraRank > 0 && o.preset == "" {
		return usageErr(errors.New("bench generate: --lora-rank is a positive rank, with --preset"))
	}
	opts := o.sample
	opts.MaxNewTokens = o.newTokens
	if err := opts.Validate(); err != nil {
		return usageErr(fmt.Errorf("bench generate: %w", err))
	}
	var dec trainer.Decoder
	var err error
	if o.preset != "" {
		mc, err := trainer.Preset(o.preset)
		if err != nil {
			return usageErr(err)
		}
		var a *trainer.Adapter
		if o.loraRank > 0 {
			lc := trainer.LoRAConfig{R: o.loraRank, Alpha: 2 * float64(o.loraRank), Targets: trainer.AllModules}
			if a, err = trainer.NewAdapter(mc, lc, 1); err != nil {
				return usageErr(fmt.Errorf("bench generate: %w", err))
			}
		}
		dec, err = gpu.OpenRandomDecoder(ctx, mc, 1, o.quantize, a)
		if err != nil {
			return failErr(fmt.Errorf("bench generate: %w", err))
		}
	} else {
		if o.model, err = localArg(ctx, "model", o.model, argFolder); err != nil {
			return err
		}
		if o.adapter, err = localArg(ctx, "adapter", o.adapter, argFolder); err != nil {
			return err
		}
		dec, err = trainer.OpenDecoder(trainer.DecoderConfig{Model: o.model, Adapter: o.adapter, Quantize: o.quantize, Backend: o.backend})
		if err != nil {
			return failErr(fmt.Errorf("bench generate: %w", err))
		}
	}
	defer dec.Close()
	mc := dec.Info().Config

	// Prompts: <bos> and random ordinary tokens (ids past the special
	// ones, which Gemma 3 numbers first).
	rng := rand.New(rand.NewPCG(1, 2))
	low := min(1000, mc.VocabSize/4)
	prompts := make([][]int32, o.batch)
	for i := range prompts {
		p := []int32{2}
		for len(p) < o.promptLen {
			p = append(p, int32(low+rng.IntN(mc.VocabSize-low)))
		}
		prompts[i] = p
	}
	var runs, firsts []time.Duration
	var firstRun time.Duration
	for r := 0; r < o.warmup+o.runs; r++ {
		if r == o.warmup && o.profile {
			if err := gpu.StartProfile(dec); err != nil {
				return failErr(err)
			}
		}
		start := time.Now()
		var first time.Duration
		out, err := dec.Generate(ctx, prompts, opts, func(seq int, _ int32) {
			if first == 0 {
				first = time.Since(start)
			}
		})
		if err != nil {
			return failErr(fmt.Errorf("bench generate: %w", err))
		}
		took := time.Since(start)
		for i, s := range out {
			if len(s) != o.newTokens {
				return failErr(fmt.Errorf("bench generate: sequence %d got %d tokens, not %d", i, len(s), o.newTokens))
			}
		}
		if r == 0 {
			firstRun = took
		}
		if r >= o.warmup {
			runs, firsts = append(runs, took), append(firsts, first)
		}
	}
	if o.profile {
		p, err := gpu.ReadProfile(dec)
		if err != nil {
			return failErr(err)
		}
		var total time.Duration
		for _, t := range runs {
			total += t
		}
		printProfile(os.Stderr, p, total)
	}
	res := benchGenResult{Preset: o.preset, BatchSize: o.batch, PromptLen: o.promptLen, NewTokens: o.newTokens,
		Quantize: o.quantize, LoRARank: o.loraRank, RunSec: medianSec(runs), FirstSec: medianSec(firsts)}
	if opts.Temperature != 0 {
		res.Temperature, res.TopK, res.TopP = opts.Temperature, opts.TopK, opts.TopP
	}
	if res.Preset == "" {
		res.Preset = filepath.Base(o.model)
	}
	res.TokensPerSec = float64(o.batch*o.newTokens) / res.RunSec
	res.FirstRunTokensPerSec = float64(o.batch*o.newTokens) / firstRun.Seconds()
	if o.newTokens > 1 && res.RunSec > res.FirstSec {
		res.DecodeTokensPerSec = float64(o.batch*(o.newTokens-1)) / (res.RunSec - res.FirstSec)
	}
	if p, ok := dec.(interface{ PeakMemory() int64 }); ok {
		res.PeakGiB = float64(p.PeakMemory()) / (1 << 30)
	}
	if t, ok := dec.(interface{ TokenKernelSteps() int }); ok {
		res.TokenKernelSteps = t.TokenKernelSteps()
	}
	res.Weights = "f32" // the CPU reference's
	if w, ok := dec.(interface{ ReadsNF4(batch int) bool }); ok {
		res.Weights = "bf16"
		if w.ReadsNF4(o.batch) {
			res.Weights = "nf4"
		}
	}
	if rep := cuda.Discover(); len(rep.Devices) > 0 && o.backend != "cpu" {
		res.GPU = rep.Devices[0].Name
		if bw, ok := trainer.PeakBandwidth(res.GPU); ok {
			res.BoundTokensPerSec = float64(o.batch) * bw / trainer.DecodeStepBytes(mc, res.Weights == "nf4")
		}
	}
	out := &checkedWriter{w: w}
	if err := printBenchGen(out, res, o, opts, len(runs)); err != nil || out.err != nil {
		return failErr(fmt.Errorf("bench generate: writing the results: %w", errors.Join(err, out.err)))
	}
	return nil
}

// printBenchGen writes bench generate's report: one JSON line, or lines
// for people.
func printBenchGen(w io.Writer, res benchGenResult, o benchGenOptions, opts trainer.GenerateOptions, runs int) error {
	if o.json {
		b, err := json.Marshal(res)
		if err != nil {
			return err
		}
		fmt.Fprintln(w, string(b))
		return nil
	}
	where := res.GPU
	if where == "" {
		where = "the CPU"
	}
	decoding := "greedy"
	if opts.Temperature != 0 {
		decoding = fmt.Sprintf("sampled (temperature %g, top-k %d, top-p %g)", opts.Temperature, opts.TopK, opts.TopP)
	}
	fmt.Fprintf(w, "%s on %s: batch %d, %d-token prompts, %d new tokens %s, --quantize %s, weights read as %s\n",
		res.Preset, where, o.batch, o.promptLen, o.newTokens, decoding, o.quantize, res.Weights)
	fmt.Fprintf(w, "  %.1f tokens/s (%.3f s a run, median of %d), first token after %.3f s, %.1f tokens/s after it\n",
		res.TokensPerSec, res.RunSec, runs, res.FirstSec, res.DecodeTokensPerSec)
	fmt.Fprintf(w, "  the session's first run: %.1f tokens/s (its one-time costs included)\n", res.FirstRunTokensPerSec)
	if res.BoundTokensPerSec > 0 {
		fmt.Fprintf(w, "  bandwidth bound %.0f tokens/s: %.0f%% of it\n", res.BoundTokensPerSec, 100*res.DecodeTokensPerSec/res.BoundTokensPerSec)
	}
	if res.PeakGiB > 0 {
		fmt.Fprintf(w, "  peak %.2f GiB\n", res.PeakGiB)
	}
	if res.TokenKernelSteps > 0 {
		fmt.Fprintf(w, "  %d steps ran as one launch each (%s=off runs them a launch per operation)\n", res.TokenKernelSteps, gpu.TokenKernelEnv)
	}
	return nil
}
