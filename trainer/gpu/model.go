package gpu

import (
	"errors"
	"fmt"
	"math"

	"gemmaft/cuda"
	"gemmaft/trainer"
	"gemmaft/trainer/gpu/kernels"
)

// The Gemma 3 step on the device, the CPU reference's runner (trainer's
// model_cpu.go) operation for operation. Activations ("act") are the
// kernel set's precision; gradients that sum several contributions are
// float32.

// layerCache holds one block's activations between its forward pass and
// its backward pass.
type layerCache struct {
	xn1, q, k, v, qr, kr, att, o, x1, xn2, gate, up, act, d cuda.Buffer // activations
	rstd1, rstdQ, rstdK, lse, rstd2, rstd3, rstd4           cuda.Buffer // float32
	// xa[m] is projection m's x·Aᵀ, act [T × r]: in xaBuf[m], or with
	// gradient checkpointing in the block's saved input (bindSaved), as
	// are d and rstd4 then.
	xa    [7]cuda.DevicePtr
	xaBuf [7]cuda.Buffer
	// recompute: the block runs again from its saved input (gradient
	// checkpointing), where its forward pass left xa, d and rstd4.
	recompute bool
	// mask records which inputs of each projection dropout kept in the
	// forward pass, for the backward pass (kernels.DropoutRecord).
	mask [7]cuda.Buffer
	// kv holds k then v, gateUp gate then up: one allocation a pair, so
	// that linearPair can compute a pair in one batched GEMM.
	kv, gateUp cuda.Buffer
}

// halves splits b into its two halves.
func halves(b cuda.Buffer) (cuda.Buffer, cuda.Buffer) {
	n := b.Size / 2
	return cuda.Buffer{Ptr: b.Ptr, Size: n}, cuda.Buffer{Ptr: b.Ptr.Add(n), Size: n}
}

// workspace is every activation buffer, sized for the session's largest
// micro-batch (T tokens).
type workspace struct {
	T      int
	chunk  int           // tokens of the lm_head's cross-entropy chunk
	inputs []cuda.Buffer // inputs[l] is block l's input; inputs[L] the last block's output
	// With gradient checkpointing, an input buffer also holds what the
	// block's forward pass saves for its recomputation and backward pass:
	// the o and down projections' outputs at oAt and dAt and the down
	// projection's norm's rstd at rstdAt, each adapted projection's x·Aᵀ at
	// xaAt[m] (bytes in; 0: none). The recomputation then skips the o
	// projection and stops before the down projection (GEMMs whose outputs
	// are only T × hidden, as the input is), and draws no dropout nor
	// multiplies by A (x·Aᵀ is T × r).
	oAt, dAt, rstdAt int64
	xaAt             [7]int64
	caches           []layerCache // one with gradient checkpointing, one per block without

	dout, dx1, dxn cuda.Buffer // float32 [T × hidden]
	dd             cuda.Buffer // act [T × hidden]
	dact           cuda.Buffer // float32 [T × intermediate]
	datt, dqr      cuda.Buffer // float32 [T × heads·head_dim]
	dkr, dvr       cuda.Buffer // float32 [T × kv_heads·head_dim]
	dqkv           cuda.Buffer // act [T × (heads + 2·kv_heads)·head_dim]: q's, k's and v's gradients side by side (qkvGrad)
	delta          cuda.Buffer // float32 [T × heads]
	dxa            cuda.Buffer // act [kernels.LoRAGradParts × T × r]: a slot for each projection of a group
	loraPart       cuda.Buffer // float32: kernels.LoRAFew's partial sums (sessions that infer with an adapter)
	// xin holds dropout's output (act [T × widest projection input]) and
	// wbuf, the same memory, dequantised NF4 weights (act [largest
	// projection]): each is read by the GEMM queued right after it is
	// written, and never while the other is (the stream orders them), so
	// one buffer of the larger size serves both.
	xin, wbuf cuda.Buffer
	// kept holds q's, k's, v's, gate's and up's dequantised weights one
	// under the other (keptAt[m]: module m's byte offset; -1: not kept)
	// from a block's recomputation through its backward pass
	// (MemoryPlan.KeptWeights); keptLayer is the block whose recomputation
	// wrote them last (-1: none since the pass began).
	kept      cuda.Buffer
	keptAt    [7]int64
	keptLD    [7]int // the row stride of a kept weight (its width, or foldLD)
	keptLayer int
	// fold: gate's and up's LoRA B products go into their frozen GEMM
	// along K (foldedPair); foldA [T × foldLD] holds its A, xn2 beside the
	// two x·Aᵀ, and foldLD = hidden + 2r is the rows' stride there and in
	// the widened weights.
	fold          bool
	foldA         cuda.Buffer
	foldLD        int
	xf, rstdF     cuda.Buffer
	hc, dhc, dxf  cuda.Buffer
	logits, glog  cuda.Buffer
	rowLoss       cuda.Buffer // float64 [T + 1]
	ids, idx, tgt cuda.Buffer // int32 [T]
	lo, hi        [2]cuda.Buffer
	cos, sin      [2]cuda.Buffer
}

// Layer types by index: sliding-window layers first, then global ones.
var layerTypes = [2]trainer.LayerType{trainer.SlidingAttention, trainer.FullAttention}

func typeIndex(lt trainer.LayerType) int {
	if lt == trainer.FullAttention {
		return 1
	}
	return 0
}

// lossChunkBytes bounds the logits of one cross-entropy chunk (float32
// logits plus their gradient as activations).
const lossChunkBytes = 768 << 20

// bufSpec is one buffer of a layout: where it goes, its size and what it
// is for (the memory plan's groups).
type bufSpec struct {
	buf   *cuda.Buffer
	bytes int64
	group string
}

// Memory plan groups.
const (
	groupSaved = "saved layer inputs"
	groupLayer = "layer activations"
	groupWork  = "backward and loss buffers"
	// The lm_head's cross-entropy chunk is used only between the forward
	// and the backward pass through the blocks, and the blocks' backward
	// temporaries only inside a block: the two groups share one region.
	groupLoss    = "loss chunk (shared)"
	groupScratch = "block temporaries (shared)"
	// Within a block's backward pass, the MLP's gradient temporaries are
	// done with before the attention's are first written (layerBackward):
	// the two groups share the space after groupScratch's.
	groupMLPGrad  = "MLP gradients (shared)"
	groupAttnGrad = "attention gradients (shared)"
)

// sharedRegion lays the buffers of groupLoss and of groupScratch over one
// region, each group's buffers one after the other from its start, and
// those of groupMLPGrad and groupAttnGrad both from the end of
// groupScratch's. It returns each such buffer's offset and the region's
// size.
func sharedRegion(specs []bufSpec) (map[*cuda.Buffer]int64, int64) {
	var scratch int64
	for _, b := range specs {
		if b.group == groupScratch {
			scratch += cuda.AllocSize(b.bytes)
		}
	}
	start := map[string]int64{groupLoss: 0, groupScratch: 0, groupMLPGrad: scratch, groupAttnGrad: scratch}
	off := map[*cuda.Buffer]int64{}
	var size int64
	for _, b := range specs {
		at, ok := start[b.group]
		if !ok {
			continue
		}
		off[b.buf] = at
		start[b.group] = at + cuda.AllocSize(b.bytes)
		size = max(size, start[b.group])
	}
	return off, size
}

// layoutWorkspace lays out the workspace for T tokens: the buffers
// allocWorkspace allocates and Plan counts.
// With offload, three slots stand for the saved inputs (see offloader).
// With keep, the recomputation's weights have buffers of their own (kept).
func layoutWorkspace(cfg *trainer.Config, sc trainer.SessionConfig, act int64, T int, offload, keep bool) (*workspace, []bufSpec) {
	Hd, I, H, KV, D, V, R := int64(cfg.Hidden), int64(cfg.Intermediate), int64(cfg.Heads), int64(cfg.KVHeads), int64(cfg.HeadDim), int64(cfg.VocabSize), int64(sc.LoRA.R)
	t := int64(T)
	ws := &workspace{T: T, keptLayer: -1}
	ws.chunk = int(max(1, min(t, lossChunkBytes/(V*(4+act)))))
	C := int64(ws.chunk)
	var specs []bufSpec
	add := func(group string, n int64, bufs ...*cuda.Buffer) {
		for _, b := range bufs {
			specs = append(specs, bufSpec{b, max(n, 1), group})
		}
	}
	ws.inputs = make([]cuda.Buffer, cfg.Layers+1)
	if offload {
		ws.inputs = make([]cuda.Buffer, offloadSlots)
	}
	saved := t * Hd * act
	ckpt := sc.GradientCheckpointing
	if ckpt && !sc.Inference {
		next := func(n int64) int64 {
			at := (saved + 255) / 256 * 256
			saved = at + n
			return at
		}
		ws.oAt, ws.dAt, ws.rstdAt = next(t*Hd*act), next(t*Hd*act), next(4*t)
		for _, m := range sc.LoRA.Targets {
			ws.xaAt[moduleIndex(m)] = next(t * R * act)
		}
	}
	for i := range ws.inputs {
		add(groupSaved, saved, &ws.inputs[i])
	}
	caches := 1
	if !sc.GradientCheckpointing {
		caches = cfg.Layers
	}
	ws.caches = make([]layerCache, caches)
	for i := range ws.caches {
		lc := &ws.caches[i]
		add(groupLayer, t*Hd*act, &lc.xn1, &lc.x1, &lc.xn2)
		add(groupLayer, t*H*D*act, &lc.q, &lc.qr, &lc.att)
		add(groupLayer, t*KV*D*act, &lc.kr)
		add(groupLayer, 2*t*KV*D*act, &lc.kv)
		add(groupLayer, t*I*act, &lc.act)
		add(groupLayer, 2*t*I*act, &lc.gateUp)
		add(groupLayer, 4*t, &lc.rstd1, &lc.rstd2, &lc.rstd3)
		if ws.dAt == 0 {
			add(groupLayer, t*Hd*act, &lc.o, &lc.d)
			add(groupLayer, 4*t, &lc.rstd4)
		}
		add(groupLayer, 4*t*H, &lc.rstdQ, &lc.lse)
		add(groupLayer, 4*t*KV, &lc.rstdK)
		for _, m := range sc.LoRA.Targets {
			if !ckpt || sc.Inference {
				add(groupLayer, t*R*act, &lc.xaBuf[moduleIndex(m)])
			}
			if sc.LoRA.Dropout > 0 && !sc.Inference {
				_, in := cfg.ProjShape(m)
				add(groupLayer, kernels.MaskBytes(t*int64(in)), &lc.mask[moduleIndex(m)])
			}
		}
	}
	maxIn, maxW := int64(0), int64(0)
	for _, m := range trainer.AllModules {
		out, in := cfg.ProjShape(m)
		maxIn, maxW = max(maxIn, int64(in)), max(maxW, int64(out)*int64(in))
	}
	// dout runs through the whole backward pass, dxf from the loss chunk
	// into it, xf from the final norm into the loss chunk.
	add(groupWork, 4*t*Hd, &ws.dout, &ws.dxf)
	add(groupWork, t*Hd*act, &ws.xf)
	// The low-memory layout (offload) also lays the loss chunk and the
	// block temporaries over one region.
	scratch, loss, mlpGrad, attnGrad := groupWork, groupWork, groupWork, groupWork
	if offload {
		scratch, loss, mlpGrad, attnGrad = groupScratch, groupLoss, groupMLPGrad, groupAttnGrad
	}
	add(scratch, 4*t*Hd, &ws.dx1, &ws.dxn)
	add(scratch, t*Hd*act, &ws.dd)
	add(mlpGrad, 4*t*I, &ws.dact)
	add(attnGrad, 4*t*H*D, &ws.datt, &ws.dqr)
	add(attnGrad, 4*t*KV*D, &ws.dkr, &ws.dvr)
	add(attnGrad, t*(H+2*KV)*D*act, &ws.dqkv)
	add(attnGrad, 4*t*H, &ws.delta)
	add(scratch, kernels.LoRAGradParts*t*R*act, &ws.dxa) // a slot for each projection of a group (inputBackward)
	add(scratch, max(t*maxIn, maxW)*act, &ws.xin)        // and wbuf
	if sc.Inference && len(sc.LoRA.Targets) > 0 {
		add(groupWork, kernels.LoRAFewPartBytes(int(maxIn), int(R)), &ws.loraPart)
	}
	// The folded pair's weights, both widened, must fit that scratch.
	gateOut, gateIn := cfg.ProjShape(trainer.GateProj)
	ws.foldLD = gateIn + 2*sc.LoRA.R
	ws.fold = foldsGateUp(sc) && 2*int64(gateOut)*int64(ws.foldLD) <= max(t*maxIn, maxW) && gateIn%8 == 0 && ws.foldLD%8 == 0
	if ws.fold {
		add(scratch, t*int64(ws.foldLD)*act, &ws.foldA)
	}
	// kept lives from a block's recomputation to the end of its backward
	// pass, as the block temporaries do; its weights lie one under the
	// other with no gap, so that k's and v's make linearPair's pair and
	// q's, k's and v's stackedBackward's stack.
	var kept int64
	for i, m := range trainer.AllModules {
		ws.keptAt[i] = -1
		if keep && m != trainer.OProj && m != trainer.DownProj { // the recomputation's products (o's output is saved, down is not run)
			out, in := cfg.ProjShape(m)
			ws.keptAt[i], ws.keptLD[i] = kept, in
			if ws.fold && (m == trainer.GateProj || m == trainer.UpProj) {
				ws.keptLD[i] = ws.foldLD
			}
			kept += int64(out) * int64(ws.keptLD[i]) * act
		}
	}
	if kept > 0 {
		add(scratch, kept, &ws.kept)
	}
	add(loss, C*Hd*act, &ws.hc)
	add(loss, 4*C*Hd, &ws.dhc)
	add(loss, 4*C*V, &ws.logits)
	add(loss, C*V*act, &ws.glog)
	add(groupWork, 8*(t+1), &ws.rowLoss)
	add(groupWork, 4*t, &ws.rstdF, &ws.ids, &ws.idx, &ws.tgt, &ws.lo[0], &ws.lo[1], &ws.hi[0], &ws.hi[1])
	add(groupWork, 4*t*D/2, &ws.cos[0], &ws.cos[1], &ws.sin[0], &ws.sin[1])
	return ws, specs
}

// allocWorkspace allocates the workspace for T tokens.
func (s *session) allocWorkspace(c *cuda.Ctx, T int) error {
	cfg := s.info.Config
	ws, specs := layoutWorkspace(cfg, s.cfg, s.k.Prec.Size(), T, s.plan.Offload, s.plan.KeptWeights)
	offsets, size := sharedRegion(specs)
	var shared cuda.Buffer
	if size > 0 {
		var err error
		if shared, err = s.alloc(c, size, groupLoss+" and "+groupScratch); err != nil {
			return err
		}
	}
	for _, b := range specs {
		if o, ok := offsets[b.buf]; ok {
			*b.buf = cuda.Buffer{Ptr: shared.Ptr.Add(o), Size: b.bytes}
			continue
		}
		var err error
		if *b.buf, err = s.alloc(c, b.bytes, b.group); err != nil {
			return err
		}
	}
	for i := range ws.caches {
		lc := &ws.caches[i]
		lc.k, lc.v = halves(lc.kv)
		lc.gate, lc.up = halves(lc.gateUp)
	}
	ws.wbuf = ws.xin
	s.ws = ws
	if s.plan.Offload {
		var err error
		s.off, err = newOffloader(c, cfg.Layers, [offloadSlots]cuda.Buffer(ws.inputs), ws.inputs[0].Size)
		return err
	}
	return nil
}

// hostBatch is a batch laid out for the device.
type hostBatch struct {
	T         int
	ids       []int32
	idx, tgt  []int32 // trained positions and their targets
	lo, hi    [2][]int32
	cos, sin  [2][]float32
	trainedOK bool
}

// prepare lays out b: token ids, the trained positions, each layer type's
// attention spans and rotary tables.
func (s *session) prepare(b *trainer.Batch) (*hostBatch, error) {
	cfg := s.info.Config
	T := len(b.IDs)
	if T == 0 {
		return nil, fmt.Errorf("empty batch")
	}
	if T > s.ws.T {
		return nil, fmt.Errorf("batch of %d tokens exceeds the %d the session was sized for (SessionConfig.MaxTokens)", T, s.ws.T)
	}
	hb := &hostBatch{T: T, ids: b.IDs}
	for i, id := range b.IDs {
		if id < 0 || int(id) >= cfg.VocabSize {
			return nil, fmt.Errorf("token %d: id %d outside the model's vocabulary [0, %d): were the rows tokenized with another model's tokenizer?", i, id, cfg.VocabSize)
		}
		if b.Pos[i] < 0 {
			return nil, fmt.Errorf("token %d: negative position %d", i, b.Pos[i])
		}
		if t := b.Targets[i]; t != trainer.IgnoreIndex {
			if t < 0 || int(t) >= cfg.VocabSize {
				return nil, fmt.Errorf("token %d: label %d outside the model's vocabulary [0, %d): were the rows tokenized with another model's tokenizer?", i, t, cfg.VocabSize)
			}
			hb.idx = append(hb.idx, int32(i))
			hb.tgt = append(hb.tgt, t)
		}
	}
	half := cfg.HeadDim / 2
	for ti, lt := range layerTypes {
		w := 0
		if lt == trainer.SlidingAttention {
			w = cfg.SlidingWindow
		}
		hb.lo[ti] = trainer.AttentionSpans(b.SegStart, w)
		hb.hi[ti] = lastQueries(hb.lo[ti])
		cosTab, sinTab := s.ropeTables(lt, b.Pos)
		hb.cos[ti], hb.sin[ti] = make([]float32, T*half), make([]float32, T*half)
		for t, p := range b.Pos {
			copy(hb.cos[ti][t*half:(t+1)*half], cosTab[int(p)*half:(int(p)+1)*half])
			copy(hb.sin[ti][t*half:(t+1)*half], sinTab[int(p)*half:(int(p)+1)*half])
		}
	}
	return hb, nil
}

// lastQueries returns, for each key j, the last query i with lo[i] <= j
// (lo never decreases, and lo[i] <= i).
func lastQueries(lo []int32) []int32 {
	hi := make([]int32, len(lo))
	i := 0
	for j := range hi {
		for i+1 < len(lo) && int(lo[i+1]) <= j {
			i++
		}
		hi[j] = int32(max(i, j))
	}
	return hi
}

// ropeTables returns a layer type's cos and sin for positions 0 .. the
// largest of pos, extending the cached tables as needed: by the new
// positions only, as a decoding asks for one more each step. The values
// are trainer.RopeTables', so both backends rotate by the same float32
// angles.
func (s *session) ropeTables(lt trainer.LayerType, pos []int32) (cos, sin []float32) {
	half := s.info.Config.HeadDim / 2
	need := 0
	for _, p := range pos {
		need = max(need, int(p)+1)
	}
	ti := typeIndex(lt)
	if have := len(s.ropeCos[ti]) / half; have < need {
		more := make([]int32, need-have)
		for i := range more {
			more[i] = int32(have + i)
		}
		if s.ropeInv[ti] == nil {
			s.ropeInv[ti] = trainer.RopeInvFreq(s.info.Config.Rope[lt], s.info.Config.HeadDim)
		}
		c, sn := trainer.RopeTables(more, s.ropeInv[ti])
		s.ropeCos[ti], s.ropeSin[ti] = append(s.ropeCos[ti], c...), append(s.ropeSin[ti], sn...)
	}
	return s.ropeCos[ti], s.ropeSin[ti]
}

// upload copies the batch to the workspace.
func (s *session) upload(c *cuda.Ctx, hb *hostBatch) error {
	ws := s.ws
	if err := s.uploadTokens(c, hb); err != nil {
		return err
	}
	if err := cuda.Upload(c, ws.tgt.Ptr, hb.tgt); err != nil {
		return err
	}
	for ti := range layerTypes {
		if err := cuda.Upload(c, ws.lo[ti].Ptr, hb.lo[ti]); err != nil {
			return err
		}
		if err := cuda.Upload(c, ws.hi[ti].Ptr, hb.hi[ti]); err != nil {
			return err
		}
	}
	return nil
}

// uploadTokens copies what a forward pass reads besides the attention
// spans and the targets: the token ids, the positions with a target and
// the rotary tables. A decoding step after the prompts needs no more (its
// attention reads the caches), and each upload waits for the device.
func (s *session) uploadTokens(c *cuda.Ctx, hb *hostBatch) error {
	ws := s.ws
	if err := cuda.Upload(c, ws.ids.Ptr, hb.ids); err != nil {
		return err
	}
	if err := cuda.Upload(c, ws.idx.Ptr, hb.idx); err != nil {
		return err
	}
	for ti := range layerTypes {
		if err := cuda.Upload(c, ws.cos[ti].Ptr, hb.cos[ti]); err != nil {
			return err
		}
		if err := cuda.Upload(c, ws.sin[ti].Ptr, hb.sin[ti]); err != nil {
			return err
		}
	}
	return nil
}

// gemm computes out = alpha·op(a)·op(b) + beta·out (row-major; with transB,
// b is stored [n × k]; with transA, a is stored [k × m]).
// role names the GEMM's group in profiles: "base", "lora" or "head".
func (s *session) gemm(c *cuda.Ctx, role string, m, n, k int, transA, transB bool, ab, outType cuda.DType,
	alpha float32, a, b cuda.DevicePtr, beta float32, out cuda.DevicePtr) error {
	g := cuda.GEMM{M: m, N: n, K: k, TransA: transA, TransB: transB, AType: ab, BType: ab, CType: outType}
	return s.matmul(c, role, g, alpha, a, b, beta, out)
}

// matmul runs g, timed under its role and shape when the session is
// profiled.
func (s *session) matmul(c *cuda.Ctx, role string, g cuda.GEMM, alpha float32, a, b cuda.DevicePtr, beta float32, out cuda.DevicePtr) error {
	if s.prof == nil {
		return c.Matmul(g, alpha, a, b, beta, out, nil)
	}
	return s.prof.Time(c, "gemm:"+role+" "+g.String(), func() error { return c.Matmul(g, alpha, a, b, beta, out, nil) })
}

// dropout returns the session's dropout for a micro-batch, or nil.
func (s *session) dropout(seed uint64, train bool) *trainer.Dropout {
	if !train || s.cfg.LoRA.Dropout <= 0 {
		return nil
	}
	d := trainer.NewDropout(s.cfg.LoRA.Dropout, seed)
	return &d
}

// linear computes out [T × out] = x·Wᵀ plus the LoRA update
// scale·(drop(x)·Aᵀ)·Bᵀ, keeping x·Aᵀ and the dropout mask in lc for the
// backward pass.
func (s *session) linear(c *cuda.Ctx, T, layer int, mod trainer.Module, x, out cuda.DevicePtr, lc *layerCache, d *trainer.Dropout) error {
	if s.loraFew(T, d) {
		return s.linearFew(c, T, layer, x, []trainer.Module{mod}, []cuda.DevicePtr{out})
	}
	p := &s.w.layers[layer].proj[moduleIndex(mod)]
	scratch := s.scratchFor(mod, lc)
	if s.updateFirst(T, layer, mod, p) {
		if err := s.loraForward(c, T, layer, mod, x, out, lc, d, 0); err != nil {
			return err
		}
		return s.frozenGEMM(c, T, p, scratch, x, 1, out)
	}
	if err := s.frozenProduct(c, T, p, scratch, x, out); err != nil {
		return err
	}
	return s.loraForward(c, T, layer, mod, x, out, lc, d, 1)
}

// updateFirst reports whether mod's forward product writes the LoRA
// update first (LoRAFirstEnv): a GEMM's product, not a decoding step's,
// with an update to apply.
func (s *session) updateFirst(T, layer int, mod trainer.Module, p *projection) bool {
	if !s.loraFirst[moduleIndex(mod)] || s.baseOnly || s.nf4GEMV(T, p) || s.denseGEMV(T, p) {
		return false
	}
	_, ok := s.lora.slot(layer, mod, false)
	return ok
}

// scratchFor is where a forward product dequantises projection mod's
// weights: in a recomputation, its buffer in ws.kept where the session
// keeps them (the block's backward pass reads them there: backwardWeight),
// else the scratch every product shares.
func (s *session) scratchFor(mod trainer.Module, lc *layerCache) cuda.DevicePtr {
	if at := s.ws.keptAt[moduleIndex(mod)]; lc.recompute && at >= 0 {
		return s.ws.kept.Ptr.Add(at)
	}
	return s.ws.wbuf.Ptr
}

// backwardWeight returns projection mod's weights for block layer's
// backward pass and their rows' stride: dense, kept by the block's
// recomputation (widened where they were folded), or dequantised into the
// scratch.
func (s *session) backwardWeight(c *cuda.Ctx, layer int, mod trainer.Module, p *projection) (cuda.DevicePtr, int, error) {
	if i := moduleIndex(mod); s.ws.keptAt[i] >= 0 && s.ws.keptLayer == layer && p.dense.Ptr == 0 {
		return s.ws.kept.Ptr.Add(s.ws.keptAt[i]), s.ws.keptLD[i], nil
	}
	w, err := s.weight(c, p, s.ws.wbuf.Ptr)
	return w, p.in, err
}

// frozenProduct computes out [T × out] = x·Wᵀ for projection p: from its
// NF4 form directly for the few tokens of a decoding step (nf4GEMV), or as
// a GEMM over its dense weights or its weights dequantised into scratch.
func (s *session) frozenProduct(c *cuda.Ctx, T int, p *projection, scratch, x, out cuda.DevicePtr) error {
	if s.nf4GEMV(T, p) {
		return s.k.NF4GEMVPair(c, p.nf4Matrix(out), kernels.NF4Matrix{}, s.w.round, x, T, p.in)
	}
	if s.denseGEMV(T, p) {
		return s.k.GEMV(c, p.dense.Ptr, x, T, p.out, p.in, p.out, 0, out)
	}
	return s.frozenGEMM(c, T, p, scratch, x, 0, out)
}

// frozenGEMM computes out = x·Wᵀ + beta·out as a GEMM over p's dense
// weights or its weights dequantised into scratch.
func (s *session) frozenGEMM(c *cuda.Ctx, T int, p *projection, scratch, x cuda.DevicePtr, beta float32, out cuda.DevicePtr) error {
	act := s.k.Prec.GEMMType()
	w, err := s.weight(c, p, scratch)
	if err != nil {
		return err
	}
	return s.gemm(c, "base", T, p.out, p.in, false, true, act, act, 1, x, w, beta, out)
}

// denseGEMV reports whether p's product for T tokens runs from its dense
// weights as the decoding product of our own (kernels.GEMV) rather than a
// GEMM: in inference sessions in bfloat16, for the few tokens of a step.
func (s *session) denseGEMV(T int, p *projection) bool {
	return s.cfg.Inference && s.k.Prec == kernels.BF16 && T <= kernels.GEMVTokens && p.in%32 == 0 && p.dense.Ptr != 0
}

// nf4GEMV reports whether p's product for T tokens reads its NF4 form
// directly: in sessions that only infer (a training forward pass keeps
// the dequantised GEMM its backward pass mirrors), for at most
// kernels.GEMVTokens tokens, where the weights' bytes are the cost.
func (s *session) nf4GEMV(T int, p *projection) bool {
	return s.cfg.Inference && p.nf4 && T <= kernels.GEMVTokens && p.in%32 == 0
}

// linearPair is linear for two projections of one input and one shape (k
// and v, gate and up). The frozen products are one launch where a
// decoding step reads both NF4 forms directly (nf4Pair), or where both
// weights lie one after the other, stored dense or dequantised so
// (pairable): for a decoding step, one launch instead of two, and a better
// use of the bandwidth for the small ones (see adjoin); for a training
// step's k and v, a GEMM as wide as q's, and for its gate and up one wave
// of tiles fewer.
func (s *session) linearPair(c *cuda.Ctx, T, layer int, m1, m2 trainer.Module, x, out1, out2 cuda.DevicePtr, lc *layerCache, d *trainer.Dropout) error {
	if s.loraFew(T, d) {
		return s.linearFew(c, T, layer, x, []trainer.Module{m1, m2}, []cuda.DevicePtr{out1, out2})
	}
	L := &s.w.layers[layer]
	p1, p2 := &L.proj[moduleIndex(m1)], &L.proj[moduleIndex(m2)]
	first := false
	if s.nf4Pair(T, p1, p2) {
		if err := s.nf4PairProduct(c, T, p1, p2, x, out1, out2); err != nil {
			return err
		}
	} else {
		// A pair of dequantised weights whose updates come first
		// (LoRAFirstEnv) writes them first, then adds the frozen products
		// in the batched GEMM; a pair of which only one does goes apart.
		// Dense pairs keep PEFT's order.
		first1, first2 := s.updateFirst(T, layer, m1, p1), s.updateFirst(T, layer, m2, p2)
		if s.ws.fold && m1 == trainer.GateProj && m2 == trainer.UpProj && first1 && first2 && p1.nf4 && p2.nf4 &&
			p1.dense.Ptr == 0 && p2.dense.Ptr == 0 && p1.in == p2.in && p1.out == p2.out && out2 > out1 {
			return s.foldedPair(c, T, layer, m1, m2, x, out1, out2, lc, d)
		}
		if !s.pairable(T, p1, p2, out1, out2) || p1.dense.Ptr == 0 && first1 != first2 {
			return s.linearApart(c, T, layer, m1, m2, x, out1, out2, lc, d)
		}
		first = first1 && p1.dense.Ptr == 0
		if first {
			// Before the weights are dequantised: dropout's output shares
			// their scratch (workspace.xin).
			if err := s.loraForward(c, T, layer, m1, x, out1, lc, d, 0); err != nil {
				return err
			}
			if err := s.loraForward(c, T, layer, m2, x, out2, lc, d, 0); err != nil {
				return err
			}
		}
		if err := s.pairProduct(c, T, p1, p2, x, out1, out2, s.scratchFor(m1, lc), betaOf(first)); err != nil {
			return err
		}
	}
	if first {
		return nil
	}
	if err := s.loraForward(c, T, layer, m1, x, out1, lc, d, 1); err != nil {
		return err
	}
	return s.loraForward(c, T, layer, m2, x, out2, lc, d, 1)
}

// nf4Pair reports whether a pair's frozen products are one NF4GEMVPair
// (nf4PairProduct): both read from their NF4 forms (nf4GEMV), over inputs
// of one length.
func (s *session) nf4Pair(T int, p1, p2 *projection) bool {
	return s.nf4GEMV(T, p1) && s.nf4GEMV(T, p2) && p1.in == p2.in
}

// nf4PairProduct computes an nf4Pair's frozen products in one launch.
func (s *session) nf4PairProduct(c *cuda.Ctx, T int, p1, p2 *projection, x, out1, out2 cuda.DevicePtr) error {
	return s.k.NF4GEMVPair(c, p1.nf4Matrix(out1), p2.nf4Matrix(out2), s.w.round, x, T, p1.in)
}

// pairable reports whether a pair of one shape, not read from its NF4
// forms, takes pairProduct: its weights lie one after the other
// (pairFits), and out2 lies above out1 at a whole number of elements.
func (s *session) pairable(T int, p1, p2 *projection, out1, out2 cuda.DevicePtr) bool {
	return !s.nf4GEMV(T, p1) && p1.in == p2.in && p1.out == p2.out && out2 > out1 &&
		int64(out2-out1)%s.k.Prec.Size() == 0 && s.pairFits(p1, p2)
}

// pairProduct computes a pairable pair's frozen products plus beta times
// their outputs in one launch: our decoding product over their dense
// copies (denseGEMV), else a batched GEMM over the weights pairWeights
// gives.
func (s *session) pairProduct(c *cuda.Ctx, T int, p1, p2 *projection, x, out1, out2, scratch cuda.DevicePtr, beta float32) error {
	w, err := s.pairWeights(c, p1, p2, scratch)
	if err != nil {
		return err
	}
	size := s.k.Prec.Size()
	if s.denseGEMV(T, p1) {
		return s.k.GEMV(c, p1.dense.Ptr, x, T, 2*p1.out, p1.in, p1.out, int64(out2-out1)/size, out1)
	}
	act := s.k.Prec.GEMMType()
	g := cuda.GEMM{M: T, N: p1.out, K: p1.in, TransB: true, AType: act, BType: act, CType: act,
		Batch: 2, SharedA: true, StrideC: int64(out2-out1) / size}
	return s.matmul(c, "base", g, 1, x, w, beta, out1)
}

// linearFew computes a decoding step's frozen products of projections
// mods, which share input x (q, k and v; gate and up; o or down alone),
// then adds their adapter's updates with one kernels.LoRAFew: two
// launches for the group, where the GEMMs take two a projection. The last
// two of a group of two or three are a pair (k and v, gate and up), one
// product launch where nf4Pair or pairable allows.
func (s *session) linearFew(c *cuda.Ctx, T, layer int, x cuda.DevicePtr, mods []trainer.Module, outs []cuda.DevicePtr) error {
	L := &s.w.layers[layer]
	n := len(mods)
	lone := n // products computed alone
	if n >= 2 {
		p1, p2 := &L.proj[moduleIndex(mods[n-2])], &L.proj[moduleIndex(mods[n-1])]
		switch {
		case s.nf4Pair(T, p1, p2):
			if err := s.nf4PairProduct(c, T, p1, p2, x, outs[n-2], outs[n-1]); err != nil {
				return err
			}
			lone = n - 2
		case s.pairable(T, p1, p2, outs[n-2], outs[n-1]):
			if err := s.pairProduct(c, T, p1, p2, x, outs[n-2], outs[n-1], s.ws.wbuf.Ptr, 0); err != nil {
				return err
			}
			lone = n - 2
		}
	}
	for i := range lone {
		if err := s.frozenProduct(c, T, &L.proj[moduleIndex(mods[i])], s.ws.wbuf.Ptr, x, outs[i]); err != nil {
			return err
		}
	}
	return s.loraFewUpdate(c, T, layer, x, mods, outs)
}

// linearApart is linearPair's two projections one after the other.
func (s *session) linearApart(c *cuda.Ctx, T, layer int, m1, m2 trainer.Module, x, out1, out2 cuda.DevicePtr, lc *layerCache, d *trainer.Dropout) error {
	if err := s.linear(c, T, layer, m1, x, out1, lc, d); err != nil {
		return err
	}
	return s.linear(c, T, layer, m2, x, out2, lc, d)
}

// pairFits reports whether two projections' weights of one shape can lie
// one after the other, as linearPair's batched GEMM reads them: their
// dense copies where they lie so, else their NF4 forms when both fit the
// shared scratch (k and v; gate and up where the scratch is dropout's
// output for enough tokens, workspace.xin). A recomputation, whose
// weights may be kept elsewhere, follows the same rule, so that it
// computes a pair as its forward pass did, bit for bit.
func (s *session) pairFits(p1, p2 *projection) bool {
	second := p1.elements() * s.k.Prec.Size()
	if p1.dense.Ptr != 0 && p2.dense.Ptr != 0 {
		return p2.dense.Ptr == p1.dense.Ptr.Add(second)
	}
	return p1.nf4 && p2.nf4 && p1.dense.Ptr == 0 && p2.dense.Ptr == 0 && 2*second <= s.ws.wbuf.Size
}

// pairWeights returns the weights of a pair that pairFits: their dense
// copies, or their NF4 forms dequantised one after the other at scratch
// (scratchFor the first: the shared scratch, or their kept buffers, which
// lie so).
func (s *session) pairWeights(c *cuda.Ctx, p1, p2 *projection, scratch cuda.DevicePtr) (cuda.DevicePtr, error) {
	if p1.dense.Ptr != 0 {
		return p1.dense.Ptr, nil
	}
	return scratch, s.dequantizeStacked(c, scratch, p1, p2)
}

// dequantizeStacked dequantises the NF4 weights of ps one under the other
// from at.
func (s *session) dequantizeStacked(c *cuda.Ctx, at cuda.DevicePtr, ps ...*projection) error {
	for _, p := range ps {
		if _, err := s.weight(c, p, at); err != nil {
			return err
		}
		at = at.Add(p.elements() * s.k.Prec.Size())
	}
	return nil
}

// loraForward adds the LoRA update of projection mod to beta·out (when
// the session trains or applies an adapter), keeping x·Aᵀ and the dropout
// mask in lc.
func (s *session) loraForward(c *cuda.Ctx, T, layer int, mod trainer.Module, x, out cuda.DevicePtr, lc *layerCache, d *trainer.Dropout, beta float32) error {
	A, ok := s.lora.slot(layer, mod, false)
	if !ok || s.baseOnly {
		return nil
	}
	if err := s.loraXA(c, T, layer, mod, A, x, lc, d); err != nil {
		return err
	}
	B, _ := s.lora.slot(layer, mod, true)
	p := &s.w.layers[layer].proj[moduleIndex(mod)]
	act := s.k.Prec.GEMMType()
	return s.gemm(c, "lora", T, p.out, s.cfg.LoRA.R, false, true, act, act, s.cfg.LoRA.Scale(), lc.xa[moduleIndex(mod)], s.lora.actPtr(s, B), beta, out)
}

// loraFew reports whether a step of T tokens adds its adapter's updates
// with kernels.LoRAFew: in a session that infers with an adapter, for the
// few tokens of a decoding step, where two GEMMs a projection cost more
// than the products they add to.
func (s *session) loraFew(T int, d *trainer.Dropout) bool {
	return s.cfg.Inference && !s.baseOnly && d == nil && s.ws.loraPart.Ptr != 0 && kernels.LoRAFewFits(T, s.cfg.LoRA.R)
}

// loraFewUpdate adds the updates of the adapted projections among mods, of
// one input x, to their outputs outs (beside mods), with kernels.LoRAFew.
func (s *session) loraFewUpdate(c *cuda.Ctx, T, layer int, x cuda.DevicePtr, mods []trainer.Module, outs []cuda.DevicePtr) error {
	var ps []kernels.LoRAProduct
	in := 0
	for i, m := range mods {
		A, ok := s.lora.slot(layer, m, false)
		if !ok {
			continue
		}
		B, _ := s.lora.slot(layer, m, true)
		ps = append(ps, kernels.LoRAProduct{A: s.lora.actPtr(s, A), B: s.lora.actPtr(s, B), Out: outs[i], Rows: B.rows})
		in = A.cols
	}
	if len(ps) == 0 {
		return nil
	}
	return s.k.LoRAFew(c, x, T, in, s.cfg.LoRA.R, s.cfg.LoRA.Scale(), ps, s.ws.loraPart.Ptr)
}

// loraXA computes the forward pass's x·Aᵀ of projection mod (adapter slot
// A) into lc.xa, drawing its dropout mask; a recomputation has both from
// the forward pass.
func (s *session) loraXA(c *cuda.Ctx, T, layer int, mod trainer.Module, A *loraSlot, x cuda.DevicePtr, lc *layerCache, d *trainer.Dropout) error {
	if lc.recompute {
		return nil
	}
	p := &s.w.layers[layer].proj[moduleIndex(mod)]
	src := x
	if d != nil {
		src = s.ws.xin.Ptr
		if err := s.k.DropoutRecord(c, x, src, lc.mask[moduleIndex(mod)].Ptr, int64(T)*int64(p.in), *d, trainer.DropoutStream(layer, mod)); err != nil {
			return err
		}
	}
	act := s.k.Prec.GEMMType()
	return s.gemm(c, "lora", T, s.cfg.LoRA.R, p.in, false, true, act, act, 1, src, s.lora.actPtr(s, A), 0, lc.xa[moduleIndex(mod)])
}

// foldedPair is linearPair for gate and up when their LoRA B products
// fold into the frozen GEMM along K (workspace.fold): with A = [x | x·A_1ᵀ |
// x·A_2ᵀ] (ws.foldA) and the weights widened to [W_1 | s·B_1 | 0] and
// [W_2 | 0 | s·B_2], one batched GEMM writes x·W_iᵀ + s·(x·A_iᵀ)·B_iᵀ,
// rounded once: the update's own product, its write and its read by the
// frozen GEMM's epilogue go, for 2r more of K. s is a power of two, so
// s·B is exact. In a recomputation the widened weights go to their kept
// buffers, which the backward pass then reads (rows foldLD apart).
func (s *session) foldedPair(c *cuda.Ctx, T, layer int, m1, m2 trainer.Module, x, out1, out2 cuda.DevicePtr, lc *layerCache, d *trainer.Dropout) error {
	L := &s.w.layers[layer]
	mods := [2]trainer.Module{m1, m2}
	p1 := &L.proj[moduleIndex(m1)]
	size, R, K, in := s.k.Prec.Size(), s.cfg.LoRA.R, s.ws.foldLD, p1.in
	A := s.ws.foldA.Ptr
	// x·Aᵀ first: dropout's output shares the weights' scratch.
	for i, m := range mods {
		slot, _ := s.lora.slot(layer, m, false)
		if err := s.loraXA(c, T, layer, m, slot, x, lc, d); err != nil {
			return err
		}
		if err := s.k.CopyActRows(c, lc.xa[moduleIndex(m)], R, A.Add(int64(in+i*R)*size), K, T, R); err != nil {
			return err
		}
	}
	if err := s.k.CopyActRows(c, x, in, A, K, T, in); err != nil {
		return err
	}
	w := s.scratchFor(m1, lc)
	for i, m := range mods {
		p := &L.proj[moduleIndex(m)]
		at := w.Add(int64(i) * int64(p.out) * int64(K) * size)
		if err := s.k.NF4DequantizeRows(c, p.packed.Ptr, p.absmaxQ.Ptr, p.absmax2.Ptr, p.offset, p.out, in, K, s.w.round, at); err != nil {
			return err
		}
		B, _ := s.lora.slot(layer, m, true)
		col, zero := in+i*R, in+(1-i)*R // its own update's columns, and the other's
		if err := s.k.FoldLoRAColumns(c, at, p.out, K, col, zero, s.lora.actPtr(s, B), R, s.cfg.LoRA.Scale()); err != nil {
			return err
		}
	}
	act := s.k.Prec.GEMMType()
	g := cuda.GEMM{M: T, N: p1.out, K: K, TransB: true, LDA: K, LDB: K, AType: act, BType: act, CType: act,
		Batch: 2, SharedA: true, StrideB: int64(p1.out) * int64(K), StrideC: int64(out2-out1) / size}
	return s.matmul(c, "base", g, 1, A, w, 0, out1)
}

// projGrad is one projection of a group that reads the same input (q, k
// and v; gate and up; o or down alone): its module and dy, the gradient of
// its output (activations), whose rows lie ld activations apart (0: the
// projection's width).
type projGrad struct {
	mod trainer.Module
	dy  cuda.DevicePtr
	ld  int
}

// qkvGrad is where the backward pass puts q's, k's and v's output
// gradients: side by side in ws.dqkv, so that one GEMM over the three
// stacked weights takes their frozen products' part of the input gradient
// (stackedBackward).
func (s *session) qkvGrad() []projGrad {
	cfg := s.info.Config
	q, kv := cfg.Heads*cfg.HeadDim, cfg.KVHeads*cfg.HeadDim
	ld := q + 2*kv
	col := func(c int) cuda.DevicePtr { return s.ws.dqkv.Ptr.Add(int64(c) * s.k.Prec.Size()) }
	return []projGrad{{trainer.QProj, col(0), ld}, {trainer.KProj, col(q), ld}, {trainer.VProj, col(q + kv), ld}}
}

// inputBackward writes dx [T × in], the float32 gradient of x, the input
// that the projections of group read, and accumulates their LoRA
// gradients: each projection's LoRA gradients (loraBackward), then the
// LoRA products' part of dx for the whole group in one kernel where it
// can (LoRADropoutGrad, which then writes dx), then the frozen products'
// parts (in one GEMM where stackedBackward can, else projection by
// projection), added to dx in the GEMMs' epilogue; where the kernel
// cannot, the LoRA parts are added last (loraInputGrad). The kernel first
// spares it a read of dx (at 12B 0.9 GB a layer: the four groups' dx).
func (s *session) inputBackward(c *cuda.Ctx, T, layer int, x cuda.DevicePtr, group []projGrad, lc *layerCache,
	dx cuda.DevicePtr, d *trainer.Dropout) error {
	for i, g := range group {
		if err := s.loraBackward(c, T, layer, g, x, lc, d, s.dxaSlot(T, i)); err != nil {
			return err
		}
	}
	var parts []kernels.LoRAGradPart
	for i, g := range group {
		if A, ok := s.lora.slot(layer, g.mod, false); ok {
			parts = append(parts, kernels.LoRAGradPart{DXA: s.dxaSlot(T, i), A: s.lora.actPtr(s, A), Mask: lc.mask[moduleIndex(g.mod)].Ptr})
		}
	}
	in, R := s.w.layers[layer].proj[moduleIndex(group[0].mod)].in, s.cfg.LoRA.R
	first := d != nil && len(parts) > 0 && s.k.FusesLoRADropoutGrad(parts, dx, in, R)
	if first {
		if err := s.k.LoRADropoutGrad(c, parts, dx, T, in, R, d.Scale, false); err != nil {
			return err
		}
	}
	stacked, err := s.stackedBackward(c, T, layer, group, first, dx)
	if err != nil {
		return err
	}
	for i := 0; i < len(group) && !stacked; i++ {
		if err := s.frozenBackward(c, T, layer, group[i], first || i > 0, dx); err != nil {
			return err
		}
	}
	if first {
		return nil
	}
	return s.loraInputGrad(c, T, in, parts, dx, d)
}

// frozenBackward adds (or, without accumulate, writes) to dx [T × in] the
// frozen weight's part of the float32 input gradient of g's projection.
func (s *session) frozenBackward(c *cuda.Ctx, T, layer int, g projGrad, accumulate bool, dx cuda.DevicePtr) error {
	p := &s.w.layers[layer].proj[moduleIndex(g.mod)]
	w, ld, err := s.backwardWeight(c, layer, g.mod, p)
	if err != nil {
		return err
	}
	act := s.k.Prec.GEMMType()
	f := cuda.GEMM{M: T, N: p.in, K: p.out, LDA: g.ld, LDB: ld, AType: act, BType: act, CType: cuda.F32}
	return s.matmul(c, "base", f, 1, g.dy, w, betaOf(accumulate), dx)
}

// betaOf is a GEMM's beta that adds to its output (accumulate) or writes it.
func betaOf(accumulate bool) float32 {
	if accumulate {
		return 1
	}
	return 0
}

// stackedBackward writes dx = Σ dy_i·W_i (with accumulate, adds it to dx),
// the frozen products' part of the input gradient of group, as one GEMM
// where it can: the group's output gradients lie side by side in one
// matrix (dy_i's columns follow dy_{i-1}'s in rows ld apart, as qkvGrad
// lays q's, k's and v's) and its weights, NF4, dequantised one under the
// other into the scratch (or kept so by the block's recomputation:
// keptStack), stack to the matrix the GEMM multiplies by: one product with
// K = Σ out_i instead of one a projection (at 12B q's, k's and v's 359,
// 231 and 231 µs). It reports whether it did.
func (s *session) stackedBackward(c *cuda.Ctx, T, layer int, group []projGrad, accumulate bool, dx cuda.DevicePtr) (bool, error) {
	if len(group) < 2 {
		return false, nil
	}
	size := s.k.Prec.Size()
	L := &s.w.layers[layer]
	in := L.proj[moduleIndex(group[0].mod)].in
	ps := make([]*projection, len(group))
	rows := 0
	for i, g := range group {
		p := &L.proj[moduleIndex(g.mod)]
		if !p.nf4 || p.dense.Ptr != 0 || p.in != in || g.ld != group[0].ld || g.dy != group[0].dy.Add(int64(rows)*size) {
			return false, nil
		}
		ps[i] = p
		rows += p.out
	}
	if rows != group[0].ld || int64(rows)*int64(in)*size > s.ws.wbuf.Size {
		return false, nil
	}
	w, ok := s.keptStack(layer, group, ps)
	if !ok {
		w = s.ws.wbuf.Ptr
		if err := s.dequantizeStacked(c, w, ps...); err != nil {
			return false, err
		}
	}
	act := s.k.Prec.GEMMType()
	g := cuda.GEMM{M: T, N: in, K: rows, AType: act, BType: act, CType: cuda.F32}
	return true, s.matmul(c, "base", g, 1, group[0].dy, w, betaOf(accumulate), dx)
}

// keptStack returns where block layer's recomputation left group's
// weights one under the other (ws.kept), if it did.
func (s *session) keptStack(layer int, group []projGrad, ps []*projection) (cuda.DevicePtr, bool) {
	ws := s.ws
	first := ws.keptAt[moduleIndex(group[0].mod)]
	if ws.keptLayer != layer || first < 0 {
		return 0, false
	}
	at := first
	for i, g := range group {
		if m := moduleIndex(g.mod); ws.keptAt[m] != at || ws.keptLD[m] != ps[i].in {
			return 0, false
		}
		at += ps[i].elements() * s.k.Prec.Size()
	}
	return ws.kept.Ptr.Add(first), true
}

// dxaSlot is where the i-th projection of a group keeps its dxa [T × r]
// until loraInputGrad.
func (s *session) dxaSlot(T, i int) cuda.DevicePtr {
	return s.ws.dxa.Ptr.Add(int64(i) * int64(T) * int64(s.cfg.LoRA.R) * s.k.Prec.Size())
}

// loraBackward accumulates the LoRA gradients of projection g.mod of
// linear for its output gradient g.dy, and leaves dxa (the gradient of
// x·Aᵀ) at dxa for loraInputGrad, which adds the LoRA part of the input
// gradient. The forward pass of the same dropout left x·Aᵀ in lc (and,
// unless it ran from saved products, the mask).
func (s *session) loraBackward(c *cuda.Ctx, T, layer int, g projGrad, x cuda.DevicePtr, lc *layerCache, d *trainer.Dropout, dxa cuda.DevicePtr) error {
	A, ok := s.lora.slot(layer, g.mod, false)
	if !ok {
		return nil
	}
	B, _ := s.lora.slot(layer, g.mod, true)
	act := s.k.Prec.GEMMType()
	p := &s.w.layers[layer].proj[moduleIndex(g.mod)]
	R, scale := s.cfg.LoRA.R, s.cfg.LoRA.Scale()
	xa, mask := lc.xa[moduleIndex(g.mod)], lc.mask[moduleIndex(g.mod)].Ptr
	// gradB += scale·dyᵀ·xa; dxa = scale·dy·B.
	gradB := cuda.GEMM{M: p.out, N: R, K: T, TransA: true, LDA: g.ld, AType: act, BType: act, CType: cuda.F32}
	if err := s.matmul(c, "lora", gradB, scale, g.dy, xa, 1, s.lora.gradPtr(B)); err != nil {
		return err
	}
	dxaG := cuda.GEMM{M: T, N: R, K: p.out, LDA: g.ld, AType: act, BType: act, CType: act}
	if err := s.matmul(c, "lora", dxaG, scale, g.dy, s.lora.actPtr(s, B), 0, dxa); err != nil {
		return err
	}
	// gradA += dxaᵀ·drop(x). A recomputation from saved products drew no
	// dropout (see workspace.xaAt): the mask is drawn here, the same one.
	src := x
	n := int64(T) * int64(p.in)
	if d != nil {
		src = s.ws.xin.Ptr
		var err error
		if s.ws.xaAt[moduleIndex(g.mod)] > 0 {
			err = s.k.DropoutRecord(c, x, src, mask, n, *d, trainer.DropoutStream(layer, g.mod))
		} else {
			err = s.k.DropoutReplay(c, x, src, mask, n, d.Scale)
		}
		if err != nil {
			return err
		}
	}
	return s.gemm(c, "lora", R, p.in, T, true, false, act, cuda.F32, 1, dxa, src, 1, s.lora.gradPtr(A))
}

// loraInputGrad adds to dx [T × in] the LoRA products' part of the input
// gradient where LoRADropoutGrad does not take the group (inputBackward):
// dx += drop'(dxa·A), one part after another; with dropout a GEMM into
// activations and DropoutAdd, without a GEMM adding into dx.
func (s *session) loraInputGrad(c *cuda.Ctx, T, in int, parts []kernels.LoRAGradPart, dx cuda.DevicePtr, d *trainer.Dropout) error {
	act := s.k.Prec.GEMMType()
	R := s.cfg.LoRA.R
	for _, p := range parts {
		if d == nil {
			if err := s.gemm(c, "lora", T, in, R, false, false, act, cuda.F32, 1, p.DXA, p.A, 1, dx); err != nil {
				return err
			}
			continue
		}
		if err := s.gemm(c, "lora", T, in, R, false, false, act, act, 1, p.DXA, p.A, 0, s.ws.xin.Ptr); err != nil {
			return err
		}
		if err := s.k.DropoutAdd(c, s.ws.xin.Ptr, dx, p.Mask, int64(T)*int64(in), d.Scale); err != nil {
			return err
		}
	}
	return nil
}

// layerForward runs block l on x, writing its output to out and its
// activations to lc.
func (s *session) layerForward(c *cuda.Ctx, T, l int, x, out cuda.DevicePtr, lc *layerCache, d *trainer.Dropout) error {
	cfg := s.info.Config
	L := &s.w.layers[l]
	Hd, H, KV, D := cfg.Hidden, cfg.Heads, cfg.KVHeads, cfg.HeadDim
	ti := typeIndex(cfg.LayerTypes[l])
	ws, eps := s.ws, cfg.RMSNormEps
	if err := s.lora.stage(s, c, l); err != nil {
		return fmt.Errorf("layer %d: %w", l, err)
	}
	s.bindSaved(lc, T, x)
	if lc.recompute {
		ws.keptLayer = -1 // until every kept weight is block l's (below)
	}
	steps := []func() error{
		func() error {
			if s.cfg.Inference && l > 0 {
				return nil // normed by the block before (the last step below)
			}
			return s.k.RMSNorm(c, x, L.inputNorm.Ptr, 0, lc.xn1.Ptr, lc.rstd1.Ptr, T, Hd, eps)
		},
		func() error { return s.qkv(c, T, l, lc, d) },
		func() error {
			q := kernels.Heads{X: lc.q.Ptr, W: L.qNorm.Ptr, Out: lc.qr.Ptr, Rstd: lc.rstdQ.Ptr, Heads: H}
			k := kernels.Heads{X: lc.k.Ptr, W: L.kNorm.Ptr, Out: lc.kr.Ptr, Rstd: lc.rstdK.Ptr, Heads: KV}
			return s.k.QKNormRope(c, q, k, ws.cos[ti].Ptr, ws.sin[ti].Ptr, T, D, eps)
		},
		func() error {
			if s.dec != nil {
				return s.dec.attention(s, c, T, l, ti, lc)
			}
			return s.k.Attention(c, lc.qr.Ptr, lc.kr.Ptr, lc.v.Ptr, ws.lo[ti].Ptr, lc.att.Ptr, lc.lse.Ptr, T, H, KV, s.attnScale())
		},
		func() error {
			if lc.recompute && ws.oAt > 0 {
				return nil // saved by the forward pass
			}
			return s.linear(c, T, l, trainer.OProj, lc.att.Ptr, lc.o.Ptr, lc, d)
		},
		func() error {
			return s.k.RMSNormPair(c, lc.o.Ptr, L.postAttnNorm.Ptr, x, lc.x1.Ptr, lc.rstd2.Ptr, L.preFFNorm.Ptr, lc.xn2.Ptr, lc.rstd3.Ptr, T, Hd, eps)
		},
		func() error {
			return s.linearPair(c, T, l, trainer.GateProj, trainer.UpProj, lc.xn2.Ptr, lc.gate.Ptr, lc.up.Ptr, lc, d)
		},
		func() error {
			return s.k.GeGLU(c, lc.gate.Ptr, lc.up.Ptr, lc.act.Ptr, int64(T)*int64(cfg.Intermediate))
		},
	}
	// A recomputation stops here: d and rstd4 are saved, and out is the
	// next block's input.
	if !lc.recompute {
		steps = append(steps,
			func() error { return s.linear(c, T, l, trainer.DownProj, lc.act.Ptr, lc.d.Ptr, lc, d) },
			func() error {
				if !s.cfg.Inference {
					return s.k.RMSNorm(c, lc.d.Ptr, L.postFFNorm.Ptr, lc.x1.Ptr, out, lc.rstd4.Ptr, T, Hd, eps)
				}
				// A session that only infers keeps no norm's input for a
				// backward pass: the next block's input norm (or the final
				// one) runs in the same launch, on out as stored.
				w2, out2, rstd2 := s.w.finalNorm.Ptr, ws.xf.Ptr, ws.rstdF.Ptr
				if l+1 < cfg.Layers {
					next := s.cache(l + 1)
					w2, out2, rstd2 = s.w.layers[l+1].inputNorm.Ptr, next.xn1.Ptr, next.rstd1.Ptr
				}
				return s.k.RMSNormPair(c, lc.d.Ptr, L.postFFNorm.Ptr, lc.x1.Ptr, out, lc.rstd4.Ptr, w2, out2, rstd2, T, Hd, eps)
			})
	}
	for _, f := range steps {
		if err := f(); err != nil {
			return fmt.Errorf("layer %d forward: %w", l, err)
		}
	}
	if lc.recompute {
		ws.keptLayer = l
	}
	return nil
}

// qkv computes block l's q, k and v from its normed input: q alone and k
// and v as a pair, or, for a decoding step with an adapter (loraFew), the
// three products and then their updates in one group.
func (s *session) qkv(c *cuda.Ctx, T, l int, lc *layerCache, d *trainer.Dropout) error {
	x := lc.xn1.Ptr
	if s.loraFew(T, d) {
		mods := []trainer.Module{trainer.QProj, trainer.KProj, trainer.VProj}
		return s.linearFew(c, T, l, x, mods, []cuda.DevicePtr{lc.q.Ptr, lc.k.Ptr, lc.v.Ptr})
	}
	if err := s.linear(c, T, l, trainer.QProj, x, lc.q.Ptr, lc, d); err != nil {
		return err
	}
	return s.linearPair(c, T, l, trainer.KProj, trainer.VProj, x, lc.k.Ptr, lc.v.Ptr, lc, d)
}

func (s *session) attnScale() float64 { return 1 / math.Sqrt(s.info.Config.QueryPreAttnScalar) }

// layerBackward takes ws.dout, the float32 gradient of block l's output,
// and replaces it with the gradient of the block's input x, accumulating
// the LoRA gradients.
func (s *session) layerBackward(c *cuda.Ctx, T, l int, x cuda.DevicePtr, lc *layerCache, d *trainer.Dropout) error {
	cfg := s.info.Config
	L := &s.w.layers[l]
	Hd, H, KV, D := cfg.Hidden, cfg.Heads, cfg.KVHeads, cfg.HeadDim
	ti := typeIndex(cfg.LayerTypes[l])
	ws := s.ws
	if err := s.lora.stage(s, c, l); err != nil {
		return fmt.Errorf("layer %d: %w", l, err)
	}
	s.bindSaved(lc, T, x)
	qkv := s.qkvGrad()
	steps := []func() error{
		// out = x1 + norm(d)
		func() error {
			return s.k.RMSNormBackwardAct(c, ws.dout.Ptr, lc.d.Ptr, L.postFFNorm.Ptr, lc.rstd4.Ptr, ws.dd.Ptr, T, Hd)
		},
		func() error {
			return s.inputBackward(c, T, l, lc.act.Ptr, []projGrad{{mod: trainer.DownProj, dy: ws.dd.Ptr}}, lc, ws.dact.Ptr, d)
		},
		// gate and up become their own gradients.
		func() error {
			return s.k.GeGLUBackward(c, ws.dact.Ptr, lc.gate.Ptr, lc.up.Ptr, lc.gate.Ptr, lc.up.Ptr, int64(T)*int64(cfg.Intermediate))
		},
		func() error {
			return s.inputBackward(c, T, l, lc.xn2.Ptr, []projGrad{{mod: trainer.GateProj, dy: lc.gate.Ptr}, {mod: trainer.UpProj, dy: lc.up.Ptr}}, lc, ws.dxn.Ptr, d)
		},
		// x1 = x + norm(o); xn2 = norm(x1)
		func() error {
			return s.k.RMSNormBackwardF32(c, ws.dxn.Ptr, lc.x1.Ptr, L.preFFNorm.Ptr, lc.rstd3.Ptr, ws.dout.Ptr, ws.dx1.Ptr, T, Hd)
		},
		func() error {
			return s.k.RMSNormBackwardAct(c, ws.dx1.Ptr, lc.o.Ptr, L.postAttnNorm.Ptr, lc.rstd2.Ptr, ws.dd.Ptr, T, Hd)
		},
		func() error {
			return s.inputBackward(c, T, l, lc.att.Ptr, []projGrad{{mod: trainer.OProj, dy: ws.dd.Ptr}}, lc, ws.datt.Ptr, d)
		},
		func() error {
			return s.k.AttentionBackward(c, lc.qr.Ptr, lc.kr.Ptr, lc.v.Ptr, ws.datt.Ptr, lc.lse.Ptr,
				ws.lo[ti].Ptr, ws.hi[ti].Ptr, ws.delta.Ptr, ws.dqr.Ptr, ws.dkr.Ptr, ws.dvr.Ptr, T, H, KV, s.attnScale())
		},
		func() error {
			q := kernels.HeadsGrad{DY: ws.dqr.Ptr, X: lc.q.Ptr, W: L.qNorm.Ptr, Rstd: lc.rstdQ.Ptr, DX: qkv[0].dy, Heads: H, LD: qkv[0].ld}
			k := kernels.HeadsGrad{DY: ws.dkr.Ptr, X: lc.k.Ptr, W: L.kNorm.Ptr, Rstd: lc.rstdK.Ptr, DX: qkv[1].dy, Heads: KV, LD: qkv[1].ld}
			return s.k.QKNormRopeBackward(c, q, k, ws.cos[ti].Ptr, ws.sin[ti].Ptr, T, D)
		},
		func() error { return s.k.F32ToActRows(c, ws.dvr.Ptr, qkv[2].dy, T, KV*D, qkv[2].ld) },
		func() error { return s.inputBackward(c, T, l, lc.xn1.Ptr, qkv, lc, ws.dxn.Ptr, d) },
		// xn1 = norm(x); the block's input gradient is dx1 + this.
		func() error {
			return s.k.RMSNormBackwardF32(c, ws.dxn.Ptr, x, L.inputNorm.Ptr, lc.rstd1.Ptr, ws.dx1.Ptr, ws.dout.Ptr, T, Hd)
		},
	}
	for _, f := range steps {
		if err := f(); err != nil {
			return fmt.Errorf("layer %d backward: %w", l, err)
		}
	}
	return nil
}

// run computes the batch's summed loss and trained-token count; with grad
// it also accumulates the gradient of sum/normalizer into the LoRA
// gradients. It is one Device.Do: the host waits only for the loss.
func (s *session) run(b *trainer.Batch, grad bool, normalizer float64, dropoutSeed uint64) (float64, int, error) {
	hb, err := s.prepare(b)
	if err != nil {
		return 0, 0, err
	}
	return s.pass(hb, grad, normalizer, dropoutSeed, nil)
}

// PositionLogits runs b forward without dropout and returns the float32
// logits at its positions with a target, in order.
func (s *session) PositionLogits(b *trainer.Batch) ([][]float32, error) {
	hb, err := s.prepare(b)
	if err != nil {
		return nil, err
	}
	return s.positionLogits(hb)
}

// positionLogits is PositionLogits of a prepared batch.
func (s *session) positionLogits(hb *hostBatch) ([][]float32, error) {
	var out [][]float32
	_, _, err := s.pass(hb, false, 1, 0, func(c *cuda.Ctx, rows int) error {
		chunk, err := s.downloadLogits(c, rows)
		out = append(out, chunk...)
		return err
	})
	s.notePeak()
	return out, err
}

// downloadLogits copies the first rows of ws.logits to the host, a slice
// a row.
func (s *session) downloadLogits(c *cuda.Ctx, rows int) ([][]float32, error) {
	V := s.info.Config.VocabSize
	host := make([]float32, rows*V)
	if err := cuda.Download(c, host, s.ws.logits.Ptr); err != nil {
		return nil, err
	}
	out := make([][]float32, rows)
	for r := range out {
		out[r] = host[r*V : (r+1)*V : (r+1)*V]
	}
	return out, nil
}

// pass is run's body, for a prepared batch. With logits set it stops
// after each chunk's lm_head GEMM and hands the chunk's rows of ws.logits
// to it, computing no loss.
func (s *session) pass(hb *hostBatch, grad bool, normalizer float64, dropoutSeed uint64, logits func(c *cuda.Ctx, rows int) error) (float64, int, error) {
	if grad && s.cfg.Inference {
		return 0, 0, errors.New("gpu: a gradient from a session opened for inference (it keeps nothing for a backward pass)")
	}
	n := len(hb.idx)
	var sum float64
	// This backward pass finishes the step's gradients: sum each layer's
	// over the ranks as soon as it is done (ReduceInNextBackward).
	reduce := grad && s.red != nil && s.red.next
	if reduce {
		s.red.next = false
	}
	err := s.dev.Do(func(c *cuda.Ctx) error {
		cfg := s.info.Config
		ws, T, Hd, V := s.ws, hb.T, cfg.Hidden, cfg.VocabSize
		act := s.k.Prec.GEMMType()
		if err := s.upload(c, hb); err != nil {
			return err
		}
		d := s.dropout(dropoutSeed, grad)
		ws.keptLayer = -1 // the loss chunk shares its memory, and the weights are another block's
		off := s.off
		input := func(i int) cuda.DevicePtr { return ws.inputs[i].Ptr }
		if off != nil {
			input = off.forwardSlot
			defer off.finish()
		}
		xL, err := s.forwardBlocks(c, T, input, d, grad)
		if err != nil {
			return err
		}
		if n == 0 {
			return nil
		}
		if grad {
			if err := c.MemsetD8Async(ws.dxf.Ptr, 0, 4*int64(T)*int64(Hd), nil); err != nil {
				return err
			}
		}
		for c0 := 0; c0 < n; c0 += ws.chunk {
			nc := min(ws.chunk, n-c0)
			idx, tgt := ws.idx.Ptr.Add(4*int64(c0)), ws.tgt.Ptr.Add(4*int64(c0))
			if err := s.headLogits(c, idx, nc); err != nil {
				return err
			}
			if logits != nil {
				if err := logits(c, nc); err != nil {
					return err
				}
				continue
			}
			var g cuda.DevicePtr
			if grad {
				g = ws.glog.Ptr
			}
			if err := s.k.CrossEntropy(c, ws.logits.Ptr, tgt, nc, V, normalizer, ws.rowLoss.Ptr.Add(8*int64(c0)), g); err != nil {
				return err
			}
			if !grad {
				continue
			}
			if err := s.gemm(c, "head", nc, Hd, V, false, false, act, cuda.F32, 1, ws.glog.Ptr, s.w.embed.Ptr, 0, ws.dhc.Ptr); err != nil {
				return err
			}
			if err := s.k.ScatterRows(c, ws.dhc.Ptr, idx, ws.dxf.Ptr, nc, Hd); err != nil {
				return err
			}
		}
		if logits != nil {
			return nil
		}
		total := ws.rowLoss.Ptr.Add(8 * int64(T))
		if err := s.k.SumDouble(c, ws.rowLoss.Ptr, n, total); err != nil {
			return err
		}
		var out [1]float64
		if err := cuda.Download(c, out[:], total); err != nil {
			return err
		}
		sum = out[0]
		if !grad {
			return nil
		}
		if err := s.k.RMSNormBackwardF32(c, ws.dxf.Ptr, xL, s.w.finalNorm.Ptr, ws.rstdF.Ptr, 0, ws.dout.Ptr, T, Hd); err != nil {
			return err
		}
		if off != nil {
			if err := off.startBackward(c); err != nil {
				return err
			}
		}
		for l := cfg.Layers - 1; l >= 0; l-- {
			in, out := input(l), input(l+1)
			if off != nil {
				var err error
				if in, out, err = off.backwardSlots(c, l); err != nil {
					return err
				}
			}
			if err := s.lora.beginLayerGrads(c, l); err != nil {
				return err
			}
			if s.cfg.GradientCheckpointing {
				// Recompute the block's activations from what its forward
				// pass saved.
				lc := s.cache(l)
				lc.recompute = true
				err := s.layerForward(c, T, l, in, out, lc, d)
				lc.recompute = false
				if err != nil {
					return err
				}
			}
			if err := s.layerBackward(c, T, l, in, s.cache(l), d); err != nil {
				return err
			}
			if err := s.lora.endLayerGrads(s, c, l); err != nil {
				return err
			}
			if reduce {
				if err := s.reduceLayer(c, l); err != nil {
					return err
				}
			}
		}
		if err := s.lora.endPassGrads(); err != nil {
			return err
		}
		if s.prof != nil {
			return s.prof.collect(c)
		}
		return c.Stream().Synchronize()
	})
	if err != nil {
		return 0, 0, err
	}
	if math.IsNaN(sum) || math.IsInf(sum, 0) {
		return sum, n, fmt.Errorf("the loss is %v", sum)
	}
	return sum, n, nil
}

// headLogits queues the lm_head at the n rows of ws.xf that idx names:
// their float32 logits into ws.logits.
func (s *session) headLogits(c *cuda.Ctx, idx cuda.DevicePtr, n int) error {
	ws, cfg := s.ws, s.info.Config
	if err := s.k.GatherRows(c, ws.xf.Ptr, idx, ws.hc.Ptr, n, cfg.Hidden); err != nil {
		return err
	}
	return s.logitsOf(c, ws.hc.Ptr, n)
}

// logitsOf computes ws.logits [n × vocab] (float32) = x·embedᵀ, the tied
// lm_head, for n rows of normed activations x.
func (s *session) logitsOf(c *cuda.Ctx, x cuda.DevicePtr, n int) error {
	cfg := s.info.Config
	return s.gemm(c, "head", n, cfg.VocabSize, cfg.Hidden, false, true, s.k.Prec.GEMMType(), cuda.F32, 1, x, s.w.embed.Ptr, 0, s.ws.logits.Ptr)
}

// forwardBlocks queues the embedding of the uploaded batch's T tokens, the
// blocks (block l reading input(l) and writing input(l+1)) and the final
// norm into ws.xf, and returns the last block's output. With offload set
// and grad, each block's input goes to the host for the backward pass.
func (s *session) forwardBlocks(c *cuda.Ctx, T int, input func(int) cuda.DevicePtr, d *trainer.Dropout, grad bool) (cuda.DevicePtr, error) {
	cfg, ws, off := s.info.Config, s.ws, s.off
	if err := s.k.Embed(c, ws.ids.Ptr, s.w.embed.Ptr, s.info.EmbedScale(), input(0), T, cfg.Hidden); err != nil {
		return 0, err
	}
	for l := 0; l < cfg.Layers; l++ {
		if off != nil && grad {
			if err := off.beforeWrite(c, l+1); err != nil {
				return 0, err
			}
		}
		if err := s.layerForward(c, T, l, input(l), input(l+1), s.cache(l), d); err != nil {
			return 0, err
		}
		// The block's input buffer is complete once the block has run: it
		// also holds what the block saves (workspace.oAt).
		if off != nil && grad {
			if err := off.save(c, l); err != nil {
				return 0, err
			}
		}
	}
	xL := input(cfg.Layers)
	if s.cfg.Inference {
		return xL, nil // the last block normed it (layerForward)
	}
	return xL, s.k.RMSNorm(c, xL, s.w.finalNorm.Ptr, 0, ws.xf.Ptr, ws.rstdF.Ptr, T, cfg.Hidden, cfg.RMSNormEps)
}

// bindSaved points lc at what the block of input x saves in its input
// buffer (workspace.oAt), or lc.xa at lc's own buffers.
func (s *session) bindSaved(lc *layerCache, T int, x cuda.DevicePtr) {
	if ws := s.ws; ws.dAt > 0 {
		Hd := int64(s.info.Config.Hidden)
		lc.o = cuda.Buffer{Ptr: x.Add(ws.oAt), Size: int64(T) * Hd * s.k.Prec.Size()}
		lc.d = cuda.Buffer{Ptr: x.Add(ws.dAt), Size: int64(T) * Hd * s.k.Prec.Size()}
		lc.rstd4 = cuda.Buffer{Ptr: x.Add(ws.rstdAt), Size: 4 * int64(T)}
	}
	for m := range lc.xa {
		if at := s.ws.xaAt[m]; at > 0 {
			lc.xa[m] = x.Add(at)
		} else {
			lc.xa[m] = lc.xaBuf[m].Ptr
		}
	}
}

// cache returns the activation cache of block l.
func (s *session) cache(l int) *layerCache {
	if len(s.ws.caches) == 1 {
		return &s.ws.caches[0]
	}
	return &s.ws.caches[l]
}
