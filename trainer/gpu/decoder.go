package gpu

import (
	"context"
	"fmt"

	"gemmaft/cuda"
	"gemmaft/trainer"
)

// Decoding on the GPU: the session's forward pass, with attention against
// key/value caches on the device. A decoding's first step runs the prompts
// as packed examples (each attends within itself, as in training) and
// stores their keys and values; every later step runs one token per
// unfinished sequence, which stores its own key and value and attends to
// its sequence's cache (attn_cached). The loop around the steps (picks,
// stop tokens) is trainer.DecodeLoop, the CPU reference's.

// DecodeTokens is the most prompt tokens one Generate call takes at once
// (the session's micro-batch).
const DecodeTokens = 8192

// kvCaches are one decoding's caches: per layer, sequences × cacheLen rows
// of keys and of values, cacheLen every position on global layers and the
// window on sliding ones (a ring).
type kvCaches struct {
	cacheLen []int
	k, v     []cuda.Buffer
	// The step's tokens: their sequence, position, and the first position
	// each layer type stores (a prompt longer than a ring keeps its tail).
	seq, pos cuda.Buffer
	from     [2]cuda.Buffer
	prefill  bool
}

// attention replaces block l's attention while a decoder's step runs.
func (dc *kvCaches) attention(s *session, c *cuda.Ctx, T, l, ti int, lc *layerCache) error {
	cfg := s.info.Config
	H, KV := cfg.Heads, cfg.KVHeads
	if err := s.k.KVStore(c, lc.kr.Ptr, lc.v.Ptr, dc.seq.Ptr, dc.pos.Ptr, dc.from[ti].Ptr, dc.k[l].Ptr, dc.v[l].Ptr, T, KV, dc.cacheLen[l]); err != nil {
		return err
	}
	if dc.prefill {
		return s.k.Attention(c, lc.qr.Ptr, lc.kr.Ptr, lc.v.Ptr, s.ws.lo[ti].Ptr, lc.att.Ptr, lc.lse.Ptr, T, H, KV, s.attnScale())
	}
	window := 0
	if cfg.LayerTypes[l] == trainer.SlidingAttention {
		window = cfg.SlidingWindow
	}
	return s.k.AttentionCached(c, lc.qr.Ptr, dc.k[l].Ptr, dc.v[l].Ptr, dc.seq.Ptr, dc.pos.Ptr, lc.att.Ptr, T, H, KV, dc.cacheLen[l], window, s.attnScale())
}

// decoder is a session used for decoding (trainer.Decoder).
type decoder struct{ s *session }

// openDecoder loads cfg's model (and adapter) into a session of the given
// precision ("" is bf16).
func openDecoder(ctx context.Context, cfg trainer.DecoderConfig, precision string) (trainer.Decoder, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	ck, err := trainer.OpenCheckpoint(cfg.Model)
	if err != nil {
		return nil, err
	}
	// Without an adapter, a LoRA of rank 1 with B zero adds nothing.
	lc := trainer.LoRAConfig{R: 1, Alpha: 1, Targets: []trainer.Module{trainer.QProj}}
	var a *trainer.Adapter
	if cfg.Adapter != "" {
		if a, err = ck.ModelInfo.LoadAdapter(cfg.Adapter); err != nil {
			return nil, fmt.Errorf("adapter for %s: %w", cfg.Model, err)
		}
		lc = a.Config
	} else if a, err = trainer.NewAdapter(ck.Config, lc, 0); err != nil {
		return nil, err
	}
	quantize := cfg.Quantize
	if quantize == "" {
		quantize = "none"
	}
	s, err := Open(ctx, ck, trainer.SessionConfig{Model: cfg.Model, Quantize: quantize, LoRA: lc,
		GradientCheckpointing: true, MaxTokens: DecodeTokens, Precision: precision})
	if err != nil {
		return nil, err
	}
	if err := s.SetState(a, nil); err != nil {
		s.Close()
		return nil, err
	}
	return &decoder{s: s.(*session)}, nil
}

func (g *decoder) Info() *trainer.ModelInfo { return &g.s.info }
func (g *decoder) Close() error             { return g.s.Close() }

func (g *decoder) Generate(ctx context.Context, prompts [][]int32, o trainer.GenerateOptions, emit func(seq int, tok int32)) ([][]int32, error) {
	s, cfg := g.s, g.s.info.Config
	total, longest := 0, 0
	for _, p := range prompts {
		total, longest = total+len(p), max(longest, len(p))
	}
	if total > s.ws.T {
		return nil, fmt.Errorf("gpu: %d prompt tokens at once; the decoder takes %d (fewer prompts at a time)", total, s.ws.T)
	}
	maxLen := min(longest+o.MaxNewTokens, cfg.MaxPositions)
	dc := &kvCaches{}
	err := s.dev.Do(func(c *cuda.Ctx) error {
		row := int64(cfg.KVHeads) * int64(cfg.HeadDim) * s.k.Prec.Size()
		for _, lt := range cfg.LayerTypes {
			n := maxLen
			if lt == trainer.SlidingAttention {
				n = min(n, cfg.SlidingWindow)
			}
			k, err := c.Alloc(int64(len(prompts)) * int64(n) * row)
			if err != nil {
				return err
			}
			v, err := c.Alloc(int64(len(prompts)) * int64(n) * row)
			if err != nil {
				c.Free(k)
				return err
			}
			dc.cacheLen, dc.k, dc.v = append(dc.cacheLen, n), append(dc.k, k), append(dc.v, v)
		}
		var err error
		for _, b := range []*cuda.Buffer{&dc.seq, &dc.pos, &dc.from[0], &dc.from[1]} {
			if *b, err = c.Alloc(4 * int64(s.ws.T)); err != nil {
				return err
			}
		}
		return nil
	})
	defer s.dev.Do(func(c *cuda.Ctx) error {
		for _, b := range append(append(dc.k, dc.v...), dc.seq, dc.pos, dc.from[0], dc.from[1]) {
			if b.Ptr != 0 {
				c.Free(b)
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("gpu: the decoding caches: %w", err)
	}
	s.dec = dc
	defer func() { s.dec = nil }()
	window := min(cfg.SlidingWindow, maxLen)
	first := true
	return trainer.DecodeLoop(ctx, cfg, prompts, o, emit, func(ids, pos []int32, seqOf []int) ([][]float32, error) {
		T := len(ids)
		b, seq, from := decodeBatch(ids, pos, seqOf, window)
		if err := s.dev.Do(func(c *cuda.Ctx) error {
			for _, u := range []struct {
				dst cuda.DevicePtr
				src []int32
			}{{dc.seq.Ptr, seq}, {dc.pos.Ptr, pos}, {dc.from[0].Ptr, from}, {dc.from[1].Ptr, make([]int32, T)}} {
				if err := cuda.Upload(c, u.dst, u.src); err != nil {
					return err
				}
			}
			return nil
		}); err != nil {
			return nil, err
		}
		dc.prefill, first = first, false
		return s.PositionLogits(b)
	})
}

// decodeBatch lays out a decoding step (DecodeStep's arguments) for the
// session: each sequence's tokens one example, a target (any) at each
// sequence's last token so that PositionLogits returns its logits, each
// token's sequence, and the first position a ring of window rows keeps.
func decodeBatch(ids, pos []int32, seqOf []int, window int) (b *trainer.Batch, seq, from []int32) {
	T := len(ids)
	b = &trainer.Batch{IDs: ids, Pos: pos, SegStart: make([]int32, T), Targets: make([]int32, T)}
	seq, from = make([]int32, T), make([]int32, T)
	last := map[int]int32{} // each sequence's last position in the step
	for i := range ids {
		seq[i] = int32(seqOf[i])
		last[seqOf[i]] = pos[i]
		if i > 0 && seqOf[i] == seqOf[i-1] {
			b.SegStart[i] = b.SegStart[i-1]
		} else {
			b.SegStart[i] = int32(i)
		}
		b.Targets[i] = trainer.IgnoreIndex
		if i+1 == T || seqOf[i+1] != seqOf[i] {
			b.Targets[i] = 0 // the logits there are wanted
		}
	}
	for i := range ids {
		from[i] = max(0, last[seqOf[i]]-int32(window)+1)
	}
	return b, seq, from
}
