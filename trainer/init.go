package trainer

import (
	"fmt"
	"hash/fnv"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"sort"

	"golang.org/x/sync/errgroup"

	"gemmaft/internal/atomicfile"
	"gemmaft/trainer/safetensors"
)

// InitOptions controls WriteRandomCheckpoint.
type InitOptions struct {
	Seed uint64
	// Std is the standard deviation of embeddings and projections
	// (transformers initialises them with 0.02).
	Std float64
	// NormStd, when non-zero, draws norm weights from N(0, NormStd) instead
	// of transformers' zeros, so tests exercise the (1 + w) scaling.
	NormStd float64
	// DType is the stored dtype: "bfloat16" (default), "float16", "float32".
	DType string
	// Format is the config.json spelling (default transformers5).
	Format ConfigFormat
	// MaxShardBytes splits the weights into shards with an index file when
	// they exceed it (default 5 GB, as Hugging Face's save_pretrained).
	MaxShardBytes int64
}

// chunkElems is how many elements one RNG stream fills; chunks are seeded
// independently so they can be generated in parallel and the output does
// not depend on the number of cores.
const chunkElems = 1 << 20

// WriteRandomCheckpoint writes a Hugging Face layout checkpoint (config.json,
// model.safetensors or shards with model.safetensors.index.json) of shape
// cfg with weights drawn deterministically from opts.Seed. Tensors are
// generated and written one chunk at a time, so even the 27B shape needs
// little memory.
func WriteRandomCheckpoint(dir string, cfg *Config, opts InitOptions) error {
	c := *cfg
	if opts.DType != "" {
		c.DType = opts.DType
	}
	if opts.Std == 0 {
		opts.Std = 0.02
	}
	if opts.MaxShardBytes == 0 {
		opts.MaxShardBytes = 5_000_000_000
	}
	dt := map[string]safetensors.DType{"bfloat16": safetensors.BF16, "float16": safetensors.F16, "float32": safetensors.F32}[c.DType]
	if dt == "" {
		return fmt.Errorf("random checkpoint: unsupported dtype %q", c.DType)
	}
	cj, err := c.MarshalConfig(opts.Format)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	specs := c.tensorSpecs()
	prefix := "model."
	if c.Multimodal {
		// The original multimodal release's layout.
		prefix = "language_model.model."
	}
	for i := range specs {
		specs[i].base = specs[i].name
		specs[i].name = prefix + specs[i].name
	}
	sort.Slice(specs, func(i, j int) bool { return specs[i].name < specs[j].name })

	var ts []safetensors.StreamTensor
	for _, spec := range specs {
		ts = append(ts, safetensors.StreamTensor{Name: spec.name, DType: dt, Shape: spec.shape,
			Write: func(w io.Writer) error { return writeRandomTensor(w, spec, dt, opts) }})
	}
	if err := safetensors.WriteSharded(dir, ts, opts.MaxShardBytes, map[string]string{"format": "pt"}); err != nil {
		return err
	}
	return atomicfile.WriteFile(filepath.Join(dir, "config.json"), cj)
}

func writeRandomTensor(w io.Writer, s tensorSpec, dt safetensors.DType, opts InitOptions) error {
	n := 1
	for _, d := range s.shape {
		n *= d
	}
	std, mean := opts.Std, 0.0
	if s.kind == "norm" || s.kind == "qknorm" {
		std = opts.NormStd
	}
	h := fnv.New64a()
	h.Write([]byte("model." + s.base)) // the text-only checkpoint's name
	nameSeed := h.Sum64()
	// Generate up to one batch of chunks in parallel, then write them in order.
	workers := runtime.GOMAXPROCS(0)
	bufs := make([][]byte, workers)
	for start := 0; start < n; start += workers * chunkElems {
		var g errgroup.Group
		for wi := 0; wi < workers; wi++ {
			lo := start + wi*chunkElems
			bufs[wi] = bufs[wi][:0]
			if lo >= n {
				continue
			}
			hi := min(lo+chunkElems, n)
			g.Go(func() error {
				rng := rand.New(rand.NewPCG(opts.Seed^nameSeed, uint64(lo/chunkElems)))
				vals := make([]float32, hi-lo)
				for i := range vals {
					if std != 0 {
						vals[i] = float32(mean + std*rng.NormFloat64())
					}
				}
				b, err := safetensors.EncodeFloat32(dt, vals)
				bufs[wi] = b
				return err
			})
		}
		if err := g.Wait(); err != nil {
			return err
		}
		for _, b := range bufs {
			if _, err := w.Write(b); err != nil {
				return err
			}
		}
	}
	return nil
}
