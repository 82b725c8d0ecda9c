package trainer

import (
	"fmt"
	"math"
)

// Batch is a run of tokens on which the model runs at once: one or more
// packed rows laid end to end. Attention never crosses an example, so rows
// need no separate dimension.
type Batch struct {
	IDs []int32
	// Pos is each token's position within its example (RoPE restarts there).
	Pos []int32
	// SegStart is the index in IDs of the first token of each token's example.
	SegStart []int32
	// Targets[t] is the label the logits at t are trained on: the row's
	// labels[t+1] within the same example, IgnoreIndex otherwise.
	Targets []int32
}

// PackedRow is one row of the pack stage's output. PositionIDs may be nil,
// then positions restart at 0 for each example.
type PackedRow struct {
	InputIDs, Labels, PositionIDs, SeqLengths []int32
}

// NewBatch lays rows end to end and derives each token's example and
// target. The tail of a row beyond its examples is padding: each padding
// token is an example of its own with nothing to train.
func NewBatch(rows []PackedRow) (*Batch, error) {
	b := &Batch{}
	for ri, r := range rows {
		bad := func(format string, args ...any) error {
			if len(rows) > 1 { // one row's caller names it
				format, args = "row %d: "+format, append([]any{ri}, args...)
			}
			return fmt.Errorf(format, args...)
		}
		n := len(r.InputIDs)
		if len(r.Labels) != n || (r.PositionIDs != nil && len(r.PositionIDs) != n) {
			return nil, bad("input_ids, labels and position_ids lengths differ (%d, %d, %d)", n, len(r.Labels), len(r.PositionIDs))
		}
		base := int32(len(b.IDs))
		used := 0
		for _, l := range r.SeqLengths {
			if l <= 0 {
				return nil, bad("seq_lengths holds %d", l)
			}
			used += int(l)
		}
		if used > n {
			return nil, bad("seq_lengths sum to %d, more than the row's %d tokens", used, n)
		}
		start := 0
		segs := append([]int32(nil), r.SeqLengths...)
		for i := used; i < n; i++ {
			segs = append(segs, 1)
		}
		for si, l := range segs {
			padding := si >= len(r.SeqLengths)
			for j := 0; j < int(l); j++ {
				t := start + j
				pos := int32(j)
				if r.PositionIDs != nil && !padding {
					pos = r.PositionIDs[t]
				}
				tgt := int32(IgnoreIndex)
				if j+1 < int(l) && !padding {
					tgt = r.Labels[t+1]
				}
				b.IDs = append(b.IDs, r.InputIDs[t])
				b.Pos = append(b.Pos, pos)
				b.SegStart = append(b.SegStart, base+int32(start))
				b.Targets = append(b.Targets, tgt)
			}
			start += int(l)
		}
	}
	return b, nil
}

// Trained is the number of tokens whose target is trained.
func (b *Batch) Trained() int {
	n := 0
	for _, t := range b.Targets {
		if t != IgnoreIndex {
			n++
		}
	}
	return n
}

func (b *Batch) validate(c *Config) error {
	if len(b.IDs) == 0 {
		return fmt.Errorf("empty batch")
	}
	for i, id := range b.IDs {
		if id < 0 || int(id) >= c.VocabSize {
			return fmt.Errorf("token %d: id %d outside the model's vocabulary [0, %d): were the rows tokenized with another model's tokenizer?", i, id, c.VocabSize)
		}
		if t := b.Targets[i]; t != IgnoreIndex && (t < 0 || int(t) >= c.VocabSize) {
			if t < 0 {
				return fmt.Errorf("token %d: label %d: a label is a token id, or %d where the token is not trained", i, t, IgnoreIndex)
			}
			return fmt.Errorf("token %d: label %d outside the model's vocabulary [0, %d): were the rows tokenized with another model's tokenizer?", i, t, c.VocabSize)
		}
		if b.Pos[i] < 0 {
			return fmt.Errorf("token %d: negative position %d", i, b.Pos[i])
		}
	}
	return nil
}

// linearCache keeps what a LoRA-adapted projection's backward needs.
type linearCache struct {
	xin  []float32 // the adapter's input after dropout
	xa   []float32 // xin · Aᵀ, [T×R]
	mask []float32 // dropout scale per input element, nil without dropout
}

// layerCache holds one decoder block's activations for its backward pass.
type layerCache struct {
	x, xn1, rstd1 []float32
	q, k, v       []float32 // projections
	qn, kn        []float32 // after q/k norm, before RoPE
	rstdQ, rstdK  []float32
	qr, kr        []float32 // after RoPE
	att, lse      []float32
	o, rstd2, x1  []float32
	xn2, rstd3    []float32
	gate, up, act []float32
	d, rstd4      []float32
	lora          map[Module]*linearCache
}

// runner evaluates the model on one batch.
type runner struct {
	m       *Model
	a       *Adapter // may be nil
	b       *Batch
	T       int
	dropout *Dropout // nil: no dropout
	// recompute selects gradient checkpointing: only each block's input is
	// kept through the forward pass.
	recompute bool
	lo        map[LayerType][]int32
	cos       map[LayerType][]float32
	sin       map[LayerType][]float32
	// kv, when set, makes attention read and extend per-sequence caches
	// (decoding) instead of attending within the batch.
	kv *decodeState
}

func newRunner(m *Model, a *Adapter, b *Batch, dropoutSeed uint64, train bool) (*runner, error) {
	if err := b.validate(m.Config); err != nil {
		return nil, err
	}
	if a != nil && len(a.Layers) != m.Config.Layers {
		return nil, fmt.Errorf("adapter has %d layers, model %d", len(a.Layers), m.Config.Layers)
	}
	c := m.Config
	r := &runner{m: m, a: a, b: b, T: len(b.IDs), recompute: true,
		lo: map[LayerType][]int32{}, cos: map[LayerType][]float32{}, sin: map[LayerType][]float32{}}
	if train && a != nil && a.Config.Dropout > 0 {
		d := NewDropout(a.Config.Dropout, dropoutSeed)
		r.dropout = &d
	}
	for _, lt := range []LayerType{SlidingAttention, FullAttention} {
		w := 0
		if lt == SlidingAttention {
			w = c.SlidingWindow
		}
		r.lo[lt] = AttentionSpans(b.SegStart, w)
		r.cos[lt], r.sin[lt] = RopeTables(b.Pos, RopeInvFreq(c.Rope[lt], c.HeadDim))
	}
	return r, nil
}

func (r *runner) lora(layer int, m Module) *LoRAWeights {
	if r.a == nil {
		return nil
	}
	return r.a.Layers[layer][m]
}

// linear computes out = x·Wᵀ plus the LoRA update scale·(drop(x)·Aᵀ)·Bᵀ.
func (r *runner) linear(out, x []float32, layer int, mod Module, lc *layerCache) {
	lin := r.m.Layers[layer].Proj[mod]
	T := r.T
	Matmul(out, x, lin.W, T, lin.Out, lin.In, false)
	w := r.lora(layer, mod)
	if w == nil {
		return
	}
	c := &linearCache{xin: x}
	if r.dropout != nil {
		stream := DropoutStream(layer, mod)
		c.mask = make([]float32, len(x))
		c.xin = make([]float32, len(x))
		for i := range x {
			if r.dropout.Keep(stream, uint64(i)) {
				c.mask[i] = r.dropout.Scale
			}
			c.xin[i] = x[i] * c.mask[i]
		}
	}
	c.xa = make([]float32, T*w.R)
	Matmul(c.xa, c.xin, w.A, T, w.R, w.In, false)
	scaled := make([]float32, len(c.xa))
	s := r.a.Config.Scale()
	for i, v := range c.xa {
		scaled[i] = v * s
	}
	Matmul(out, scaled, w.B, T, w.Out, w.R, true)
	lc.lora[mod] = c
}

// linearBackward adds dx and accumulates the LoRA gradients for dout.
func (r *runner) linearBackward(dx, dout []float32, layer int, mod Module, lc *layerCache) {
	lin := r.m.Layers[layer].Proj[mod]
	T := r.T
	MatmulBackwardInput(dx, dout, lin.W, T, lin.Out, lin.In)
	w := r.lora(layer, mod)
	if w == nil {
		return
	}
	c := lc.lora[mod]
	s := r.a.Config.Scale()
	dxa := make([]float32, T*w.R)
	MatmulBackwardInput(dxa, dout, w.B, T, w.Out, w.R)
	for i := range dxa {
		dxa[i] *= s
	}
	MatmulBackwardWeight(w.GradB, dout, c.xa, T, w.Out, w.R, s)
	MatmulBackwardWeight(w.GradA, dxa, c.xin, T, w.R, w.In, 1)
	dxin := make([]float32, T*w.In)
	MatmulBackwardInput(dxin, dxa, w.A, T, w.R, w.In)
	for i, g := range dxin {
		if c.mask != nil {
			g *= c.mask[i]
		}
		dx[i] += g
	}
}

// layerForward runs block l on x and returns its output; lc receives the
// activations.
func (r *runner) layerForward(l int, x []float32, lc *layerCache) []float32 {
	c := r.m.Config
	L := &r.m.Layers[l]
	T, Hd, H, KV, D := r.T, c.Hidden, c.Heads, c.KVHeads, c.HeadDim
	lt := c.LayerTypes[l]
	*lc = layerCache{x: x, lora: map[Module]*linearCache{}}
	lc.xn1, lc.rstd1 = make([]float32, T*Hd), make([]float32, T)
	RMSNorm(lc.xn1, x, L.InputNorm, lc.rstd1, T, Hd, c.RMSNormEps)
	lc.q, lc.k, lc.v = make([]float32, T*H*D), make([]float32, T*KV*D), make([]float32, T*KV*D)
	r.linear(lc.q, lc.xn1, l, QProj, lc)
	r.linear(lc.k, lc.xn1, l, KProj, lc)
	r.linear(lc.v, lc.xn1, l, VProj, lc)
	lc.qn, lc.rstdQ = make([]float32, T*H*D), make([]float32, T*H)
	lc.kn, lc.rstdK = make([]float32, T*KV*D), make([]float32, T*KV)
	RMSNorm(lc.qn, lc.q, L.QNorm, lc.rstdQ, T*H, D, c.RMSNormEps)
	RMSNorm(lc.kn, lc.k, L.KNorm, lc.rstdK, T*KV, D, c.RMSNormEps)
	lc.qr = append([]float32(nil), lc.qn...)
	lc.kr = append([]float32(nil), lc.kn...)
	ApplyRope(lc.qr, r.cos[lt], r.sin[lt], T, H, D, false)
	ApplyRope(lc.kr, r.cos[lt], r.sin[lt], T, KV, D, false)
	lc.att, lc.lse = make([]float32, T*H*D), make([]float32, T*H)
	if r.kv != nil {
		r.kv.attend(r, l, lc.att, lc.qr, lc.kr, lc.v)
	} else {
		Attention(lc.att, lc.lse, lc.qr, lc.kr, lc.v, r.lo[lt], T, H, KV, D, 1/math.Sqrt(c.QueryPreAttnScalar))
	}
	lc.o = make([]float32, T*Hd)
	r.linear(lc.o, lc.att, l, OProj, lc)
	lc.x1, lc.rstd2 = make([]float32, T*Hd), make([]float32, T)
	RMSNorm(lc.x1, lc.o, L.PostAttnNorm, lc.rstd2, T, Hd, c.RMSNormEps)
	for i := range lc.x1 {
		lc.x1[i] += x[i]
	}
	lc.xn2, lc.rstd3 = make([]float32, T*Hd), make([]float32, T)
	RMSNorm(lc.xn2, lc.x1, L.PreFFNorm, lc.rstd3, T, Hd, c.RMSNormEps)
	I := c.Intermediate
	lc.gate, lc.up, lc.act = make([]float32, T*I), make([]float32, T*I), make([]float32, T*I)
	r.linear(lc.gate, lc.xn2, l, GateProj, lc)
	r.linear(lc.up, lc.xn2, l, UpProj, lc)
	GeGLU(lc.act, lc.gate, lc.up)
	lc.d = make([]float32, T*Hd)
	r.linear(lc.d, lc.act, l, DownProj, lc)
	out, rstd4 := make([]float32, T*Hd), make([]float32, T)
	lc.rstd4 = rstd4
	RMSNorm(out, lc.d, L.PostFFNorm, rstd4, T, Hd, c.RMSNormEps)
	for i := range out {
		out[i] += lc.x1[i]
	}
	return out
}

// layerBackward takes the gradient of block l's output and returns the
// gradient of its input, accumulating LoRA gradients.
func (r *runner) layerBackward(l int, lc *layerCache, dout []float32) []float32 {
	c := r.m.Config
	L := &r.m.Layers[l]
	T, Hd, H, KV, D, I := r.T, c.Hidden, c.Heads, c.KVHeads, c.HeadDim, c.Intermediate
	lt := c.LayerTypes[l]

	dx1 := append([]float32(nil), dout...)
	dd := make([]float32, T*Hd)
	RMSNormBackward(dd, dout, lc.d, L.PostFFNorm, lc.rstd4, T, Hd)
	dact := make([]float32, T*I)
	r.linearBackward(dact, dd, l, DownProj, lc)
	dgate, dup := make([]float32, T*I), make([]float32, T*I)
	GeGLUBackward(dgate, dup, dact, lc.gate, lc.up)
	dxn2 := make([]float32, T*Hd)
	r.linearBackward(dxn2, dgate, l, GateProj, lc)
	r.linearBackward(dxn2, dup, l, UpProj, lc)
	RMSNormBackward(dx1, dxn2, lc.x1, L.PreFFNorm, lc.rstd3, T, Hd)

	dx := append([]float32(nil), dx1...)
	do := make([]float32, T*Hd)
	RMSNormBackward(do, dx1, lc.o, L.PostAttnNorm, lc.rstd2, T, Hd)
	datt := make([]float32, T*H*D)
	r.linearBackward(datt, do, l, OProj, lc)
	dqr, dkr, dv := make([]float32, T*H*D), make([]float32, T*KV*D), make([]float32, T*KV*D)
	AttentionBackward(dqr, dkr, dv, datt, lc.att, lc.lse, lc.qr, lc.kr, lc.v, r.lo[lt], T, H, KV, D, 1/math.Sqrt(c.QueryPreAttnScalar))
	ApplyRope(dqr, r.cos[lt], r.sin[lt], T, H, D, true)
	ApplyRope(dkr, r.cos[lt], r.sin[lt], T, KV, D, true)
	dq, dk := make([]float32, T*H*D), make([]float32, T*KV*D)
	RMSNormBackward(dq, dqr, lc.q, L.QNorm, lc.rstdQ, T*H, D)
	RMSNormBackward(dk, dkr, lc.k, L.KNorm, lc.rstdK, T*KV, D)
	dxn1 := make([]float32, T*Hd)
	r.linearBackward(dxn1, dq, l, QProj, lc)
	r.linearBackward(dxn1, dk, l, KProj, lc)
	r.linearBackward(dxn1, dv, l, VProj, lc)
	RMSNormBackward(dx, dxn1, lc.x, L.InputNorm, lc.rstd1, T, Hd)
	return dx
}

// forward runs the blocks and the final norm. It returns the final hidden
// states xf, the last block's output x and the final norm's rstd. With
// keep set it records what the backward pass needs: each block's input
// (gradient checkpointing) or each block's whole cache.
func (r *runner) forward(keep bool) (xf, x, rstd []float32, inputs [][]float32, caches []layerCache) {
	c := r.m.Config
	T, Hd := r.T, c.Hidden
	x = make([]float32, T*Hd)
	Embed(x, r.m.Embed, r.b.IDs, Hd, r.m.EmbedScale())
	if keep {
		inputs = make([][]float32, c.Layers)
		if !r.recompute {
			caches = make([]layerCache, c.Layers)
		}
	}
	var lc layerCache
	for l := 0; l < c.Layers; l++ {
		if r.kv != nil && r.kv.canceled() {
			break // the caller returns the context's error
		}
		if keep {
			inputs[l] = x
		}
		if caches != nil {
			x = r.layerForward(l, x, &caches[l])
		} else {
			x = r.layerForward(l, x, &lc)
		}
	}
	xf, rstd = make([]float32, T*Hd), make([]float32, T)
	RMSNorm(xf, x, r.m.FinalNorm, rstd, T, Hd, c.RMSNormEps)
	return xf, x, rstd, inputs, caches
}

// run computes the summed token loss; with grad set it also accumulates
// the gradient of sum/normalizer into the adapter. With gradient
// checkpointing (the default) only each block's input is kept through the
// forward pass, and the backward pass recomputes a block's activations
// just before it needs them, so memory holds one block's activations at a
// time; without it every block's activations are kept.
func (r *runner) run(grad bool, normalizer float64) (float64, int) {
	c := r.m.Config
	T, Hd := r.T, c.Hidden
	xf, x, rstd, inputs, caches := r.forward(grad)
	var dxf []float32
	if grad {
		dxf = make([]float32, T*Hd)
	}
	sum, count := LMHeadLoss(xf, r.m.Embed, r.b.Targets, T, c.VocabSize, Hd, normalizer, dxf)
	if !grad || count == 0 {
		return sum, count
	}
	dx := make([]float32, T*Hd)
	RMSNormBackward(dx, dxf, x, r.m.FinalNorm, rstd, T, Hd)
	var lc layerCache
	for l := c.Layers - 1; l >= 0; l-- {
		if caches != nil {
			dx = r.layerBackward(l, &caches[l], dx)
			caches[l] = layerCache{}
			continue
		}
		r.layerForward(l, inputs[l], &lc)
		dx = r.layerBackward(l, &lc, dx)
	}
	return sum, count
}

// Loss returns the summed cross-entropy over the batch's trained tokens and
// their number, without dropout and without gradients.
func (m *Model) Loss(a *Adapter, b *Batch) (sum float64, count int, err error) {
	r, err := newRunner(m, a, b, 0, false)
	if err != nil {
		return 0, 0, err
	}
	sum, count = r.run(false, 1)
	return sum, count, nil
}

// Logits returns the logits [len(b.IDs)×VocabSize] at every position of
// the batch, the adapter applied when a is not nil: the forward pass of
// training followed by the whole tied head, which training computes only
// in chunks at the trained positions. It is the reference that exported
// models (GGUF files, merged checkpoints) and generation are held to.
func (m *Model) Logits(a *Adapter, b *Batch) ([]float32, error) {
	r, err := newRunner(m, a, b, 0, false)
	if err != nil {
		return nil, err
	}
	xf, _, _, _, _ := r.forward(false)
	logits := make([]float32, r.T*m.Config.VocabSize)
	Matmul(logits, xf, m.Embed, r.T, m.Config.VocabSize, m.Config.Hidden, false)
	return logits, nil
}

// LossAndGrad returns the summed loss like Loss, and adds the gradient of
// sum/normalizer to the adapter's gradients. normalizer is the number of
// trained tokens of the whole optimizer step, so micro-batches accumulate
// to the gradient of the step's mean loss. dropoutSeed fixes the dropout
// masks (dropout applies when the adapter's dropout is positive).
func (m *Model) LossAndGrad(a *Adapter, b *Batch, normalizer float64, dropoutSeed uint64) (sum float64, count int, err error) {
	return m.lossAndGrad(a, b, normalizer, dropoutSeed, true)
}

func (m *Model) lossAndGrad(a *Adapter, b *Batch, normalizer float64, dropoutSeed uint64, recompute bool) (sum float64, count int, err error) {
	if a == nil {
		return 0, 0, fmt.Errorf("LossAndGrad needs an adapter")
	}
	if normalizer <= 0 {
		return 0, 0, fmt.Errorf("normalizer %v must be positive", normalizer)
	}
	r, err := newRunner(m, a, b, dropoutSeed, true)
	if err != nil {
		return 0, 0, err
	}
	r.recompute = recompute
	sum, count = r.run(true, normalizer)
	return sum, count, nil
}
