package gpu

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"

	"gemmaft/cuda"
	"gemmaft/trainer"
	"gemmaft/trainer/gpu/kernels"
)

// session is the GPU backend's trainer.Session.
type session struct {
	dev   *cuda.Device
	k     *kernels.Kernels
	cfg   trainer.SessionConfig
	info  trainer.ModelInfo
	plan  MemoryPlan
	w     *weights
	lora  *loraState
	ws    *workspace
	owned []cuda.Buffer
	peak  int64
	prof  *profiler  // nil unless StartProfile
	comm  *cuda.Comm // the gradients' all-reduce when training with other ranks
	red   *reducer   // with comm: the layer-by-layer all-reduce during a backward pass
	off   *offloader // nil unless the saved layer inputs live on the host
	dec   *kvCaches  // set while a decoder's step runs
	// baseOnly skips the LoRA products: a decoder without an adapter,
	// whose placeholder adapter adds zero.
	baseOnly bool
	// loraFirst marks the projections whose update is written before the
	// frozen product (LoRAFirstEnv), in trainer.AllModules order.
	loraFirst [7]bool

	// The rotary tables of the positions so far, by layer type, and the
	// inverse frequencies they are grown from.
	ropeCos, ropeSin, ropeInv [2][]float32
}

// Open loads the checkpoint onto GPU 0 and allocates everything a session
// of cfg needs. It checks the memory plan against the device's free memory
// before loading, so a run that cannot fit fails at once with what to
// change.
func Open(ctx context.Context, ck *trainer.Checkpoint, cfg trainer.SessionConfig) (trainer.Session, error) {
	return open(ctx, ck.ModelInfo, cfg, func(s *session) error {
		if err := s.loadWeights(ck, cfg.Quantize == "nf4"); err != nil {
			return fmt.Errorf("loading %s onto the GPU: %w", ck.Dir, err)
		}
		return nil
	})
}

// OpenRandom opens a session on a model of shape mc whose weights are
// drawn on the device from N(0, std²) with seed (norms zero): a model of a
// real size for benchmarks and shape tests, without a checkpoint on disk.
func OpenRandom(ctx context.Context, mc *trainer.Config, seed uint64, std float64, cfg trainer.SessionConfig) (trainer.Session, error) {
	if err := mc.Validate(); err != nil {
		return nil, err
	}
	return open(ctx, trainer.ModelInfo{Config: mc, Prefix: "model."}, cfg, func(s *session) error {
		return s.randomWeights(mc, seed, std, cfg.Quantize == "nf4")
	})
}

func open(ctx context.Context, info trainer.ModelInfo, cfg trainer.SessionConfig, load func(*session) error) (trainer.Session, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.MaxTokens <= 0 {
		return nil, errors.New("gpu: SessionConfig.MaxTokens must give the largest micro-batch (batch size × row length)")
	}
	prec, err := kernels.ParsePrecision(cfg.Precision)
	if err != nil {
		return nil, err
	}
	mc := info.Config
	if err := kernels.CheckHeadDim(mc.HeadDim); err != nil {
		return nil, err
	}
	if mc.Heads%mc.KVHeads != 0 {
		return nil, fmt.Errorf("gpu: %d heads are not a multiple of %d key/value heads", mc.Heads, mc.KVHeads)
	}
	ordinal, err := deviceOf(cfg.Group)
	if err != nil {
		return nil, err
	}
	dev, err := cuda.Open(ordinal)
	if err != nil {
		return nil, err
	}
	s := &session{dev: dev, cfg: cfg, info: info}
	fail := func(err error) (trainer.Session, error) {
		s.Close()
		return nil, err
	}
	if s.loraFirst, err = loraFirstModules(); err != nil {
		return fail(err)
	}
	var free int64
	if err := dev.Do(func(c *cuda.Ctx) error {
		var err error
		free, _, err = c.MemInfo()
		return err
	}); err != nil {
		return fail(err)
	}
	room := fmt.Sprintf("%s has %.1f GiB free", dev.Info.Name, gib(free))
	if cfg.MemoryLimit > 0 && cfg.MemoryLimit < free {
		free = cfg.MemoryLimit
		room = fmt.Sprintf("the limit is %.1f GiB", gib(free))
	}
	if s.plan, err = choosePlan(mc, cfg, prec, free); err != nil {
		return fail(err)
	}
	if need := s.plan.Total(); need > free {
		return fail(fmt.Errorf("gpu: this run needs about %.1f GiB of GPU memory (%s) but %s; "+
			"lower batch_size or the packed seq_len, keep gradient_checkpointing on, use quantize: nf4 and adamw_8bit, or a smaller model",
			gib(need), s.plan, room))
	}
	if err := dev.Do(func(c *cuda.Ctx) error {
		s.k, err = kernels.Load(c, prec, mc.HeadDim)
		return err
	}); err != nil {
		return fail(err)
	}
	if err := setGEMMTuning(dev); err != nil {
		return fail(err)
	}
	// Before the weights load: a group that cannot form fails at once.
	if err := s.joinComm(); err != nil {
		return fail(err)
	}
	if err := ctx.Err(); err != nil {
		return fail(err)
	}
	if err := load(s); err != nil {
		return fail(err)
	}
	// Staging buffers of the load go back to the driver.
	if err := dev.Do(func(c *cuda.Ctx) error { return c.EmptyCache() }); err != nil {
		return fail(err)
	}
	if s.lora, err = layoutLoRA(mc, cfg.LoRA, cfg.Optimizer); err != nil {
		return fail(err)
	}
	if err := dev.Do(func(c *cuda.Ctx) error {
		if err := s.lora.allocate(s, c); err != nil {
			return err
		}
		return s.allocWorkspace(c, cfg.MaxTokens)
	}); err != nil {
		return fail(err)
	}
	// The session starts with PEFT's initialisation for seed 0 until the
	// caller sets its state.
	a, err := trainer.NewAdapter(mc, cfg.LoRA, 0)
	if err != nil {
		return fail(err)
	}
	if err := s.SetState(a, nil); err != nil {
		return fail(err)
	}
	return s, nil
}

func (s *session) Model() *trainer.ModelInfo     { return &s.info }
func (s *session) Config() trainer.SessionConfig { return s.cfg }
func (s *session) Backend() string               { return "cuda" }

func (s *session) SetState(a *trainer.Adapter, opt *trainer.OptimizerState) error {
	return s.dev.Do(func(c *cuda.Ctx) error {
		if err := s.lora.setState(s, c, a, opt); err != nil {
			return err
		}
		return c.Synchronize()
	})
}

func (s *session) State() (*trainer.Adapter, *trainer.OptimizerState, error) {
	var a *trainer.Adapter
	var opt *trainer.OptimizerState
	err := s.dev.Do(func(c *cuda.Ctx) error {
		var err error
		a, opt, err = s.lora.state(s, c, s.info.Config)
		return err
	})
	return a, opt, err
}

func (s *session) Grads() (*trainer.Adapter, error) {
	var g *trainer.Adapter
	err := s.dev.Do(func(c *cuda.Ctx) error {
		host, err := s.lora.gradValues(c)
		if err != nil {
			return err
		}
		g, err = s.lora.asAdapter(s.info.Config, host)
		return err
	})
	return g, err
}

func (s *session) LossAndGrad(b *trainer.Batch, normalizer float64, dropoutSeed uint64) (float64, int, error) {
	if normalizer <= 0 {
		return 0, 0, fmt.Errorf("normalizer %v must be positive", normalizer)
	}
	sum, n, err := s.run(b, true, normalizer, dropoutSeed)
	s.notePeak()
	return sum, n, err
}

func (s *session) Loss(b *trainer.Batch) (float64, int, error) {
	sum, n, err := s.run(b, false, 1, 0)
	s.notePeak()
	return sum, n, err
}

func (s *session) Step(lr, maxGradNorm float64) (float64, error) {
	var norm float64
	err := s.dev.Do(func(c *cuda.Ctx) error {
		var err error
		if norm, err = s.lora.update(s, c, lr, maxGradNorm); err != nil {
			return err
		}
		if s.prof != nil {
			return s.prof.collect(c)
		}
		return c.Stream().Synchronize()
	})
	return norm, err
}

// notePeak records the device memory in use: everything the process holds
// on the GPU, context and library workspaces included, as nvidia-smi
// counts it. The session allocates all its buffers when it opens, so the
// reading after a step is its peak.
func (s *session) notePeak() {
	_ = s.dev.Do(func(c *cuda.Ctx) error {
		free, total, err := c.MemInfo()
		if err == nil {
			s.peak = max(s.peak, total-free)
		}
		return nil
	})
}

func (s *session) PeakMemory() int64 { return s.peak }

func (s *session) PlannedMemory() (int64, string) { return s.plan.Total(), s.plan.String() }

func (s *session) Close() error {
	if s.dev == nil {
		return nil
	}
	if s.comm != nil {
		_ = s.dev.Do(func(*cuda.Ctx) error {
			r := s.red
			if r == nil {
				return s.comm.Destroy()
			}
			// Sums queued by a step that failed (another rank went away)
			// may never complete: Destroy would wait on them.
			end := s.comm.Destroy
			if r.active {
				end = s.comm.Abort
			}
			err := end()
			if r.done != nil {
				r.done.Destroy()
			}
			if r.stream != nil {
				r.stream.Destroy()
			}
			return err
		})
	}
	if s.off != nil {
		_ = s.dev.Do(func(c *cuda.Ctx) error { s.off.free(c); return nil })
	}
	if s.lora != nil && s.lora.hg != nil {
		_ = s.dev.Do(func(c *cuda.Ctx) error { s.lora.hg.free(c); return nil })
	}
	err := s.dev.Close()
	s.dev = nil
	return err
}

// GEMMTuneEnv set to a count n > 1 makes each GEMM shape time cuBLASLt's
// first n choices of algorithm on its first use and keep the fastest,
// each outcome reported on stderr (cuda.Ctx.SetGEMMTuning). A measurement
// mode: the choice follows timings, so runs stop being reproducible bit
// for bit.
const GEMMTuneEnv = "PIPELINE_GEMM_TUNE"

func setGEMMTuning(dev *cuda.Device) error {
	v := os.Getenv(GEMMTuneEnv)
	if v == "" {
		return nil
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 0 {
		return fmt.Errorf("%s=%q: want the number of algorithms to time, such as 8", GEMMTuneEnv, v)
	}
	return dev.Do(func(c *cuda.Ctx) error {
		return c.SetGEMMTuning(n, func(line string) { fmt.Fprintln(os.Stderr, line) })
	})
}
