package gpu

import (
	"context"
	"encoding/binary"
	"fmt"
	"math"
	"os"

	"gemmaft/cuda"
	"gemmaft/trainer"
	"gemmaft/trainer/gpu/kernels"
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

// NF4StepTokens is the most sequences a decoding step may have for it to
// read NF4 weights in that form directly (see session.nf4GEMV).
const NF4StepTokens = kernels.GEMVTokens

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
	best     cuda.Buffer // each sequence's most likely next token
	part     cuda.Buffer // the cached attention's workspace
	prefill  bool        // the step running is the first, the prompts
	maxLen   int         // the positions a sequence's caches hold
	// graphs holds a step captured per number of tokens; nil once the
	// number has run once, not yet captured.
	graphs map[int]*cuda.Graph
	// tok runs the steps of one token as decode_token, or is nil.
	tok *tokenStep
	// Sampling's candidates (kernels.TopCandidates), where the decoding
	// samples from a top k the kernel takes, else none: per sequence, a
	// record of topCapacity and the chunks' maxima.
	topRecords, topMaxima cuda.Buffer
}

// topCapacity is the most candidates of a sequence a sampling step hands
// over (8 KB); a step with more (logits with many ties at the top, or
// rows without k finite values) hands over its logits instead. A
// threshold from k of 1,024 chunks' maxima leaves about k candidates on
// random logits.
const topCapacity = 1024

// TokenKernelEnv set to "off" runs a decoding's steps of one token as a
// launch per operation; by default they run as decode_token
// (kernels.DecodeToken), every block of the model in one launch, where
// the model takes it (tokenShape). On the H200 that was 21% faster at
// the 1B shape in bf16, 33% in NF4, 7% at 12B in NF4, and 1.5% slower at
// 12B in bf16 (trainer/gpu/NOTES.md, "Decoding: one launch a token").
const TokenKernelEnv = "PIPELINE_TOKEN_KERNEL"

// tokenStep is one decoding's state for decode_token.
type tokenStep struct {
	shape                       kernels.TokenShape
	layers, work, records, sync cuda.Buffer
	times                       cuda.Buffer // while profiling: the launch's clock readings
	loras, xa                   cuda.Buffer // with an adapter: its table, and x·Aᵀ
	// A launch's step record (EncodeTokenStep) and its pick go through one
	// of two slots, in pinned memory and on the device, so that a launch
	// can be queued while the one before runs: step holds two records,
	// stepHost their copies on the host, bestHost two picks, pickCopied[i]
	// is recorded after slot i's pick is copied.
	step               cuda.Buffer
	stepHost, bestHost *cuda.HostBuffer
	pickCopied         [2]*cuda.Event
	stepBytes          int64
	launches           int // slot launches%2 is the next
	// ahead is the step of the last pick, queued before the host asked
	// for it (greedy decoding), or nil.
	ahead *queuedToken
}

// queuedToken is a launch of decode_token whose pick the host has not
// read: sequence seq's token id at position pos, in slot slot. A step
// queued ahead learns its id once the host has read the pick it runs.
type queuedToken struct {
	seq, pos, id int32
	slot         int
}

// tokenShape is the shape decode_token runs for this decoder's model with
// caches of maxLen positions, or why it cannot: it takes the weights in
// the form the launch-per-operation steps of one token read them (dense,
// or NF4 where nf4GEMV reads that form), the adapter's products where
// there is one (decode_token_lora), and a session that offloads nothing.
func (s *session) tokenShape(maxLen int) (kernels.TokenShape, error) {
	cfg := s.info.Config
	sh := kernels.TokenShape{Hidden: cfg.Hidden, Heads: cfg.Heads, KVHeads: cfg.KVHeads, Intermediate: cfg.Intermediate,
		Layers: cfg.Layers, Vocab: cfg.VocabSize, MaxKeys: maxLen, Eps: cfg.RMSNormEps, AttnScale: s.attnScale(), EmbedScale: s.info.EmbedScale()}
	if !s.baseOnly {
		sh.LoRARank, sh.LoRAScale = s.cfg.LoRA.R, float32(s.cfg.LoRA.Scale())
	}
	if s.off != nil {
		return sh, fmt.Errorf("decode_token does not offload")
	}
	sh.NF4 = s.w.layers[0].proj[0].nf4
	for l := range s.w.layers {
		for i := range s.w.layers[l].proj {
			p := &s.w.layers[l].proj[i]
			if p.nf4 != sh.NF4 || sh.NF4 && !s.nf4GEMV(1, p) || !sh.NF4 && p.dense.Ptr == 0 {
				return sh, fmt.Errorf("decode_token takes every projection dense, or every one read as NF4; layer %d's %s is neither", l, trainer.AllModules[i])
			}
		}
	}
	return sh, s.k.TokenFits(sh, s.dev.Info)
}

// newTokenStep allocates decode_token's buffers for caches dc and uploads
// its layer table.
func (s *session) newTokenStep(c *cuda.Ctx, dc *kvCaches, sh kernels.TokenShape) (*tokenStep, error) {
	cfg := s.info.Config
	ts := &tokenStep{shape: sh}
	sizes := s.k.TokenBuffers(sh)
	table := make([]kernels.TokenLayer, cfg.Layers)
	for l := range table {
		L := &s.w.layers[l]
		mat := func(m trainer.Module) kernels.TokenMatrix {
			p := &L.proj[moduleIndex(m)]
			if sh.NF4 {
				tc, ta := p.tileParts()
				return kernels.TokenMatrix{Weights: p.packed.Ptr, AbsmaxQ: p.absmaxQ.Ptr, Absmax2: p.absmax2.Ptr, Offset: p.offset, NF4: true,
					TileCodes: tc, TileAbsmaxQ: ta}
			}
			return kernels.TokenMatrix{Weights: p.dense.Ptr}
		}
		window := 0
		if cfg.LayerTypes[l] == trainer.SlidingAttention {
			window = cfg.SlidingWindow
		}
		table[l] = kernels.TokenLayer{Q: mat(trainer.QProj), K: mat(trainer.KProj), V: mat(trainer.VProj), O: mat(trainer.OProj),
			Gate: mat(trainer.GateProj), Up: mat(trainer.UpProj), Down: mat(trainer.DownProj),
			InputNorm: L.inputNorm.Ptr, PostAttnNorm: L.postAttnNorm.Ptr, PreFFNorm: L.preFFNorm.Ptr, PostFFNorm: L.postFFNorm.Ptr,
			QNorm: L.qNorm.Ptr, KNorm: L.kNorm.Ptr, KCache: dc.k[l].Ptr, VCache: dc.v[l].Ptr,
			CacheLen: dc.cacheLen[l], Window: window, Rope: typeIndex(cfg.LayerTypes[l])}
	}
	encoded := kernels.EncodeTokenLayers(table)
	var loras []byte
	if sh.LoRARank > 0 {
		adapter := make([][7]kernels.TokenLoRA, cfg.Layers)
		for l := range adapter {
			for i, m := range trainer.AllModules {
				if A, ok := s.lora.slot(l, m, false); ok {
					B, _ := s.lora.slot(l, m, true)
					adapter[l][i] = kernels.TokenLoRA{A: s.lora.actPtr(s, A), B: s.lora.actPtr(s, B)}
				}
			}
		}
		loras = kernels.EncodeTokenLoRA(adapter)
	}
	var times int64 // none unless profiling
	if s.prof != nil {
		times = 8 * int64(s.k.TokenTimes(sh))
	}
	for _, b := range []struct {
		buf   *cuda.Buffer
		bytes int64
	}{{&ts.layers, int64(len(encoded))}, {&ts.work, sizes.Work}, {&ts.records, sizes.Records}, {&ts.sync, sizes.Sync}, {&ts.step, 2 * sizes.Step},
		{&ts.times, times}, {&ts.loras, int64(len(loras))}, {&ts.xa, sizes.XA}} {
		if b.bytes == 0 {
			continue
		}
		var err error
		if *b.buf, err = c.Alloc(b.bytes); err != nil {
			ts.free(c)
			return nil, err
		}
	}
	ts.stepBytes = sizes.Step
	var err error
	if ts.stepHost, err = c.AllocHost(2 * sizes.Step); err == nil {
		ts.bestHost, err = c.AllocHost(2 * 4)
	}
	for i := range ts.pickCopied {
		if err == nil {
			ts.pickCopied[i], err = c.NewEvent()
		}
	}
	if err != nil {
		ts.free(c)
		return nil, err
	}
	for _, u := range []struct {
		at  cuda.DevicePtr
		src []byte
	}{{ts.layers.Ptr, encoded}, {ts.loras.Ptr, loras}} {
		if len(u.src) == 0 {
			continue
		}
		if err := cuda.Upload(c, u.at, u.src); err != nil {
			ts.free(c)
			return nil, err
		}
	}
	if err := c.MemsetD8Async(ts.sync.Ptr, 0, sizes.Sync, nil); err != nil { // the heads' counters start at zero
		ts.free(c)
		return nil, err
	}
	return ts, nil
}

func (ts *tokenStep) free(c *cuda.Ctx) {
	for _, b := range []cuda.Buffer{ts.layers, ts.work, ts.records, ts.sync, ts.step, ts.times, ts.loras, ts.xa} {
		if b.Ptr != 0 {
			c.Free(b)
		}
	}
	for _, h := range []*cuda.HostBuffer{ts.stepHost, ts.bestHost} {
		if h != nil {
			c.FreeHost(h)
		}
	}
	for _, e := range ts.pickCopied {
		if e != nil {
			e.Destroy()
		}
	}
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
	return s.k.AttentionCached(c, lc.qr.Ptr, dc.k[l].Ptr, dc.v[l].Ptr, dc.seq.Ptr, dc.pos.Ptr, dc.part.Ptr, lc.att.Ptr, T, H, KV, dc.cacheLen[l], window, s.attnScale())
}

// decoder is a session used for decoding (trainer.Decoder).
type decoder struct {
	s           *session
	tokenSteps  int // the steps decode_token has run
	aheadMissed int // steps queued ahead whose token the loop did not feed
	// wholeLogits has sampling steps hand over every logit rather than
	// candidates (tests compare the two); candidateSteps counts the steps
	// that handed over candidates.
	wholeLogits    bool
	candidateSteps int
}

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
	lc := placeholderLoRA
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
		GradientCheckpointing: true, Inference: true, MaxTokens: DecodeTokens, Precision: precision})
	if err != nil {
		return nil, err
	}
	return newDecoder(s, a, cfg.Adapter == "")
}

// placeholderLoRA is the adapter shape of a decoder without an adapter:
// a session needs one, and baseOnly skips its products.
var placeholderLoRA = trainer.LoRAConfig{R: 1, Alpha: 1, Targets: []trainer.Module{trainer.QProj}}

// newDecoder gives session s the adapter a and makes it a decoder, its
// NF4 weights also stored dequantised where the device has the room, and
// each layer's dense k and v, gate and up weights side by side.
func newDecoder(s trainer.Session, a *trainer.Adapter, baseOnly bool) (trainer.Decoder, error) {
	if err := s.SetState(a, nil); err != nil {
		s.Close()
		return nil, err
	}
	ss := s.(*session)
	ss.baseOnly = baseOnly
	if err := ss.dev.Do(func(c *cuda.Ctx) error { return ss.lora.keepResident(ss, c) }); err != nil {
		s.Close()
		return nil, fmt.Errorf("gpu: the adapter's weights for decoding: %w", err)
	}
	if err := ss.dev.Do(ss.densify); err != nil {
		s.Close()
		return nil, fmt.Errorf("gpu: storing the NF4 weights dequantised for decoding: %w", err)
	}
	if err := ss.dev.Do(ss.adjoin); err != nil {
		s.Close()
		return nil, fmt.Errorf("gpu: laying out the weights for decoding: %w", err)
	}
	if err := ss.dev.Do(ss.tileNF4); err != nil {
		s.Close()
		return nil, fmt.Errorf("gpu: the NF4 weights in decoding order: %w", err)
	}
	return &decoder{s: ss}, nil
}

// ReadsNF4 reports whether a decoding step of batch sequences reads the
// frozen weights in their NF4 form (directly, or dequantised at every step
// where the device had no room for them dense) rather than dense ones.
func (g *decoder) ReadsNF4(batch int) bool {
	for _, l := range g.s.w.layers {
		for i := range l.proj {
			if p := &l.proj[i]; !g.s.nf4GEMV(batch, p) && p.dense.Ptr != 0 {
				return false
			}
		}
	}
	return true
}

// OpenRandomDecoder makes a decoder of shape mc with random weights (as
// OpenRandom does), with adapter a where it is not nil, for measuring
// decoding speed without a checkpoint on disk; quantize is "nf4" or
// "none".
func OpenRandomDecoder(ctx context.Context, mc *trainer.Config, seed uint64, quantize string, a *trainer.Adapter) (trainer.Decoder, error) {
	return openRandomDecoder(ctx, mc, seed, quantize, "", a)
}

// openRandomDecoder is OpenRandomDecoder in a session of the given
// precision ("" is bf16), applying adapter a where it is not nil: the same
// seed gives the same weights in each.
func openRandomDecoder(ctx context.Context, mc *trainer.Config, seed uint64, quantize, precision string, a *trainer.Adapter) (trainer.Decoder, error) {
	if err := (backend{}).Usable(); err != nil {
		return nil, err
	}
	baseOnly := a == nil
	if baseOnly {
		var err error
		if a, err = trainer.NewAdapter(mc, placeholderLoRA, 0); err != nil {
			return nil, err
		}
	}
	s, err := OpenRandom(ctx, mc, seed, 0.02, trainer.SessionConfig{Quantize: quantize, LoRA: a.Config,
		GradientCheckpointing: true, Inference: true, MaxTokens: DecodeTokens, Precision: precision})
	if err != nil {
		return nil, err
	}
	return newDecoder(s, a, baseOnly)
}

func (g *decoder) Info() *trainer.ModelInfo { return &g.s.info }

// TokenKernelSteps is the number of steps decode_token has run.
func (g *decoder) TokenKernelSteps() int { return g.tokenSteps }
func (g *decoder) Close() error          { return g.s.Close() }

func (g *decoder) Generate(ctx context.Context, prompts [][]int32, o trainer.GenerateOptions, emit func(seq int, tok int32)) (out [][]int32, err error) {
	topK := 0
	if o.Temperature != 0 && !g.wholeLogits {
		topK = o.TopK
	}
	err = g.withCaches(prompts, o.MaxNewTokens, topK, func(step trainer.DecodeStep) error {
		out, err = trainer.DecodeLoop(ctx, g.s.info.Config, prompts, o, emit, step)
		return err
	})
	return out, err
}

// withCaches allocates the key/value caches for prompts and up to maxNew
// tokens after each (and, with topK, room for sampling's candidates), and
// runs decode with the step that evaluates tokens against them: the first
// call the prompts themselves, later calls the sequences' next tokens.
func (g *decoder) withCaches(prompts [][]int32, maxNew, topK int, decode func(trainer.DecodeStep) error) error {
	s, cfg := g.s, g.s.info.Config
	total, longest := 0, 0
	for _, p := range prompts {
		total, longest = total+len(p), max(longest, len(p))
	}
	if total > s.ws.T {
		return fmt.Errorf("gpu: %d prompt tokens at once; the decoder takes %d (fewer prompts at a time)", total, s.ws.T)
	}
	maxLen := min(longest+maxNew, cfg.MaxPositions)
	dc := &kvCaches{prefill: true, maxLen: maxLen, graphs: map[int]*cuda.Graph{}}
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
		for _, b := range []*cuda.Buffer{&dc.seq, &dc.pos, &dc.from[0], &dc.from[1], &dc.best} {
			if *b, err = c.Alloc(4 * int64(s.ws.T)); err != nil {
				return err
			}
		}
		if err := c.MemsetD8Async(dc.from[1].Ptr, 0, 4*int64(s.ws.T), nil); err != nil {
			return err
		}
		// A step after the prompts has a token per sequence; global layers
		// attend to the most keys.
		size := s.k.CachedAttentionBytes(len(prompts), cfg.Heads, maxLen, 0)
		if dc.part, err = c.Alloc(size); err != nil {
			return err
		}
		if err := c.MemsetD8Async(dc.part.Ptr, 0, size, nil); err != nil { // its counters start at zero
			return err
		}
		if _, chunks := kernels.TopChunking(cfg.VocabSize); topK > 0 && topK <= chunks {
			if dc.topMaxima, err = c.Alloc(4 * int64(len(prompts)) * kernels.TopChunks); err != nil {
				return err
			}
			if dc.topRecords, err = c.Alloc(4 * int64(len(prompts)) * int64(kernels.TopRecordWords(topCapacity))); err != nil {
				return err
			}
		}
		if os.Getenv(TokenKernelEnv) == "off" {
			return nil
		}
		sh, err := s.tokenShape(maxLen)
		if err == nil {
			err = s.k.TokenResident(sh)
		}
		if err != nil {
			return nil // the launch-per-operation steps
		}
		dc.tok, err = s.newTokenStep(c, dc, sh)
		return err
	})
	defer s.dev.Do(func(c *cuda.Ctx) error {
		c.Stream().Synchronize() // a greedy decoding's step queued ahead may still run
		for _, b := range append(append(dc.k, dc.v...), dc.seq, dc.pos, dc.from[0], dc.from[1], dc.best, dc.part, dc.topMaxima, dc.topRecords) {
			if b.Ptr != 0 {
				c.Free(b)
			}
		}
		if dc.tok != nil {
			dc.tok.free(c)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("gpu: the decoding caches: %w", err)
	}
	s.dec = dc
	defer func() { s.dec = nil }()
	defer dc.destroyGraphs(s)
	// Nothing is allocated or freed between the steps: the memory in use
	// after the last (graphs and caches still held) is the decoding's
	// peak. A reading each step would cost more than a small model's step.
	defer s.notePeak()
	window := min(cfg.SlidingWindow, maxLen)
	return decode(func(ids, pos []int32, seqOf []int, want trainer.StepWant) (trainer.StepResult, error) {
		b, seq, from := decodeBatch(ids, pos, seqOf, window)
		return g.step(dc, b, seq, from, want)
	})
}

// step evaluates one decoding step laid out by decodeBatch and returns for
// each sequence's last token what want asks for (handOver). The first step
// (the prompts) runs as a forward pass; a later step runs as a CUDA graph
// captured the second time its number of tokens comes up (the first warms
// the GEMM plans), so that a token costs one launch instead of hundreds.
func (g *decoder) step(dc *kvCaches, b *trainer.Batch, seq, from []int32, want trainer.StepWant) (trainer.StepResult, error) {
	s := g.s
	hb, err := s.prepare(b)
	if err != nil {
		return trainer.StepResult{}, err
	}
	T, n := hb.T, len(hb.idx)
	defer func() { dc.prefill = false }()
	if dc.tok != nil && !dc.prefill && T == 1 { // profiled too: it reads its own clock
		return g.stepToken(dc, hb, seq[0], b.Pos[0], want)
	}
	if s.off != nil || s.prof != nil || n > s.ws.chunk {
		// Layouts the captured step does not cover: the training pass.
		if err := s.dev.Do(func(c *cuda.Ctx) error { return dc.upload(c, seq, b.Pos, from) }); err != nil {
			return trainer.StepResult{}, err
		}
		logits, err := s.positionLogits(hb)
		return trainer.StepResult{Logits: logits}, err
	}
	var res trainer.StepResult
	err = s.dev.Do(func(c *cuda.Ctx) error {
		up := s.uploadTokens
		if dc.prefill {
			up = s.upload
		}
		if err := up(c, hb); err != nil {
			return err
		}
		if err := dc.upload(c, seq, b.Pos, from); err != nil {
			return err
		}
		gr, seen := dc.graphs[T]
		if !dc.prefill {
			if seen && gr == nil {
				if gr, err = c.CaptureWorking(func() error { return s.decodeForward(c, T, n, dc.best.Ptr) }); err != nil {
					return fmt.Errorf("gpu: capturing a decoding step: %w", err)
				}
			}
			dc.graphs[T] = gr
		}
		if gr != nil {
			err = gr.Launch(nil)
		} else {
			err = s.decodeForward(c, T, n, dc.best.Ptr)
		}
		if err != nil {
			return err
		}
		res, err = g.handOver(c, dc, n, want)
		return err
	})
	return res, err
}

// handOver downloads what want asks of a step's n rows of logits (in
// ws.logits; their most likely tokens in dc.best): with Greedy the most
// likely tokens; with TopK each row's candidates (kernels.TopCandidates),
// where the decoding has room for them (withCaches made it for this top k)
// and no row has more than topCapacity; else the logits, 1 MB a row at
// Gemma's vocabulary, which the host then searches for the top k.
func (g *decoder) handOver(c *cuda.Ctx, dc *kvCaches, n int, want trainer.StepWant) (trainer.StepResult, error) {
	s := g.s
	if want.Greedy {
		best := make([]int32, n)
		err := cuda.Download(c, best, dc.best.Ptr)
		return trainer.StepResult{Best: best}, err
	}
	V := s.info.Config.VocabSize
	if dc.topRecords.Ptr != 0 && want.TopK > 0 {
		if err := s.k.TopCandidates(c, s.ws.logits.Ptr, n, V, want.TopK, dc.topMaxima.Ptr, topCapacity, dc.topRecords.Ptr); err != nil {
			return trainer.StepResult{}, err
		}
		words := kernels.TopRecordWords(topCapacity)
		recs := make([]uint32, n*words)
		if err := cuda.Download(c, recs, dc.topRecords.Ptr); err != nil {
			return trainer.StepResult{}, err
		}
		cands := make([]trainer.Candidates, n)
		for r := range cands {
			rec := recs[r*words : (r+1)*words]
			count := int(rec[0])
			if count > topCapacity {
				cands = nil
				break
			}
			ids, vals := rec[2:2+count], rec[2+topCapacity:2+topCapacity+count]
			cands[r] = trainer.Candidates{IDs: make([]int32, count), Logits: make([]float32, count)}
			for i := range count {
				cands[r].IDs[i], cands[r].Logits[i] = int32(ids[i]), math.Float32frombits(vals[i])
			}
		}
		if cands != nil {
			g.candidateSteps++
			return trainer.StepResult{Candidates: cands}, nil
		}
	}
	logits, err := s.downloadLogits(c, n)
	return trainer.StepResult{Logits: logits}, err
}

// stepToken evaluates a step of one token, sequence seq's at position pos,
// with decode_token: the step's record, the launch (the lm_head and the
// pick included), and what want asks for back (handOver).
//
// A greedy step's token is the one the step before picked, and that pick
// is on the device before the host has it: so a greedy step also queues
// the next position's launch, its token read from the pick, before it
// waits for its own. The host's part of a step (the call, the record's
// copy, the launch, the pick's copy back: ~50 µs a token) then overlaps
// the next step's run on the device; on an H200 that gained 1.4% at 1B
// NF4 and 0.5% at 12B NF4 (trainer/gpu/NOTES.md, "The next greedy step
// queued"). A decoding that stops at a stop token leaves one step run for
// nothing; none is queued past the last step (maxLen).
func (g *decoder) stepToken(dc *kvCaches, hb *hostBatch, seq, pos int32, want trainer.StepWant) (trainer.StepResult, error) {
	s, ts := g.s, dc.tok
	profiling := s.prof != nil
	ahead := want.Greedy && !profiling && int(pos)+2 < dc.maxLen // the decoding goes on past pos+1
	var nextCos, nextSin [2][]float32
	if ahead {
		nextCos, nextSin = s.ropeAt(pos + 1)
	}
	var res trainer.StepResult
	var host hostClock
	host.start(profiling)
	err := s.dev.Do(func(c *cuda.Ctx) error {
		host.lap(hostCall)
		q := ts.ahead
		ts.ahead = nil
		if q != nil && (q.seq != seq || q.pos != pos || q.id != hb.ids[0]) {
			// Not the step queued ahead: this one runs after it (and
			// rewrites any cache rows it wrote), once its slot is free.
			if err := ts.pickCopied[q.slot].Synchronize(); err != nil {
				return err
			}
			q = nil
			g.aheadMissed++
		}
		if q == nil {
			var err error
			if q, err = g.launchToken(c, dc, hb.ids[0], seq, pos, false, hb.cos, hb.sin, want.Greedy, &host); err != nil {
				return err
			}
		}
		if ahead {
			next, err := g.launchToken(c, dc, 0, seq, pos+1, true, nextCos, nextSin, true, &host)
			if err != nil {
				return err
			}
			ts.ahead = next
		}
		if host.on { // else the download waits
			if err := c.Stream().Synchronize(); err != nil {
				return err
			}
			host.lap(hostWait)
		}
		g.tokenSteps++
		var err error
		if want.Greedy {
			if err = ts.pickCopied[q.slot].Synchronize(); err == nil {
				pick := int32(binary.LittleEndian.Uint32(ts.bestHost.Bytes[4*q.slot:]))
				res = trainer.StepResult{Best: []int32{pick}}
				if ts.ahead != nil {
					ts.ahead.id = pick
				}
			}
		} else {
			res, err = g.handOver(c, dc, 1, want)
		}
		host.lap(hostDownload)
		if err != nil || ts.times.Ptr == 0 {
			return err
		}
		t := make([]uint64, s.k.TokenTimes(ts.shape))
		if err := cuda.Download(c, t, ts.times.Ptr); err != nil {
			return err
		}
		s.prof.token.add(t, s.dev.Info.SMs)
		return nil
	})
	if s.prof != nil {
		s.prof.token.addHost(&host)
	}
	return res, err
}

// launchToken queues decode_token for sequence seq's token id (or, with
// fromPick, the token the launch before picked) at position pos, whose
// rotary tables are cos and sin, in the next slot: the record's copy, the
// launch, and with copyPick the pick's copy back, which
// ts.pickCopied[slot] marks. host times the copy and the launch.
func (g *decoder) launchToken(c *cuda.Ctx, dc *kvCaches, id, seq, pos int32, fromPick bool, cos, sin [2][]float32, copyPick bool, host *hostClock) (*queuedToken, error) {
	s, ts := g.s, dc.tok
	slot := ts.launches % 2
	ts.launches++
	rec := ts.stepHost.Sub(int64(slot)*ts.stepBytes, ts.stepBytes)
	for i, w := range kernels.EncodeTokenStep(id, seq, pos, fromPick, cos, sin) {
		binary.LittleEndian.PutUint32(rec.Bytes[4*i:], w)
	}
	step := ts.step.Ptr.Add(int64(slot) * ts.stepBytes)
	if err := c.CopyHtoDAsync(step, rec, nil); err != nil {
		return nil, err
	}
	host.lap(hostUpload)
	if err := s.k.DecodeToken(c, ts.shape, ts.layers.Ptr, s.w.embed.Ptr, s.w.finalNorm.Ptr, step, ts.work.Ptr,
		ts.records.Ptr, ts.sync.Ptr, s.ws.xf.Ptr, s.ws.logits.Ptr, dc.best.Ptr, ts.times.Ptr, ts.loras.Ptr, ts.xa.Ptr); err != nil {
		return nil, err
	}
	host.lap(hostLaunch)
	if copyPick {
		if err := c.CopyDtoHAsync(ts.bestHost.Sub(4*int64(slot), 4), dc.best.Ptr, nil); err != nil {
			return nil, err
		}
		if err := ts.pickCopied[slot].Record(nil); err != nil {
			return nil, err
		}
	}
	return &queuedToken{seq: seq, pos: pos, id: id, slot: slot}, nil
}

// ropeAt returns the rotary tables of position pos for each layer type,
// as prepare lays them out for a token there.
func (s *session) ropeAt(pos int32) (cos, sin [2][]float32) {
	half := s.info.Config.HeadDim / 2
	for ti, lt := range layerTypes {
		c, sn := s.ropeTables(lt, []int32{pos})
		cos[ti], sin[ti] = c[int(pos)*half:int(pos+1)*half], sn[int(pos)*half:int(pos+1)*half]
	}
	return cos, sin
}

// decodeForward queues the forward pass of the uploaded step's T tokens,
// the lm_head at its n rows with a target into ws.logits, and each row's
// most likely token into best; it waits for nothing, so that it can be
// captured.
func (s *session) decodeForward(c *cuda.Ctx, T, n int, best cuda.DevicePtr) error {
	ws := s.ws
	if _, err := s.forwardBlocks(c, T, func(i int) cuda.DevicePtr { return ws.inputs[i].Ptr }, nil, false); err != nil {
		return err
	}
	if err := s.headLogits(c, ws.idx.Ptr, n); err != nil {
		return err
	}
	return s.k.ArgmaxRows(c, ws.logits.Ptr, n, s.info.Config.VocabSize, best)
}

// upload copies a step's sequences, positions and the first position
// sliding layers store (global layers store every position: their from
// stays zero).
func (dc *kvCaches) upload(c *cuda.Ctx, seq, pos, from []int32) error {
	for _, u := range []struct {
		dst cuda.DevicePtr
		src []int32
	}{{dc.seq.Ptr, seq}, {dc.pos.Ptr, pos}, {dc.from[0].Ptr, from}} {
		if err := cuda.Upload(c, u.dst, u.src); err != nil {
			return err
		}
	}
	return nil
}

// destroyGraphs releases the decoding's captured steps.
func (dc *kvCaches) destroyGraphs(s *session) {
	s.dev.Do(func(c *cuda.Ctx) error {
		for _, gr := range dc.graphs {
			if gr != nil {
				gr.Destroy()
			}
		}
		return nil
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

// PeakMemory is the most device memory the decoder's process has held.
func (g *decoder) PeakMemory() int64 { return g.s.PeakMemory() }
