package trainer

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"

	"gemmaft/trainer/safetensors"
)

// The training loop (Train) is written once, over a Session: a model loaded
// on some device together with the adapter and optimizer state being
// trained. A Backend opens sessions. The CPU reference backend lives in
// this package; the GPU backend (package trainer/gpu) registers itself from
// its init function, the way database/sql drivers do, so this package never
// imports device code.

// Backend is a device that trains adapters.
type Backend interface {
	// Name is how the qlora stage and the CLI spell the backend: "cpu" or
	// "cuda".
	Name() string
	// Usable says whether the backend can run on this machine; the error
	// says why not.
	Usable() error
	// Open loads the model cfg names and allocates what training an adapter
	// of cfg's shape needs. The session starts with no adapter: the caller
	// sets the initial state with SetState.
	Open(ctx context.Context, cfg SessionConfig) (Session, error)
}

// SessionConfig is everything a backend needs to know before the first
// batch: the model, the adapter's shape, the optimizer and the largest
// micro-batch. It is part of a run's resume fingerprint, so it holds only
// what changes the numbers (and Model, which names the checkpoint).
type SessionConfig struct {
	// Model is a Hugging Face checkpoint folder (config.json, safetensors).
	Model string `json:"-"`
	// Quantize is "nf4" (QLoRA) or "none" (LoRA on the stored weights).
	Quantize  string          `json:"quantize"`
	LoRA      LoRAConfig      `json:"lora"`
	Optimizer OptimizerConfig `json:"optimizer"`
	// GradientCheckpointing keeps only each layer's input through the
	// forward pass and recomputes the layer in the backward pass (the GPU
	// backend also keeps a few small or costly results: trainer/gpu).
	GradientCheckpointing bool `json:"gradient_checkpointing"`
	// Inference: the session only evaluates (scores, decodes), so a GPU
	// backend keeps nothing for a backward pass.
	Inference bool `json:"-"`
	// MaxTokens is the most tokens one micro-batch holds (batch size times
	// the packed row length); a GPU backend sizes its buffers by it.
	MaxTokens int `json:"-"`
	// Precision selects the GPU backend's activation type: "" or "bf16"
	// (the default), or "fp32", a test mode that runs every kernel in
	// float32 to compare with the CPU reference closely. The CPU backend
	// always computes in float32 and float64.
	Precision string `json:"precision,omitempty"`
	// MemoryLimit, when positive, is the most device memory (bytes, as
	// nvidia-smi counts a process's) the session may plan for, below what
	// the device has free: a GPU backend then lays itself out as it would
	// on a card of that size (offloading what does not fit), or refuses.
	MemoryLimit int64 `json:"-"`
	// Group, when it has more than one rank, trains with other processes
	// (see Group): the session sums its gradients over them before each
	// step. It changes nothing in the numbers beyond summation order, so
	// it is no part of the resume fingerprint: a run resumes with any
	// number of ranks.
	Group Group `json:"-"`
}

// OptimizerConfig names the optimizer and its settings.
type OptimizerConfig struct {
	// Name is "adamw" (torch.optim.AdamW, float32 state) or "adamw_8bit"
	// (bitsandbytes' blockwise 8-bit AdamW); see ResolveOptimizer.
	Name                           string
	Beta1, Beta2, Eps, WeightDecay float64
}

func (o *OptimizerConfig) defaults() {
	if o.Name == "" {
		o.Name = "adamw"
	}
	if o.Beta1 == 0 {
		o.Beta1 = 0.9
	}
	if o.Beta2 == 0 {
		o.Beta2 = 0.999
	}
	if o.Eps == 0 {
		o.Eps = 1e-8
	}
}

// Validate fills in defaults and checks the session's settings.
func (c *SessionConfig) Validate() error {
	if c.Quantize == "" {
		c.Quantize = "nf4"
	}
	if c.Quantize != "nf4" && c.Quantize != "none" {
		return fmt.Errorf("quantize %q: use nf4 or none", c.Quantize)
	}
	c.Optimizer.defaults()
	if c.Optimizer.Name != "adamw" && c.Optimizer.Name != "adamw_8bit" {
		return fmt.Errorf("optimizer %q: the backends run adamw and adamw_8bit (see ResolveOptimizer)", c.Optimizer.Name)
	}
	if c.Optimizer.WeightDecay < 0 {
		return fmt.Errorf("weight decay %v must not be negative", c.Optimizer.WeightDecay)
	}
	switch c.Precision {
	case "", "bf16", "fp32":
	default:
		return fmt.Errorf("precision %q: use bf16 or fp32", c.Precision)
	}
	return c.LoRA.Validate()
}

// Session is a model on a device with the adapter and optimizer state
// being trained. The methods are called from one goroutine.
type Session interface {
	// Model describes the loaded checkpoint.
	Model() *ModelInfo
	// Config is the configuration the session was opened with, defaults
	// filled in.
	Config() SessionConfig
	// Backend is the name of the backend that opened the session.
	Backend() string
	// SetState replaces the adapter's weights and the optimizer state (a
	// zero OptimizerState starts the optimizer afresh) and clears the
	// gradients.
	SetState(a *Adapter, opt *OptimizerState) error
	// State copies the adapter and the optimizer state to the host.
	State() (*Adapter, *OptimizerState, error)
	// Grads copies the gradients accumulated since the last Step to the
	// host, as an adapter whose A and B hold the gradients of A and B (for
	// tests and diagnostics).
	Grads() (*Adapter, error)
	// LossAndGrad runs a micro-batch forward and backward: it returns the
	// summed cross-entropy of the batch's trained tokens and their number,
	// and adds the gradient of sum/normalizer to the adapter's gradients.
	// normalizer is the number of trained tokens of the whole optimizer
	// step, so that micro-batches accumulate to the gradient of the step's
	// mean loss. dropoutSeed fixes the dropout masks.
	LossAndGrad(b *Batch, normalizer float64, dropoutSeed uint64) (sum float64, count int, err error)
	// Loss is LossAndGrad without dropout and without gradients.
	Loss(b *Batch) (sum float64, count int, err error)
	// Step scales the accumulated gradients so that their global norm is at
	// most maxGradNorm (0: no clipping), applies one optimizer update with
	// learning rate lr and clears the gradients. It returns the gradient
	// norm before clipping.
	Step(lr, maxGradNorm float64) (gradNorm float64, err error)
	// PeakMemory is the most device memory the session has held, in bytes
	// (0 for the CPU backend, whose memory is the process's).
	PeakMemory() int64
	// Close releases the device's memory.
	Close() error
}

// LogitSession is a Session that returns logits: those at each position
// of b with a target (b.Targets ≠ IgnoreIndex), in order, computed as Loss
// computes them (no dropout, no gradients). Scorers of other devices build
// on it.
type LogitSession interface {
	Session
	PositionLogits(b *Batch) ([][]float32, error)
}

// MemoryPlanner is a Session that planned its device memory from the
// shapes before loading: its total in bytes and what it is made of, for
// the log before a run starts.
type MemoryPlanner interface {
	PlannedMemory() (bytes int64, detail string)
}

// OptimizerState is an optimizer's state as checkpoints store it: the
// number of updates taken and named tensors (for AdamW "<param>.exp_avg"
// and "<param>.exp_avg_sq"; for 8-bit AdamW the quantised moments and
// their block maxima). A zero value is a fresh optimizer.
type OptimizerState struct {
	Name    string
	Step    int
	Tensors []safetensors.Tensor
}

// tensor returns the named tensor.
func (s *OptimizerState) tensor(name string) (safetensors.Tensor, bool) {
	for _, t := range s.Tensors {
		if t.Name == name {
			return t, true
		}
	}
	return safetensors.Tensor{}, false
}

var (
	backendsMu sync.Mutex
	backends   = map[string]Backend{"cpu": cpuBackend{}}
)

// RegisterBackend makes a backend available by its name. It panics when
// the name is taken, as two backends of one name are a build mistake.
func RegisterBackend(b Backend) {
	backendsMu.Lock()
	defer backendsMu.Unlock()
	if _, dup := backends[b.Name()]; dup {
		panic("trainer: backend " + b.Name() + " registered twice")
	}
	backends[b.Name()] = b
}

// Backends lists the registered backends' names.
func Backends() []string {
	backendsMu.Lock()
	defer backendsMu.Unlock()
	var names []string
	for n := range backends {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// ErrNoGPUBackend says that this program was built without the GPU
// trainer.
var ErrNoGPUBackend = errors.New("this program was built without the GPU trainer (package trainer/gpu)")

// ResolveBackend turns a backend name as users write it into a backend:
// "cpu", "cuda", or "auto", which picks cuda when its GPU is usable and the
// CPU otherwise. It is the one place that decides, for the qlora stage,
// `pipeline loss` and `pipeline doctor` alike. For auto, note says why the
// choice was made.
func ResolveBackend(name string) (b Backend, note string, err error) {
	backendsMu.Lock()
	cuda, hasCUDA := backends["cuda"]
	cpu := backends["cpu"]
	backendsMu.Unlock()
	switch name {
	case "cpu":
		return cpu, "", nil
	case "cuda":
		if !hasCUDA {
			return nil, "", ErrNoGPUBackend
		}
		if err := cuda.Usable(); err != nil {
			return nil, "", fmt.Errorf("backend cuda: %w", err)
		}
		return cuda, "", nil
	case "auto", "":
		if !hasCUDA {
			return cpu, "auto: " + ErrNoGPUBackend.Error() + "; training on the CPU", nil
		}
		if err := cuda.Usable(); err != nil {
			return cpu, fmt.Sprintf("auto: the GPU is not usable (%v); training on the CPU", err), nil
		}
		return cuda, "auto: training on the GPU", nil
	}
	return nil, "", fmt.Errorf("unknown backend %q (cpu, cuda or auto)", name)
}

// OpenSession resolves the backend name and opens a session on it.
func OpenSession(ctx context.Context, backend string, cfg SessionConfig) (Session, error) {
	b, _, err := ResolveBackend(backend)
	if err != nil {
		return nil, err
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return b.Open(ctx, cfg)
}
