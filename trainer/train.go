package trainer

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"time"

	"gemmaft/internal/atomicfile"
)

// Train fine-tunes the session's adapter on rows from data and writes the
// adapter (PEFT format), metrics.jsonl and loss.svg into opts.OutDir. It
// sets the session's starting state itself: PEFT's initialisation drawn
// from opts.Seed and a fresh optimizer, or, with CheckpointEvery set and a
// checkpoint of the same run in the checkpoint directory, that
// checkpoint's state. A resumed run continues the same run: the losses,
// metrics (timings aside) and adapter are bit for bit those of an
// uninterrupted run on the same backend and machine.
//
// With a Group in the session's config, each rank computes its share of
// every step's micro-batches (and of the held-out batches), the session
// sums the gradients over the ranks, and rank 0 alone writes the outputs
// and checkpoints; every rank must see the checkpoint folder.
//
// This loop is the same for every backend: data order, gradient
// accumulation, the learning-rate schedule, clipping, evaluation, logging,
// checkpoints and the adapter export live here; the session computes.
func Train(ctx context.Context, s Session, data Dataset, opts TrainOptions) (*Result, error) {
	if err := opts.defaults(); err != nil {
		return nil, err
	}
	p, err := makeRowPlan(data.Len(), &opts)
	if err != nil {
		return nil, err
	}
	if opts.WarmupRatio > 0 {
		opts.WarmupSteps = int(math.Ceil(opts.WarmupRatio * float64(p.total)))
	}
	g := s.Config().Group
	rank, size := rankOf(g)
	if size > 1 {
		if _, ok := s.(GradientReducer); !ok {
			return nil, fmt.Errorf("train: %d ranks on backend %s: %w", size, s.Backend(), errNoReducer)
		}
	}
	// Rank 0 writes the outputs and checkpoints; the others write nothing.
	if rank == 0 {
		if err := os.MkdirAll(opts.OutDir, 0o755); err != nil {
			return nil, err
		}
	}
	info := s.Model()
	fingerprint := opts.fingerprint(s, data.Len())
	ckDir := opts.CheckpointDir
	if ckDir == "" {
		ckDir = filepath.Join(opts.OutDir, CheckpointsDirName)
	}
	log := opts.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if rank == 0 {
		warnUnused(log, p, opts, size)
	}
	for {
		ck, err := loadCheckpointOnRanks(g, ckDir, info, fingerprint, log)
		if err != nil {
			return nil, err
		}
		res, err := train(ctx, s, data, opts, p, info, fingerprint, ckDir, ck, log)
		var div *resumeDiverged
		if ck != nil && errors.As(err, &div) && size > 1 {
			// Setting it aside on one rank while the others read it races;
			// a person decides.
			return nil, fmt.Errorf("checkpoint %s: %w; remove it to start from the one before", ck.dir, div)
		}
		if ck != nil && errors.As(err, &div) {
			// Resuming from it broke the run: set it aside and try the one
			// before it, or start over. A run that diverges by itself does
			// so again from there, past the next checkpoint, and fails.
			next := "trying the checkpoint before it, or starting from scratch"
			if err := setAside(ck.dir, div.Error(), next, log); err != nil {
				return nil, err
			}
			continue
		}
		return res, err
	}
}

// loadCheckpointOnRanks is loadCheckpoint in a group: rank 0 looks first
// (setting damaged checkpoints aside), then the others, and all must have
// found the same step, which they cannot when the checkpoint folder is not
// one they share.
func loadCheckpointOnRanks(g Group, dir string, info *ModelInfo, fingerprint string, log *slog.Logger) (*savedRun, error) {
	rank, size := rankOf(g)
	if size == 1 {
		return loadCheckpoint(dir, info, fingerprint, log)
	}
	var ck *savedRun
	var err error
	if rank == 0 {
		ck, err = loadCheckpoint(dir, info, fingerprint, log)
	}
	failed := 0.0
	if err != nil {
		failed = 1
	}
	if serr := sumOver(g, &failed); serr != nil {
		return nil, serr
	}
	if err != nil {
		return nil, err
	}
	if failed > 0 {
		return nil, errors.New("rank 0 could not read the checkpoints")
	}
	if rank != 0 {
		if ck, err = loadCheckpoint(dir, info, fingerprint, log); err != nil {
			return nil, err
		}
	}
	step := 0.0
	if ck != nil {
		step = float64(ck.state.Step)
	}
	sum, squares := step, step*step
	if err := sumOver(g, &sum, &squares); err != nil {
		return nil, err
	}
	if float64(size)*squares != sum*sum {
		return nil, fmt.Errorf("the ranks found different checkpoints in %s (this rank: step %d): every rank must see the same checkpoint folder", dir, int(step))
	}
	return ck, nil
}

// resumeDiverged: the loss became non-finite after a resume, before the
// next checkpoint, which blames the checkpoint resumed from.
type resumeDiverged struct {
	step int
	loss float64
}

func (e *resumeDiverged) Error() string {
	return fmt.Sprintf("resuming from it gave a loss of %v at step %d", e.loss, e.step)
}

// train is one attempt of Train: from checkpoint ck, or from the start when
// ck is nil.
func train(ctx context.Context, s Session, data Dataset, opts TrainOptions, p *rowPlan, info *ModelInfo, fingerprint, ckDir string, ck *savedRun, log *slog.Logger) (*Result, error) {
	st := trainState{Fingerprint: fingerprint}
	var logged []byte
	var best *Adapter // the best evaluation's adapter, with early stopping
	if ck != nil {
		if err := s.SetState(ck.adapter, ck.optimizer); err != nil {
			return nil, fmt.Errorf("resuming from %s: %w", ck.dir, err)
		}
		st, logged, best = ck.state, ck.metrics, ck.best
		log.Info("resuming from a checkpoint", "checkpoint", ck.dir, "step", st.Step)
	} else {
		a, err := NewAdapter(info.Config, s.Config().LoRA, opts.Seed)
		if err != nil {
			return nil, err
		}
		if err := s.SetState(a, nil); err != nil {
			return nil, err
		}
	}
	g := s.Config().Group
	rank, size := rankOf(g)
	writer := rank == 0
	metricsPath := filepath.Join(opts.OutDir, MetricsFile)
	var metrics *os.File
	var history []Metric
	if writer {
		var err error
		if metrics, history, err = openMetrics(metricsPath, logged); err != nil {
			return nil, err
		}
		defer metrics.Close()
	}

	batchOf := func(idx []int) (*Batch, int64, error) { return batchFrom(data, idx, "") }
	// The held-out rows: some of data's, or EvalData's own.
	evalRows, evalBatchOf := p.eval, batchOf
	if opts.EvalData != nil {
		evalRows = make([]int, opts.EvalData.Len())
		for i := range evalRows {
			evalRows[i] = i
		}
		evalBatchOf = func(idx []int) (*Batch, int64, error) { return batchFrom(opts.EvalData, idx, "held-out rows") }
	}
	evalLoss := func() (float64, error) {
		var sum, n float64
		for i, j := 0, 0; i < len(evalRows); i, j = i+opts.BatchSize, j+1 {
			if j%size != rank {
				continue // another rank's batch
			}
			b, _, err := evalBatchOf(evalRows[i:min(i+opts.BatchSize, len(evalRows))])
			if err != nil {
				return 0, err
			}
			l, c, err := s.Loss(b)
			if err != nil {
				return 0, err
			}
			sum, n = sum+l, n+float64(c)
		}
		if err := sumOver(g, &sum, &n); err != nil {
			return 0, err
		}
		if n == 0 {
			return math.NaN(), nil
		}
		return sum / float64(n), nil
	}

	start := time.Now()
	startStep, startTokens := st.Step, st.Tokens // a resumed run's rate counts from here
	// The metrics' elapsed time goes on from the checkpoint's: a resumed
	// run's curve against time is the training's, not this attempt's.
	elapsedBefore := time.Duration(st.ElapsedSec * float64(time.Second))
	savedSinceResume := false
	savedStep := st.Step // the step the newest checkpoint holds (none at 0: nothing to lose)
	checkpoint := func() error {
		logged, err := readPrefix(metrics, st.MetricsBytes)
		if err != nil {
			return err
		}
		a, opt, err := s.State()
		if err != nil {
			return err
		}
		st.ElapsedSec = (elapsedBefore + time.Since(start)).Seconds()
		if err := saveCheckpoint(ckDir, info, st, a, best, opt, logged); err != nil {
			return err
		}
		savedSinceResume, savedStep = true, st.Step
		return nil
	}
	// stop ends a run whose context is done (Ctrl-C, SIGTERM) with a
	// checkpoint of the steps done since the last one, so that the next
	// run resumes from them, as plan and status say it will: at 50 steps a
	// checkpoint, an interrupt lost up to 49 steps. The state is that of
	// the last whole step; a step's partial gradients are not kept. One
	// process only: ranks would have to agree on the step.
	stop := func(err error) error {
		if writer && size == 1 && opts.CheckpointEvery > 0 && st.Step > savedStep {
			if cerr := checkpoint(); cerr != nil {
				log.Warn("stopped without a checkpoint of the last steps", "step", st.Step, "err", cerr)
			} else {
				log.Info("stopped; the next run resumes from here", "step", st.Step)
			}
		}
		if writer && opts.CheckpointEvery <= 0 && st.Step > 0 {
			log.Warn(fmt.Sprintf("stopped after %d steps, which the next run computes again: checkpoint_every is 0, so no checkpoint is kept", st.Step))
		}
		return err
	}
	var sinceLogTokens int64
	sinceLog := time.Now()
	patience := opts.EarlyStoppingPatience
	stopped := func() bool { return patience > 0 && st.BadEvals >= patience }
	for st.Step < p.total && !stopped() {
		if err := ctx.Err(); err != nil {
			return nil, stop(err)
		}
		step := st.Step
		micro := p.stepRows(opts.Seed, step, &opts)
		batches := make([]*Batch, len(micro))
		normalizer := 0
		var stepTokens int64
		for i, idx := range micro {
			b, tokens, err := batchOf(idx)
			if err != nil {
				return nil, fmt.Errorf("step %d: %w", step+1, err)
			}
			batches[i] = b
			normalizer += b.Trained()
			stepTokens += tokens
		}
		var lossSum float64
		overlap, _ := s.(OverlappingReducer)
		last := LastOwnMicroBatch(len(batches), rank, size)
		for i, b := range batches {
			if normalizer == 0 {
				break // nothing to train in this step: a zero update
			}
			if i%size != rank {
				continue // another rank's micro-batch
			}
			if err := ctx.Err(); err != nil {
				return nil, stop(err)
			}
			if i == last && overlap != nil {
				overlap.ReduceInNextBackward()
			}
			l, _, err := s.LossAndGrad(b, float64(normalizer), opts.Seed^uint64(step)<<20^uint64(i))
			if err != nil {
				return nil, fmt.Errorf("step %d: %w", step+1, err)
			}
			lossSum += l
		}
		if size > 1 {
			if err := sumOver(g, &lossSum); err != nil {
				return nil, fmt.Errorf("step %d: %w", step+1, err)
			}
			if err := s.(GradientReducer).AllReduceGrads(); err != nil {
				return nil, fmt.Errorf("step %d: %w", step+1, err)
			}
		}
		loss := 0.0
		if normalizer > 0 {
			loss = lossSum / float64(normalizer)
		}
		if math.IsNaN(loss) || math.IsInf(loss, 0) {
			if ck != nil && !savedSinceResume {
				return nil, &resumeDiverged{step: step + 1, loss: loss}
			}
			return nil, fmt.Errorf("step %d: loss is %v: training diverged; lower lr (it is %g), or keep max_grad_norm clipping on", step+1, loss, opts.LR)
		}
		factor, _ := LRFactor(opts.Schedule, step, opts.WarmupSteps, p.total)
		lr := opts.LR * factor
		gradNorm, err := s.Step(lr, opts.MaxGradNorm)
		if err != nil {
			return nil, fmt.Errorf("step %d: %w", step+1, err)
		}
		st.Step++
		st.Tokens += stepTokens
		sinceLogTokens += stepTokens
		st.LogLossSum += loss
		st.LogSteps++

		evalNow := len(evalRows) > 0 && ((opts.EvalEvery > 0 && st.Step%opts.EvalEvery == 0) || st.Step == p.total)
		ev := math.NaN()
		if evalNow {
			if ev, err = evalLoss(); err != nil {
				return nil, err
			}
			st.LastEval, st.HasEval = ev, true
			if patience > 0 {
				// As transformers: any better loss is the new best (the
				// checkpoint load_best_model_at_end takes), but only one
				// better by more than the threshold resets the count.
				improved := best == nil || ev < st.BestEval-opts.EarlyStoppingThreshold
				if best == nil || ev < st.BestEval {
					if best, _, err = s.State(); err != nil {
						return nil, err
					}
					st.BestEval, st.BestStep = ev, st.Step
				}
				if improved {
					st.BadEvals = 0
				} else if st.BadEvals++; stopped() {
					log.Info("stopping early: the held-out loss has not improved for "+fmt.Sprint(patience)+" evaluations",
						"step", st.Step, "best_step", st.BestStep, "best_eval_loss", st.BestEval)
				}
			}
		}
		elapsed := time.Since(start)
		if st.Step%opts.LogEvery == 0 || st.Step == p.total || evalNow {
			rate := float64(sinceLogTokens) / max(time.Since(sinceLog).Seconds(), 1e-9)
			line := Metric{Step: st.Step, Epoch: float64(st.Step) / float64(p.stepsPerEpoch),
				Loss: st.LogLossSum / float64(st.LogSteps), LR: lr, GradNorm: gradNorm, Tokens: st.Tokens,
				TokensPerSec: rate, ElapsedSec: (elapsedBefore + elapsed).Seconds(), PeakGPUGiB: float64(s.PeakMemory()) / (1 << 30)}
			if evalNow {
				line.EvalLoss = &ev
			}
			if writer {
				b, _ := json.Marshal(line)
				b = append(b, '\n')
				if _, err := metrics.Write(b); err != nil {
					return nil, err
				}
				st.MetricsBytes += int64(len(b))
			}
			history = append(history, line)
			st.LogLossSum, st.LogSteps = 0, 0
			sinceLogTokens, sinceLog = 0, time.Now()
		}
		if opts.Progress != nil {
			done := st.Step - startStep
			eta := time.Duration(float64(elapsed) / float64(done) * float64(p.total-st.Step))
			opts.Progress(Progress{Step: st.Step, TotalSteps: p.total, Loss: loss, EvalLoss: ev, LR: lr,
				GradNorm: gradNorm, TokensPerSec: float64(st.Tokens-startTokens) / max(elapsed.Seconds(), 1e-9),
				PeakMemory: s.PeakMemory(), Elapsed: elapsed, ETA: eta})
		}
		if writer && opts.CheckpointEvery > 0 && (st.Step%opts.CheckpointEvery == 0 || st.Step == p.total || stopped()) {
			if err := checkpoint(); err != nil {
				return nil, err
			}
		}
	}

	res := &Result{Steps: st.Step, EvalLoss: math.NaN(), EvalRows: len(evalRows), PeakMemory: s.PeakMemory()}
	if len(history) > 0 {
		res.FinalLoss = history[len(history)-1].Loss
	}
	if st.HasEval {
		res.EvalLoss = st.LastEval
	}
	if !writer {
		return res, nil
	}
	a, _, err := s.State()
	if err != nil {
		return nil, err
	}
	if best != nil { // the best evaluation's adapter, as load_best_model_at_end
		a, res.EvalLoss, res.BestStep, res.StoppedEarly = best, st.BestEval, st.BestStep, stopped() && st.Step < p.total
		if st.BestStep != st.Step {
			log.Info("the adapter written is that of the best held-out loss", "step", st.BestStep, "eval_loss", st.BestEval)
		}
	}
	adapterDir := filepath.Join(opts.OutDir, AdapterDirName)
	if err := info.SaveAdapter(adapterDir, a, opts.BaseModel); err != nil {
		return nil, err
	}
	svgPath := filepath.Join(opts.OutDir, LossCurveFile)
	if err := atomicfile.WriteFile(svgPath, LossCurveSVG(history)); err != nil {
		return nil, err
	}
	res.AdapterDir, res.MetricsPath, res.LossCurvePath = adapterDir, metricsPath, svgPath
	return res, nil
}

// batchFrom builds the batch of data's rows idx and counts its real
// (non-padding) tokens; a row that cannot be read is named as one of what,
// when given.
func batchFrom(data Dataset, idx []int, what string) (*Batch, int64, error) {
	rows := make([]PackedRow, len(idx))
	var tokens int64
	for i, r := range idx {
		row, err := data.Row(r)
		if err != nil {
			if what != "" {
				err = fmt.Errorf("%s: %w", what, err)
			}
			return nil, 0, err
		}
		rows[i] = row
		for _, l := range row.SeqLengths {
			tokens += int64(l)
		}
	}
	b, err := NewBatch(rows)
	return b, tokens, err
}

// warnUnused says which settings the plan of rows leaves without effect,
// where transformers' Trainer would act on them: max_steps past the
// epochs (it loops over the data again; here the epochs bound the run),
// a warmup as long as the run (lr never reached), eval_every with nothing
// held out (it refuses), and ranks beyond
// grad_accum (a step's micro-batches are shared among the ranks, so those
// have none; transformers multiplies the batch by the ranks instead).
func warnUnused(log *slog.Logger, p *rowPlan, o TrainOptions, ranks int) {
	if ranks > o.GradAccum {
		log.Warn("more ranks than micro-batches a step: some ranks have nothing to train", "ranks", ranks, "grad_accum", o.GradAccum,
			"fix", fmt.Sprintf("set grad_accum to a multiple of %d (the effective batch is batch_size × grad_accum whatever the ranks)", ranks))
	}
	if o.MaxSteps > p.stepsPerEpoch*o.Epochs {
		log.Warn("max_steps is more than the epochs give: training stops when they end", "max_steps", o.MaxSteps,
			"epochs", o.Epochs, "steps", p.total, "fix", fmt.Sprintf("raise epochs to %d to train %d steps", (o.MaxSteps+p.stepsPerEpoch-1)/p.stepsPerEpoch, o.MaxSteps))
	}
	if o.WarmupSteps >= p.total && p.total > 0 {
		// transformers warms up as long all the same: lr never reaches its value.
		log.Warn("the warmup is as long as training or longer: the learning rate never reaches lr", "warmup_steps", o.WarmupSteps,
			"steps", p.total, "fix", fmt.Sprintf("set warmup_steps below %d (or warmup_ratio, a share of the steps)", p.total))
	}
	if o.EvalEvery > 0 && len(p.eval) == 0 && o.EvalData == nil {
		log.Warn("eval_every has nothing to evaluate: no rows are held out", "eval_every", o.EvalEvery,
			"fix", "set eval_fraction, or hold examples out with a mix stage's heldout")
	}
}
