package trainer

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"sync"
)

// GenerateOptions configures decoding.
type GenerateOptions struct {
	MaxNewTokens int
	// Temperature 0 decodes greedily; otherwise the next token is drawn
	// from the softmax of logits/Temperature, restricted to the TopK most
	// likely tokens (0: all) and then to the smallest set whose
	// probability reaches TopP (0 or 1: all), in that order, as
	// transformers' generate applies them.
	Temperature float64
	TopK        int
	TopP        float64
	// Seed fixes the draws; sequence i draws from its own stream, so a
	// sequence's text does not depend on what else is in the batch.
	Seed uint64
	// Streams, when set, names sequence i's stream Streams[i] instead of
	// i, so that a caller decoding in batches can give each question the
	// same draws whichever batch, and place in it, it falls in.
	Streams []uint64
	// Stop ends a sequence when it produces one of these ids (which is
	// kept as its last token): Gemma 3's <end_of_turn> and <eos>.
	Stop []int32
}

// Validate reports options that cannot decode.
func (o GenerateOptions) Validate() error {
	switch {
	case o.MaxNewTokens < 1:
		return fmt.Errorf("max_new_tokens %d: must be at least 1", o.MaxNewTokens)
	case o.Temperature < 0 || math.IsNaN(o.Temperature) || math.IsInf(o.Temperature, 0):
		return fmt.Errorf("temperature %v: must be 0 (greedy) or a positive finite number", o.Temperature)
	case o.TopK < 0:
		return fmt.Errorf("top_k %d: must not be negative", o.TopK)
	case o.TopP < 0 || o.TopP > 1 || math.IsNaN(o.TopP):
		return fmt.Errorf("top_p %v: must be in [0, 1]", o.TopP)
	}
	return nil
}

// kvCache holds, per layer, the keys (after norm and RoPE) and values of
// the positions one sequence's later tokens may still attend to: every
// position for global layers, the last SlidingWindow for sliding ones.
type kvCache struct {
	first []int32     // per layer: the position of the first kept entry
	k, v  [][]float32 // per layer: [positions×KVHeads×HeadDim]
}

// decodeState is the caches of a batch of sequences and, for the tokens
// the runner is evaluating, which sequence each belongs to.
type decodeState struct {
	seqs  []*kvCache
	seqOf []int
	// ctx, when set, stops a long step (a prompt of many thousand tokens
	// takes minutes on a CPU) between layers and within the attention; the
	// step then returns ctx's error.
	ctx context.Context
}

// canceled reports whether the step should stop.
func (s *decodeState) canceled() bool { return s.ctx != nil && s.ctx.Err() != nil }

// attend appends the step's keys and values to each token's sequence and
// computes each token's attention over its sequence's cache (positions up
// to its own, within the window for sliding layers); then it drops what
// no later position of a sliding layer can see.
func (s *decodeState) attend(r *runner, l int, out, q, k, v []float32) {
	c := r.m.Config
	H, KV, D := c.Heads, c.KVHeads, c.HeadDim
	row := KV * D
	for i, seq := range s.seqOf {
		kc := s.seqs[seq]
		if len(kc.k[l]) == 0 {
			kc.first[l] = r.b.Pos[i]
		}
		kc.k[l] = append(kc.k[l], k[i*row:(i+1)*row]...)
		kc.v[l] = append(kc.v[l], v[i*row:(i+1)*row]...)
	}
	window := 0
	if !c.IsGlobal(l) {
		window = c.SlidingWindow
	}
	scale := 1 / math.Sqrt(c.QueryPreAttnScalar)
	group := H / KV
	parallelFor(len(s.seqOf), func(lo, hi int) {
		for i := lo; i < hi; i++ {
			if i%64 == 0 && s.canceled() {
				return
			}
			kc := s.seqs[s.seqOf[i]]
			p := r.b.Pos[i]
			from := kc.first[l]
			if window > 0 {
				from = max(from, p-int32(window)+1)
			}
			n := int(p-from) + 1
			base := int(from - kc.first[l])
			scores := make([]float64, n)
			for h := 0; h < H; h++ {
				g := h / group
				qi := q[(i*H+h)*D : (i*H+h+1)*D]
				m := math.Inf(-1)
				for j := 0; j < n; j++ {
					kj := kc.k[l][((base+j)*KV+g)*D : ((base+j)*KV+g+1)*D]
					scores[j] = scale * float64(dot(qi, kj))
					m = max(m, scores[j])
				}
				var sum float64
				for j := range scores {
					scores[j] = math.Exp(scores[j] - m)
					sum += scores[j]
				}
				o := out[(i*H+h)*D : (i*H+h+1)*D]
				acc := make([]float64, D)
				for j, e := range scores {
					vj := kc.v[l][((base+j)*KV+g)*D : ((base+j)*KV+g+1)*D]
					for d := range acc {
						acc[d] += e / sum * float64(vj[d])
					}
				}
				for d := range o {
					o[d] = float32(acc[d])
				}
			}
		}
	})
	if window == 0 {
		return
	}
	for _, kc := range s.seqs {
		if drop := len(kc.k[l])/row - window; drop > 0 {
			kc.k[l] = append(kc.k[l][:0], kc.k[l][drop*row:]...)
			kc.v[l] = append(kc.v[l][:0], kc.v[l][drop*row:]...)
			kc.first[l] += int32(drop)
		}
	}
}

// Generate continues each prompt (token ids, <bos> included) with up to
// MaxNewTokens tokens, the adapter applied when a is not nil, and returns
// the new tokens of each. The prompts are evaluated together, then one
// token per unfinished sequence per step, each attending to its own cache.
// emit, when not nil, receives every token as it is chosen.
func (m *Model) Generate(ctx context.Context, a *Adapter, prompts [][]int32, o GenerateOptions, emit func(seq int, tok int32)) ([][]int32, error) {
	c := m.Config
	st := &decodeState{ctx: ctx}
	for range prompts {
		st.seqs = append(st.seqs, &kvCache{first: make([]int32, c.Layers), k: make([][]float32, c.Layers), v: make([][]float32, c.Layers)})
	}
	V := c.VocabSize
	return DecodeLoop(ctx, c, prompts, o, emit, func(ids, pos []int32, seqOf []int, _ StepWant) (StepResult, error) {
		st.seqOf = seqOf
		logits, err := m.lastLogits(a, st, ids, pos)
		if err != nil {
			return StepResult{}, err
		}
		rows := make([][]float32, len(logits)/V)
		for i := range rows {
			rows[i] = logits[i*V : (i+1)*V]
		}
		return StepResult{Logits: rows}, nil
	})
}

// DecodeStep runs one step of decoding: the tokens ids at positions pos,
// token i of sequence seqOf[i] (a sequence's tokens together, in order),
// each attending to its sequence's earlier tokens, and returns for each
// sequence's last token of the step, in the order of seqOf, what want asks
// for: its logits, or a form of them a device can hand over in fewer bytes
// (StepResult). The first step holds whole prompts; each later one a token
// per unfinished sequence.
type DecodeStep func(ids, pos []int32, seqOf []int, want StepWant) (StepResult, error)

// StepWant is what DecodeLoop needs of a step's logits.
type StepWant struct {
	// Greedy: the most likely token is enough (StepResult.Best).
	Greedy bool
	// TopK, when positive (sampling from the TopK most likely), allows
	// Candidates that hold those TopK.
	TopK int
}

// StepResult is a step's outcome per sequence, in one of three forms:
// Logits, the whole vocabulary's; Best (only when the step wanted
// Greedy), the most likely token, the lowest id among equal logits, NaN
// never chosen; Candidates (only when it wanted TopK), each sequence's
// likeliest tokens.
type StepResult struct {
	Logits     [][]float32
	Best       []int32
	Candidates []Candidates
}

// Candidates are some of a sequence's next tokens with their logits, in any
// order: at least the TopK first in pick's order (higher logit, then lower
// id), so that a draw among the top k of them is the draw among the top k
// of the whole vocabulary.
type Candidates struct {
	IDs    []int32
	Logits []float32
}

// DecodeLoop is decoding, whatever device runs the steps: the checks, the
// choice of each next token (greedy or sampled, each sequence from its own
// stream), stop tokens and MaxNewTokens.
func DecodeLoop(ctx context.Context, c *Config, prompts [][]int32, o GenerateOptions, emit func(seq int, tok int32), step DecodeStep) ([][]int32, error) {
	if err := o.Validate(); err != nil {
		return nil, err
	}
	var ids, pos []int32
	var seqOf []int
	for i, p := range prompts {
		if len(p) == 0 {
			return nil, fmt.Errorf("prompt %d is empty", i)
		}
		for j, id := range p {
			ids, pos, seqOf = append(ids, id), append(pos, int32(j)), append(seqOf, i)
		}
	}
	if o.Streams != nil && len(o.Streams) != len(prompts) {
		return nil, fmt.Errorf("%d streams for %d prompts", len(o.Streams), len(prompts))
	}
	if max := maxLen(prompts) + o.MaxNewTokens; max > c.MaxPositions {
		return nil, fmt.Errorf("a prompt and %d new tokens reach position %d, beyond the model's %d", o.MaxNewTokens, max, c.MaxPositions)
	}
	rngs := make([]*rand.Rand, len(prompts))
	for i := range rngs {
		stream := uint64(i)
		if o.Streams != nil {
			stream = o.Streams[i]
		}
		rngs[i] = rand.New(rand.NewPCG(o.Seed, stream))
	}
	stop := map[int32]bool{}
	for _, s := range o.Stop {
		stop[s] = true
	}
	out := make([][]int32, len(prompts))
	done := make([]bool, len(prompts))
	next := make([]int32, len(prompts))
	for {
		if err := ctx.Err(); err != nil {
			return out, err
		}
		want := StepWant{Greedy: o.Temperature == 0}
		if !want.Greedy {
			want.TopK = o.TopK
		}
		res, err := step(ids, pos, seqOf, want)
		if err != nil {
			return nil, err
		}
		if res.Best != nil && !want.Greedy || res.Candidates != nil && want.TopK == 0 {
			return nil, errors.New("a decoding step gave another form of logits than asked for")
		}
		// The last token of each sequence in this step gives its next token.
		// Draws from whole logits run side by side (each sequence has its
		// own stream, so they draw what they would one by one): one is
		// milliseconds at Gemma's vocabulary.
		row := 0
		var draws sync.WaitGroup
		for i := range seqOf {
			if i+1 < len(seqOf) && seqOf[i+1] == seqOf[i] {
				continue
			}
			s, r := seqOf[i], row
			switch {
			case res.Best != nil && r < len(res.Best):
				next[s] = res.Best[r]
			case res.Candidates != nil && r < len(res.Candidates):
				next[s] = pickAmong(res.Candidates[r], o, rngs[s])
			case res.Best == nil && res.Candidates == nil && r < len(res.Logits):
				draws.Go(func() { next[s] = pick(res.Logits[r], o, rngs[s]) })
			default:
				draws.Wait()
				return nil, fmt.Errorf("a decoding step gave %d rows for more sequences", max(len(res.Logits), len(res.Best), len(res.Candidates)))
			}
			row++
		}
		draws.Wait()
		ids, pos, seqOf = nil, nil, nil
		for s := range prompts {
			if done[s] {
				continue
			}
			out[s] = append(out[s], next[s])
			if emit != nil {
				emit(s, next[s])
			}
			if stop[next[s]] || len(out[s]) == o.MaxNewTokens {
				done[s] = true
				continue
			}
			ids, pos, seqOf = append(ids, next[s]), append(pos, int32(len(prompts[s])+len(out[s])-1)), append(seqOf, s)
		}
		if len(ids) == 0 {
			return out, nil
		}
	}
}

func maxLen(xs [][]int32) int {
	n := 0
	for _, x := range xs {
		n = max(n, len(x))
	}
	return n
}

// lastLogits runs the step's tokens through the model against the caches
// and returns the logits at each sequence's last token in the step, in
// sequence order.
func (m *Model) lastLogits(a *Adapter, st *decodeState, ids, pos []int32) ([]float32, error) {
	xf, err := m.cachedForward(a, st, ids, pos)
	if err != nil {
		return nil, err
	}
	H := m.Config.Hidden
	var last []float32
	for i := range st.seqOf {
		if i+1 == len(st.seqOf) || st.seqOf[i+1] != st.seqOf[i] {
			last = append(last, xf[i*H:(i+1)*H]...)
		}
	}
	n := len(last) / H
	logits := make([]float32, n*m.Config.VocabSize)
	Matmul(logits, last, m.Embed, n, m.Config.VocabSize, H, false)
	return logits, nil
}

// Argmax is greedy decoding's choice among logits: the index of the
// largest, the lowest among equals.
func Argmax(logits []float32) int {
	best := 0
	for i, v := range logits {
		if v > logits[best] {
			best = i
		}
	}
	return best
}

// pick chooses the next token from logits: the most likely (the lowest id
// among equals) when decoding greedily, else a draw after temperature,
// top-k and top-p (pickAmong, from the top_k most likely; or pickFromAll).
func pick(logits []float32, o GenerateOptions, rng *rand.Rand) int32 {
	if o.Temperature == 0 {
		return int32(Argmax(logits))
	}
	if o.TopK > 0 && o.TopK < len(logits) {
		// Only those k are selected to be sorted: sorting a 262k
		// vocabulary for every token would cost more than the model's step.
		idx := likeliestK(logits, o.TopK)
		c := Candidates{IDs: make([]int32, len(idx)), Logits: make([]float32, len(idx))}
		for i, id := range idx {
			c.IDs[i], c.Logits[i] = int32(id), logits[id]
		}
		return pickAmong(c, o, rng)
	}
	return pickFromAll(logits, o, rng)
}

// pickFromAll draws from every token of logits, in likelier's order.
func pickFromAll(logits []float32, o GenerateOptions, rng *rand.Rand) int32 {
	sc := fullScratch.Get().(*fullDraw)
	defer fullScratch.Put(sc)
	pairs := sc.order(logits)
	sc.vals = slices.Grow(sc.vals[:0], len(pairs))
	for _, x := range pairs {
		sc.vals = append(sc.vals, logits[uint32(x)])
	}
	sc.p = slices.Grow(sc.p[:0], len(pairs))
	return int32(uint32(pairs[drawInto(sc.vals, o, rng, sc.p)]))
}

// fullDraw holds the buffers of a draw from every logit (8 MB at Gemma's
// vocabulary), kept between draws: allocated anew for each, their zeroing
// and the pages' first touch took some 15% of a draw.
type fullDraw struct {
	keys, tmp []uint64
	vals      []float32
	p         []float64
}

var fullScratch = sync.Pool{New: func() any { return new(fullDraw) }}

// order sorts every token of logits in likelier's order into d's buffers
// and returns them as key<<32 | id, where key's ascending order is the
// logits' descending order: a stable radix sort of the keys, three digits
// of 11 bits, over the ids in ascending order, so that equal logits keep
// the lower id first. A comparison sort of a 262k vocabulary took a tenth
// of a second, every token of every sequence that samples without a top_k.
func (d *fullDraw) order(logits []float32) []uint64 {
	const bits = 11
	a := slices.Grow(d.keys[:0], len(logits))[:len(logits)]
	b := slices.Grow(d.tmp[:0], len(logits))[:len(logits)]
	var count [3][1 << bits]int // each digit of the keys, counted in one pass
	for i, v := range logits {
		k := descendingKey(v)
		a[i] = uint64(k)<<32 | uint64(i)
		count[0][k&(1<<bits-1)]++
		count[1][k>>bits&(1<<bits-1)]++
		count[2][k>>(2*bits)]++
	}
	for pass := range count {
		c := &count[pass]
		shift := 32 + bits*pass
		if len(a) == 0 || c[a[0]>>shift&(1<<bits-1)] == len(a) {
			continue // one digit throughout: the pass would leave the order as it is
		}
		at := 0 // each digit's first place
		for dg, n := range c {
			c[dg] = at
			at += n
		}
		for _, x := range a {
			dg := x >> shift & (1<<bits - 1)
			b[c[dg]] = x
			c[dg]++
		}
		a, b = b, a
	}
	d.keys, d.tmp = a, b
	return a
}

// descendingKey maps a logit to a key whose ascending order is the
// logits' descending order, -0 to 0's key (they are equal logits), NaN
// after every number.
func descendingKey(v float32) uint32 {
	if v != v {
		return math.MaxUint32
	}
	bits := math.Float32bits(v)
	if v == 0 {
		bits = 0
	}
	if bits>>31 != 0 {
		return bits // a negative number: the more negative, the larger its bits
	}
	return ^bits &^ (1 << 31) // a non-negative number: the larger, the smaller the key
}

// likelier reports whether token a (logit va) comes before token b (vb)
// among a draw's candidates: the higher logit first, the lower id among
// equals (the order a stable sort by logit gives).
func likelier(va, vb float32, a, b int) bool {
	if va != vb {
		return va > vb
	}
	return a < b
}

// pickAmong draws from candidates that hold the top_k (pick's, or a
// step's Candidates): sorted by likelier, cut to top_k where it is set,
// then drawn.
func pickAmong(c Candidates, o GenerateOptions, rng *rand.Rand) int32 {
	idx := make([]int, len(c.IDs))
	for i := range idx {
		idx[i] = i
	}
	slices.SortFunc(idx, func(a, b int) int {
		switch {
		case likelier(c.Logits[a], c.Logits[b], int(c.IDs[a]), int(c.IDs[b])):
			return -1
		case likelier(c.Logits[b], c.Logits[a], int(c.IDs[b]), int(c.IDs[a])):
			return 1
		}
		return 0
	})
	if o.TopK > 0 && len(idx) > o.TopK {
		idx = idx[:o.TopK]
	}
	vals := make([]float32, len(idx))
	for i, j := range idx {
		vals[i] = c.Logits[j]
	}
	return c.IDs[idx[draw(vals, o, rng)]]
}

// draw returns the position of one of the candidates' logits vals (most
// likely first), drawn by their probabilities after temperature, cut to
// top_p's mass.
//
// The weights are summed most likely first, and once one leaves the sum
// as it is, so does every later one (none is larger): the sum stops there,
// the same number, without the exponentials of a large vocabulary's
// negligible tail. The cut and the walk compute the weights they reach,
// so the draw is the one every weight computed would give.
func draw(vals []float32, o GenerateOptions, rng *rand.Rand) int {
	return drawInto(vals, o, rng, make([]float64, 0, len(vals)))
}

// drawInto is draw with the weights' buffer p (empty, its capacity
// len(vals)).
func drawInto(vals []float32, o GenerateOptions, rng *rand.Rand, p []float64) int {
	w := weights{vals: vals, temperature: o.Temperature, top: float64(vals[0]) / o.Temperature, p: p}
	n := len(vals)
	sum := w.sum(n)
	if o.TopP > 0 && o.TopP < 1 {
		// Keep the most likely tokens until their mass reaches top_p (the
		// token that crosses it included).
		var cum float64
		for i := range n {
			cum += w.at(i) / sum
			if cum >= o.TopP {
				n = i + 1
				break
			}
		}
		sum = w.sum(n)
	}
	u := rng.Float64() * sum
	for i := range n {
		v := w.at(i)
		if u < v {
			return i
		}
		u -= v
	}
	return n - 1
}

// weights are a draw's candidates' weights after temperature, relative to
// the first (the most likely), computed as they are first needed.
type weights struct {
	vals             []float32
	temperature, top float64
	p                []float64
}

func (w *weights) at(i int) float64 {
	if i >= len(w.p) {
		w.extend(i + 1)
	}
	return w.p[i]
}

// extend computes the weights up to at least the first n, in steps that
// double (a sum that stops early computes at most about twice the
// weights it adds), each long step spread over the cores: at Gemma's
// vocabulary the exponentials are most of a draw from every logit.
func (w *weights) extend(n int) {
	from := len(w.p)
	to := min(len(w.vals), max(n, 2*from, 256))
	w.p = slices.Grow(w.p, to-from)[:to]
	p, vals := w.p[from:to], w.vals[from:to]
	const span = 1 << 14
	fill := func(lo, hi int) {
		for i := lo; i < hi; i++ {
			p[i] = math.Exp(float64(vals[i])/w.temperature - w.top)
		}
	}
	if len(p) < 2*span {
		fill(0, len(p))
		return
	}
	var spans sync.WaitGroup
	for lo := 0; lo < len(p); lo += span {
		spans.Go(func() { fill(lo, min(lo+span, len(p))) })
	}
	spans.Wait()
}

// sum is the first n weights' sum in order, up to the first weight that
// leaves it unchanged.
func (w *weights) sum(n int) float64 {
	var sum float64
	for i := range n {
		v := w.at(i)
		if sum+v == sum {
			break
		}
		sum += v
	}
	return sum
}

// likeliestK returns the indices of the k tokens of logits that come
// first in likelier's order, in no particular order: a heap of the k best
// so far, its worst at the root. A logit below the root's cannot enter, so
// most of a large vocabulary costs one comparison each.
func likeliestK(logits []float32, k int) []int {
	h := make([]int, 0, k)
	before := func(a, b int) bool { return likelier(logits[a], logits[b], a, b) }
	down := func(i int) {
		for {
			w, l, r := i, 2*i+1, 2*i+2
			if l < len(h) && before(h[w], h[l]) {
				w = l
			}
			if r < len(h) && before(h[w], h[r]) {
				w = r
			}
			if w == i {
				return
			}
			h[i], h[w] = h[w], h[i]
			i = w
		}
	}
	for i, v := range logits {
		switch {
		case len(h) < k:
			h = append(h, i)
			for c := len(h) - 1; c > 0; {
				p := (c - 1) / 2
				if !before(h[p], h[c]) {
					break
				}
				h[p], h[c] = h[c], h[p]
				c = p
			}
		case v < logits[h[0]]:
			// below the root: not likelier (a NaN on either side is not
			// below, and goes on to before)
		case before(i, h[0]):
			h[0] = i
			down(0)
		}
	}
	return h
}
