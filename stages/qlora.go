package stages

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"time"

	"gemmaft/hub"
	"gemmaft/pipeline"
	"gemmaft/trainer"
)

func init() { kinds["qlora"] = qloraKind{} }

// qloraKind trains a LoRA adapter on packed rows over a frozen (NF4
// quantised) Gemma 3 and writes it in PEFT's format with its metrics.
type qloraKind struct{}

// qloraParams are the options people know from PEFT and TRL, with their
// usual QLoRA values as defaults. Fields tagged json:"-" change how the run
// uses the machine, not its result, and so stay out of the cache key.
type qloraParams struct {
	// Model is a checkpoint folder or an hf:// reference; leave it empty
	// when a model stage is among the needs (the adapter then names no
	// base). modelArg.peftBase says how the adapter names it.
	Model string  `json:"model,omitempty"`
	R     int     `json:"r"`
	Alpha float64 `json:"alpha"`
	// RSLoRA scales the update by alpha / √r instead of alpha / r; left
	// out of the key when unset, as before it was a parameter.
	RSLoRA        bool       `json:"rslora,omitempty"`
	Dropout       float64    `json:"dropout"`
	TargetModules moduleList `json:"target_modules"`
	Quantize      string     `json:"quantize"`
	BatchSize     int        `json:"batch_size"`
	GradAccum     int        `json:"grad_accum"`
	LR            float64    `json:"lr"`
	Schedule      string     `json:"schedule"`
	WarmupSteps   int        `json:"warmup_steps"`
	// WarmupRatio is left out of the key when unset, as before it was a
	// parameter.
	WarmupRatio  float64 `json:"warmup_ratio,omitempty"`
	WeightDecay  float64 `json:"weight_decay"`
	MaxGradNorm  float64 `json:"max_grad_norm"`
	Epochs       int     `json:"epochs"`
	MaxSteps     int     `json:"max_steps"`
	Optimizer    string  `json:"optimizer"`
	Seed         uint64  `json:"seed"`
	EvalFraction float64 `json:"eval_fraction"`
	EvalEvery    int     `json:"eval_every"`
	// EarlyStoppingPatience ends training after that many evaluations
	// without a better held-out loss (by more than the threshold), keeping
	// the best evaluation's adapter. Left out of the key when unset.
	EarlyStoppingPatience  int     `yaml:"early_stopping_patience" json:"early_stopping_patience,omitempty"`
	EarlyStoppingThreshold float64 `yaml:"early_stopping_threshold" json:"early_stopping_threshold,omitempty"`
	LogEvery               int     `json:"log_every"`
	// Backend is resolved by Validate ("auto" becomes cpu or cuda), so the
	// key names the backend that computes the adapter.
	Backend string `json:"backend"`

	CheckpointEvery int `yaml:"checkpoint_every" json:"-"`
	// GradientCheckpointing trades recomputation for memory; the numbers
	// are the same either way.
	GradientCheckpointing bool `yaml:"gradient_checkpointing" json:"-"`
	// GPUMemory (GiB; 0: what the GPU has free) caps the device memory the
	// run plans for, as on a card of that size: on a GPU shared with other
	// work it offloads what does not fit under the cap, or refuses.
	GPUMemory float64 `yaml:"gpu_memory" json:"-"`
	// HubBaseNaming marks, in the key only, an adapter of an hf:// base:
	// its adapter_config.json names the base by repository id and commit,
	// where earlier versions wrote the reference as given, which PEFT's
	// AutoPeftModelForCausalLM cannot load. Those adapters are trained
	// again; the keys of the others stay as they were. No spec sets it.
	HubBaseNaming string `yaml:"-" json:"hub_base_naming,omitempty"`
	// backendNote is what backend: auto chose and why, said when the stage
	// runs (the key holds the chosen backend).
	backendNote string
}

// Version 2: dropout masks come from Philox (shared by the CPU and GPU
// backends), 8-bit AdamW runs as 8-bit AdamW, and the key holds the
// resolved backend. Version 3: dropout draws 16 bits an element
// (trainer.Dropout), so the same run drops other elements.
// Synonyms are the names transformers' TrainingArguments, TRL, PEFT and
// Axolotl give the parameters, for the spec error of a spec written with
// them.
func (qloraKind) Synonyms() map[string]string {
	return map[string]string{
		"learning_rate":               "lr",
		"gradient_accumulation_steps": "grad_accum",
		"per_device_train_batch_size": "batch_size",
		"micro_batch_size":            "batch_size",
		"num_train_epochs":            "epochs",
		"num_epochs":                  "epochs",
		"lr_scheduler_type":           "schedule",
		"lr_scheduler":                "schedule",
		"lora_r":                      "r",
		"lora_alpha":                  "alpha",
		"lora_dropout":                "dropout",
		"use_rslora":                  "rslora",
		"peft_use_rslora":             "rslora",
		"lora_target_modules":         "target_modules",
		"logging_steps":               "log_every",
		"eval_steps":                  "eval_every",
		"save_steps":                  "checkpoint_every",
		"val_set_size":                "eval_fraction",
		"optim":                       "optimizer",
		"load_in_4bit":                "quantize (nf4)",
		"base_model":                  "model",
		"random_state":                "seed",
		"use_gradient_checkpointing":  "gradient_checkpointing",
	}
}

// ParamNotes say where the settings of TRL, transformers and Unsloth that
// have no one name here went.
func (qloraKind) ParamNotes() map[string]string {
	length := "the pack stage's seq_len is the length of the packed rows"
	precision := "precision is the backend's: bfloat16 on the GPU, float32 on the CPU"
	return map[string]string{
		"max_seq_length":      length,
		"max_length":          length,
		"sequence_len":        length,
		"packing":             "rows are always packed, by the pack stage",
		"sample_packing":      "rows are always packed, by the pack stage",
		"bf16":                precision,
		"fp16":                precision,
		"tf32":                precision,
		"eval_strategy":       "eval_every: N scores the eval_fraction held out every N steps",
		"evaluation_strategy": "eval_every: N scores the eval_fraction held out every N steps",
		"save_total_limit":    "checkpoints (checkpoint_every) serve to resume and are removed once the stage completes; the entry keeps the final adapter (with early stopping, the best)",
	}
}

func (qloraKind) Version() int       { return 3 }
func (qloraKind) Inputs() (int, int) { return 1, 2 }

// moduleList is target_modules: a list, or one name as PEFT also takes
// it (target_modules="all-linear"); a list either way in the key.
type moduleList []string

func (l *moduleList) UnmarshalYAML(unmarshal func(any) error) error {
	var one string
	if err := unmarshal(&one); err == nil {
		*l = moduleList{one}
		return nil
	}
	var many []string
	if err := unmarshal(&many); err != nil {
		return err
	}
	*l = many
	return nil
}

// allTargets names the seven projections, the default target_modules.
func allTargets() []string {
	var targets []string
	for _, m := range trainer.AllModules {
		targets = append(targets, string(m))
	}
	return targets
}

func (qloraKind) Params() any {
	return &qloraParams{
		R: 32, Alpha: 64, Dropout: 0.05, TargetModules: allTargets(), Quantize: "nf4",
		BatchSize: 2, GradAccum: 4, LR: 2e-4, Schedule: string(trainer.ScheduleLinear), MaxGradNorm: 1.0,
		Epochs: 1, Optimizer: "adamw", Seed: 42, LogEvery: 5, Backend: "auto",
		CheckpointEvery: 50, GradientCheckpointing: true,
	}
}

// Revision 1: early stopping takes any lower held-out loss as the best and
// counts an evaluation as no better only below the threshold, as
// transformers' EarlyStoppingCallback does, and a count run out at the
// last step is no early stop.
func (p *qloraParams) Revision() int {
	if p.EarlyStoppingPatience > 0 {
		return 1
	}
	return 0
}

// Validate reports every bad setting at once (a spec carried over from
// another tool has several), each as a ParamError.
func (p *qloraParams) Validate() error {
	var errs []error
	bad := func(param, msg, fix string) {
		errs = append(errs, &pipeline.ParamError{Param: param, Msg: msg, Fix: fix})
	}
	p.HubBaseNaming = ""
	if hub.IsRef(p.Model) {
		p.HubBaseNaming = "repository id and commit"
	}
	if len(p.TargetModules) == 1 && p.TargetModules[0] == "all-linear" {
		// PEFT's name for every linear layer of the decoder: the seven
		// projections, written out so that the key is the default's.
		p.TargetModules = allTargets()
	}
	var targets []trainer.Module
	seen := map[trainer.Module]bool{}
	for _, t := range p.TargetModules {
		m, err := trainer.ParseModule(t)
		if err != nil {
			bad("target_modules", err.Error(), "choose among q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, or [all-linear] for all seven")
			continue
		}
		if seen[m] {
			bad("target_modules", fmt.Sprintf("%s is listed twice", m), "list each projection once")
			continue
		}
		seen[m] = true
		targets = append(targets, m)
	}
	// Each LoRA setting is checked here so that the message names it.
	if p.R < 1 || p.R > 1<<16 {
		bad("r", fmt.Sprintf("%d must be in [1, 65536]", p.R), "QLoRA usually takes r between 8 and 64, e.g. r: 32")
	}
	if !(p.Alpha > 0) {
		bad("alpha", fmt.Sprintf("%v must be positive", p.Alpha), "alpha is usually r or twice r, e.g. alpha: 64 for r: 32")
	}
	if !(p.Dropout >= 0 && p.Dropout < 1) {
		bad("dropout", fmt.Sprintf("%v must be in [0, 1)", p.Dropout), "QLoRA usually takes 0.05; 0 turns dropout off")
	}
	if len(p.TargetModules) == 0 {
		bad("target_modules", "is empty: nothing would be trained", "list projections, e.g. [q_proj, v_proj], or leave target_modules out for all seven")
	}
	if len(errs) == 0 {
		if err := p.lora(targets).Validate(); err != nil {
			bad("target_modules", err.Error(), "")
		}
	}
	if p.Quantize != "nf4" && p.Quantize != "none" {
		bad("quantize", fmt.Sprintf("unknown %q", p.Quantize), "use nf4 (QLoRA) or none (LoRA on the checkpoint's weights)")
	}
	if p.BatchSize < 1 {
		bad("batch_size", fmt.Sprintf("%d must be at least 1", p.BatchSize), "rows per micro-batch, e.g. batch_size: 2")
	}
	if p.GradAccum < 1 {
		bad("grad_accum", fmt.Sprintf("%d must be at least 1", p.GradAccum), "micro-batches per optimizer step, e.g. grad_accum: 4 (1 accumulates nothing)")
	}
	if !(p.LR > 0) {
		bad("lr", fmt.Sprintf("%v must be positive", p.LR), "QLoRA usually takes 1e-4 to 2e-4")
	}
	if p.Epochs < 1 {
		// transformers lets max_steps override the epochs; here they bound
		// it, so 0 cannot stand for "as many as max_steps needs".
		bad("epochs", fmt.Sprintf("%d must be at least 1", p.Epochs),
			"passes over the data, e.g. epochs: 1; max_steps ends training early but not past the epochs (the run says which epochs reach it)")
	}
	if p.MaxSteps < 0 {
		bad("max_steps", fmt.Sprintf("%d must not be negative", p.MaxSteps), "0 (the default) trains for the given epochs")
	}
	if p.WarmupSteps < 0 {
		bad("warmup_steps", fmt.Sprintf("%d must not be negative", p.WarmupSteps), "0 starts at the full learning rate")
	}
	if !(p.WarmupRatio >= 0 && p.WarmupRatio <= 1) {
		bad("warmup_ratio", fmt.Sprintf("%v must be in [0, 1]", p.WarmupRatio), "a share of the run's steps, e.g. warmup_ratio: 0.03")
	}
	if p.WarmupRatio > 0 && p.WarmupSteps > 0 {
		bad("warmup_ratio", "is given with warmup_steps", "give one: warmup_steps counts steps, warmup_ratio a share of the run's")
	}
	if p.WeightDecay < 0 {
		bad("weight_decay", fmt.Sprintf("%v must not be negative", p.WeightDecay), "AdamW usually takes 0 to 0.1")
	}
	if p.MaxGradNorm < 0 {
		bad("max_grad_norm", fmt.Sprintf("%v must not be negative", p.MaxGradNorm), "1 is usual; 0 turns clipping off")
	}
	if p.EarlyStoppingPatience < 0 {
		bad("early_stopping_patience", fmt.Sprintf("%d must not be negative", p.EarlyStoppingPatience), "evaluations without improvement before training stops, e.g. 3; 0 never stops early")
	}
	if p.EarlyStoppingThreshold < 0 {
		bad("early_stopping_threshold", fmt.Sprintf("%v must not be negative", p.EarlyStoppingThreshold), "the least drop of the held-out loss that counts as better, e.g. 0.001; 0 counts any")
	}
	if p.EarlyStoppingThreshold > 0 && p.EarlyStoppingPatience == 0 {
		bad("early_stopping_threshold", "is given without early_stopping_patience", "set early_stopping_patience, e.g. 3")
	}
	if p.EarlyStoppingPatience > 0 && p.EvalEvery == 0 {
		bad("early_stopping_patience", "needs evaluations during training", "set eval_every, e.g. eval_every: 50, and hold rows out (eval_fraction, or a mix stage's heldout)")
	}
	if p.EvalEvery < 0 {
		bad("eval_every", fmt.Sprintf("%d must not be negative", p.EvalEvery), "0 evaluates only at the end (with eval_fraction set)")
	}
	if p.EvalFraction < 0 || p.EvalFraction >= 1 {
		bad("eval_fraction", fmt.Sprintf("%v must be in [0, 1)", p.EvalFraction), "hold out a small share, e.g. 0.05; 0 holds out nothing")
	}
	if p.LogEvery < 1 {
		bad("log_every", fmt.Sprintf("%d must be at least 1", p.LogEvery), "e.g. log_every: 5")
	}
	if p.CheckpointEvery < 0 {
		bad("checkpoint_every", fmt.Sprintf("%d must not be negative", p.CheckpointEvery), "0 writes no checkpoints")
	}
	if !(p.GPUMemory >= 0) {
		bad("gpu_memory", fmt.Sprintf("%v must not be negative", p.GPUMemory), "GiB of GPU memory the run may use, e.g. gpu_memory: 20; 0 (the default) uses what is free")
	}
	if _, _, err := trainer.ResolveOptimizer(p.Optimizer); err != nil {
		bad("optimizer", err.Error(), "use adamw, or paged_adamw_8bit / adamw_8bit for 8-bit state")
	}
	b, note, err := trainer.ResolveBackend(p.Backend)
	if err != nil {
		bad("backend", err.Error(), "use backend: auto (the GPU when one is usable, else the CPU) or cpu")
	} else {
		p.Backend, p.backendNote = b.Name(), note
	}
	if p.Schedule == "constant_with_warmup" {
		// transformers' name for what constant is here: a warmup, then
		// the full rate.
		p.Schedule = string(trainer.ScheduleConstant)
	}
	if _, err := trainer.LRFactor(trainer.Schedule(p.Schedule), 0, 0, 1); err != nil || p.Schedule == "" {
		if p.Schedule == "" {
			err = errors.New("is empty")
		}
		bad("schedule", err.Error(), "use linear (the default: leave schedule out), cosine, or constant (after warmup_steps, transformers' constant_with_warmup)")
	}
	return errors.Join(errs...)
}

// lora is the adapter's shape the parameters give, over targets.
func (p *qloraParams) lora(targets []trainer.Module) trainer.LoRAConfig {
	return trainer.LoRAConfig{R: p.R, Alpha: p.Alpha, Dropout: p.Dropout, Targets: targets, RSLoRA: p.RSLoRA}
}

func (qloraKind) Prepare(params any, dir string) (pipeline.Runner, error) {
	p := params.(*qloraParams)
	m, err := modelParam(p.Model, dir, "point model at a Hugging Face checkpoint folder (config.json and safetensors)")
	if err != nil {
		return nil, err
	}
	return &qloraStage{p: p, model: m}, nil
}

type qloraStage struct {
	p     *qloraParams
	model modelArg
}

func (s *qloraStage) Files() []string { return s.model.files }

func (s *qloraStage) Resolve(ctx context.Context) ([]pipeline.Ref, error) {
	return resolveAll(ctx, s.model.hub)
}

// ResumePoint names the newest checkpoint an interrupted attempt left.
func (s *qloraStage) ResumePoint(scratch string) string {
	if step := trainer.NewestCheckpointStep(filepath.Join(scratch, trainer.CheckpointsDirName)); step > 0 {
		return fmt.Sprintf("checkpoint of step %d", step)
	}
	return ""
}

func (s *qloraStage) Run(ctx context.Context, t *pipeline.Task) error {
	model, rowsPath, modelFrom, err := s.inputs(ctx, t)
	if err != nil {
		return err
	}
	optimizer, note, _ := trainer.ResolveOptimizer(s.p.Optimizer)
	if note != "" {
		t.Log.Info(note)
	}
	if s.p.backendNote != "" {
		t.Log.Info(s.p.backendNote)
	}
	cfg, cfgErr := trainer.LoadConfig(model) // for the warnings below; training reads it itself
	if cfgErr == nil && s.p.Backend == "cpu" && cfg.Hidden >= 1024 {
		// The CPU backend is the reference: fine for the tiny demo model,
		// days for a real Gemma 3.
		t.Log.Warn(fmt.Sprintf("training a model of hidden size %d on the CPU, minutes or more a step at Gemma 3 sizes; "+
			"on a machine with a GPU set backend: cuda, which fails at once where the GPU is not usable", cfg.Hidden))
	}
	// Rows are read from the pack stage's file as training reaches them.
	rows, err := trainer.OpenPackedArrow(rowsPath)
	if err != nil {
		return err
	}
	defer rows.Close()
	first, err := rows.Row(0)
	if err != nil {
		return err
	}
	if cfgErr == nil && cfg.MaxPositions > 0 && len(first.InputIDs) > cfg.MaxPositions {
		// transformers trains such rows too, at positions the model was
		// never trained for; the eval and generate stages refuse them.
		t.Log.Warn(fmt.Sprintf("the packed rows are %d tokens long, more than the model's context of %d positions (max_position_embeddings)", len(first.InputIDs), cfg.MaxPositions),
			"fix", fmt.Sprintf("set the pack stage's seq_len to %d or less", cfg.MaxPositions))
	}
	vocab := 0
	if cfgErr == nil {
		vocab = cfg.VocabSize
	}
	if err := s.checkPacked(ctx, t, vocab); err != nil {
		return err
	}
	// A mix stage's held-out examples, packed apart by the pack stage, are
	// what the eval loss is computed on.
	var heldOut trainer.Dataset
	heldPath := filepath.Join(filepath.Dir(rowsPath), PackedHeldOutFile)
	if _, err := os.Stat(heldPath); err == nil {
		if s.p.EvalFraction > 0 {
			return fmt.Errorf("the packed rows come with held-out examples (a mix stage's heldout), and eval_fraction %v would hold out training rows too; remove eval_fraction (the eval loss is computed on the held-out examples)", s.p.EvalFraction)
		}
		held, err := trainer.OpenPackedArrow(heldPath)
		if err != nil {
			return err
		}
		defer held.Close()
		heldOut = held
		t.SetStat("eval_rows", held.Len())
		t.Log.Info("eval loss on the held-out examples", "rows", held.Len())
	}
	if s.p.EarlyStoppingPatience > 0 && heldOut == nil && s.p.EvalFraction == 0 { // said before the model loads
		return fmt.Errorf("early_stopping_patience: nothing is held out to evaluate; set eval_fraction (e.g. 0.05), or hold examples out with a mix stage's heldout")
	}
	var targets []trainer.Module
	for _, tm := range s.p.TargetModules {
		mod, _ := trainer.ParseModule(tm)
		targets = append(targets, mod)
	}
	// Started as one rank of several (torchrun, Slurm, pipeline run
	// --gpus), the stage trains together with the other ranks.
	group, err := joinRanks(ctx, t)
	if err != nil {
		return err
	}
	defer group.Close()
	// Loading a 12B checkpoint takes minutes; the progress says so rather
	// than counting rows nobody reads yet.
	// (A unit of its own: the steps' clock starts with the first step.)
	t.Report(0, 1, "models", "loading "+modelFrom+" on "+s.p.Backend) // as the spec names it, not by a cache key
	sess, err := trainer.OpenSession(ctx, s.p.Backend, trainer.SessionConfig{
		Group: group.trainer(),
		Model: model, Quantize: s.p.Quantize,
		LoRA:                  s.p.lora(targets),
		Optimizer:             trainer.OptimizerConfig{Name: optimizer, WeightDecay: s.p.WeightDecay},
		GradientCheckpointing: s.p.GradientCheckpointing,
		MaxTokens:             s.p.BatchSize * len(first.InputIDs),
		MemoryLimit:           int64(s.p.GPUMemory * (1 << 30)),
	})
	if err != nil {
		return fmt.Errorf("loading %s on backend %s: %w", model, s.p.Backend, err)
	}
	defer sess.Close()
	if mp, ok := sess.(trainer.MemoryPlanner); ok {
		bytes, detail := mp.PlannedMemory()
		t.Log.Info("GPU memory planned", "gib", fmt.Sprintf("%.2f", float64(bytes)/(1<<30)), "plan", detail)
		t.SetStat("planned_gpu_gib", float64(bytes)/(1<<30))
	}
	// The session has read the checkpoint's files by their paths: check
	// that they were the ones the key holds before training on them.
	if err := t.CheckFiles(s.model.files...); err != nil {
		return err
	}
	scratch, err := t.Scratch()
	if err != nil {
		return err
	}
	// Every rank reads rank 0's checkpoints.
	checkpoints, err := group.rank0Path(filepath.Join(scratch, trainer.CheckpointsDirName))
	if err != nil {
		return err
	}
	started := time.Now()
	live := startLiveEvents(t, scratch, s.p, started)
	defer live.close()
	res, err := trainer.Train(ctx, sess, rows, trainer.TrainOptions{
		LR: s.p.LR, Schedule: trainer.Schedule(s.p.Schedule), WarmupSteps: s.p.WarmupSteps, WarmupRatio: s.p.WarmupRatio,
		MaxGradNorm: s.p.MaxGradNorm,
		BatchSize:   s.p.BatchSize, GradAccum: s.p.GradAccum, Epochs: s.p.Epochs, MaxSteps: s.p.MaxSteps,
		Seed: s.p.Seed, EvalFraction: s.p.EvalFraction, EvalEvery: s.p.EvalEvery, EvalData: heldOut, LogEvery: s.p.LogEvery,
		EarlyStoppingPatience: s.p.EarlyStoppingPatience, EarlyStoppingThreshold: s.p.EarlyStoppingThreshold,
		CheckpointEvery: s.p.CheckpointEvery, OutDir: scratch, CheckpointDir: checkpoints, BaseModel: s.model.peftBase(), Log: t.Log,
		Progress: func(p trainer.Progress) {
			note := fmt.Sprintf("loss %.4f  lr %.2e  %.0f tok/s", p.Loss, p.LR, p.TokensPerSec)
			if !math.IsNaN(p.EvalLoss) {
				note += fmt.Sprintf("  eval %.4f", p.EvalLoss)
			}
			if p.PeakMemory > 0 {
				note += fmt.Sprintf("  %.1f GiB", float64(p.PeakMemory)/(1<<30))
			}
			t.Report(int64(p.Step), int64(p.TotalSteps), "steps", note)
			live.step(p)
		},
	})
	if err != nil {
		return err
	}
	if group.rank() != 0 {
		return pipeline.ErrWrittenElsewhere
	}
	// The results move into the entry; checkpoints stay in the scratch
	// folder, which the engine removes once the entry is committed.
	for _, name := range []string{trainer.AdapterDirName, trainer.MetricsFile, trainer.LossCurveFile} {
		if err := os.Rename(filepath.Join(scratch, name), filepath.Join(t.Dir, name)); err != nil {
			return err
		}
	}
	if err := writeTrainEvents(t, s.p, model, rows.Len(), started); err != nil {
		return err
	}
	t.SetStat("steps", res.Steps)
	if heldOut == nil && res.EvalRows > 0 { // eval_fraction's share of the rows
		t.SetStat("eval_rows", res.EvalRows)
	}
	t.SetStat("final_loss", res.FinalLoss)
	if !math.IsNaN(res.EvalLoss) {
		t.SetStat("eval_loss", res.EvalLoss)
	}
	if res.BestStep > 0 {
		t.SetStat("best_step", res.BestStep)
		t.SetStat("stopped_early", res.StoppedEarly)
	}
	t.SetStat("rows", rows.Len())
	t.SetStat("backend", s.p.Backend)
	if res.PeakMemory > 0 {
		t.SetStat("peak_gpu_gib", float64(res.PeakMemory)/(1<<30))
	}
	t.SetStat("cores", runtime.GOMAXPROCS(0))
	t.SetStat("train_seconds", time.Since(started).Seconds())
	return nil
}

// checkPacked checks the pack stage's rows against the model and the
// stage's settings before the first step: its pad_id must lie in the
// model's vocabulary (vocab; 0 when unknown), and eval_fraction must not
// hold out rows whose examples training repeats elsewhere (a mix's total
// repeats a source), which would score the adapter on what it trained on.
func (s *qloraStage) checkPacked(ctx context.Context, t *pipeline.Task, vocab int) error {
	for _, in := range t.Inputs {
		if in.Kind != packKindName {
			continue
		}
		m, err := in.Manifest(ctx)
		if err != nil {
			return err
		}
		var p packParams
		if json.Unmarshal(m.Params, &p) == nil && vocab > 0 && int(p.PadID) >= vocab {
			return fmt.Errorf("stage %s pads its rows with id %d, outside the model's vocabulary [0, %d); set its pad_id to the tokenizer's <pad> (0 for Gemma 3)", in.Name, p.PadID, vocab)
		}
		repeatedStat, _ := m.Stats["repeated"].(json.Number)
		examplesStat, _ := m.Stats["examples_in"].(json.Number)
		repeated, _ := repeatedStat.Int64()
		examples, _ := examplesStat.Int64()
		if s.p.EvalFraction == 0 || repeated == 0 {
			continue
		}
		msg := fmt.Sprintf("%d of the %d examples stage %s packed repeat an earlier one, so the rows eval_fraction holds out share examples with the rows trained on, and the eval loss flatters the adapter", repeated, examples, in.Name)
		fix := "hold examples out before packing: a mix stage's heldout (and no eval_fraction)"
		if repeated*100 >= examples { // a mix repeating a source, not a few duplicates in the data
			return fmt.Errorf("%s; %s", msg, fix)
		}
		t.Log.Warn(msg, "fix", fix+", or remove the duplicates from the data")
	}
	return nil
}

// inputs tells the stage's needs apart by their kind: the packed rows of a
// pack stage, and the checkpoint of a model stage unless `model:` names
// one; from names the checkpoint as the spec does.
func (s *qloraStage) inputs(ctx context.Context, t *pipeline.Task) (model, rows, from string, err error) {
	from = "model: " + s.model.param
	if model, err = s.model.path(ctx, t); err != nil {
		return "", "", "", err
	}
	for _, in := range t.Inputs {
		switch in.Kind {
		case modelKindName:
			if model != "" {
				return "", "", "", fmt.Errorf("two models (%s, and stage %s of kind %s); give either `model:` or one model stage", from, in.Name, in.Kind)
			}
			if model, err = in.Dir(ctx); err != nil {
				return "", "", "", err
			}
			from = "stage " + in.Name
		case packKindName:
			if rows != "" {
				return "", "", "", fmt.Errorf("two pack stages in needs (%s is the second); a qlora stage trains on one", in.Name)
			}
			if rows, err = in.TablePath(ctx); err != nil {
				return "", "", "", err
			}
		default:
			return "", "", "", fmt.Errorf("needs stage %s of kind %s; a qlora stage takes a %s stage (packed rows) and a %s stage (the base checkpoint, unless `model:` names one)",
				in.Name, in.Kind, packKindName, modelKindName)
		}
	}
	if model == "" {
		return "", "", "", fmt.Errorf("no model: set `model:` to a checkpoint folder or add a %s stage to needs", modelKindName)
	}
	if rows == "" {
		return "", "", "", fmt.Errorf("no packed rows: add a %s stage to needs", packKindName)
	}
	return model, rows, from, nil
}
