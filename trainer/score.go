package trainer

import (
	"fmt"
	"math"
	"sort"
)

// ContinuationGroup is a context and continuations of it to score.
// Context starts with <bos> and is not empty; no continuation is empty.
type ContinuationGroup struct {
	Context       []int32
	Continuations [][]int32
}

// TokenLogProb is the log-probability the model gives one token after
// what precedes it (the log-softmax of the logits there), and whether the
// token is the most likely one there (the first of equals, as torch's
// argmax picks).
type TokenLogProb struct {
	LogProb float64
	Greedy  bool
}

// ContinuationLogProbs scores continuations of contexts, the adapter
// applied when a is not nil: out[g][c][k] is the log-probability of token
// k of continuation c of group g given the group's context and the
// continuation's tokens before k. Each context runs through the model
// once, however many continuations it has (the choices of a question):
// all contexts together, with the key/value caches of decoding, then every
// continuation together against a copy of its context's cache. Only the
// scored positions' logits over the vocabulary are computed, lossChunk
// positions at a time. The log-probabilities are those whose negatives
// LMHeadLoss sums, up to the rounding of the cached attention.
func (m *Model) ContinuationLogProbs(a *Adapter, groups []ContinuationGroup) ([][][]TokenLogProb, error) {
	c := m.Config
	V := c.VocabSize
	check := func(g, k int, ids []int32) error {
		for _, id := range ids {
			if id < 0 || int(id) >= V {
				return fmt.Errorf("group %d (%d): token %d outside the vocabulary [0, %d)", g, k, id, V)
			}
		}
		return nil
	}
	for g, gr := range groups {
		if len(gr.Context) == 0 {
			return nil, fmt.Errorf("group %d: empty context", g)
		}
		if err := check(g, -1, gr.Context); err != nil {
			return nil, err
		}
		for k, cont := range gr.Continuations {
			if len(cont) == 0 {
				return nil, fmt.Errorf("group %d: continuation %d is empty", g, k)
			}
			if n := len(gr.Context) + len(cont) - 1; n > c.MaxPositions {
				return nil, fmt.Errorf("group %d: continuation %d reaches position %d, beyond the model's %d", g, k, n, c.MaxPositions)
			}
			if err := check(g, k, cont); err != nil {
				return nil, err
			}
		}
	}
	newCache := func() *kvCache {
		return &kvCache{first: make([]int32, c.Layers), k: make([][]float32, c.Layers), v: make([][]float32, c.Layers)}
	}
	// Step one: the contexts.
	ctxState := &decodeState{}
	var ids, pos []int32
	last := make([]int, len(groups)) // row of each context's last token
	for g, gr := range groups {
		ctxState.seqs = append(ctxState.seqs, newCache())
		for j, id := range gr.Context {
			ids, pos, ctxState.seqOf = append(ids, id), append(pos, int32(j)), append(ctxState.seqOf, g)
		}
		last[g] = len(ids) - 1
	}
	h1, err := m.cachedForward(a, ctxState, ids, pos)
	if err != nil {
		return nil, err
	}
	// Step two: every continuation but its last token, each against a copy
	// of its context's cache.
	contState := &decodeState{}
	ids, pos = ids[:0], pos[:0]
	type at struct{ g, k, row int } // continuation k of group g starts at row
	var starts []at
	for g, gr := range groups {
		for k, cont := range gr.Continuations {
			if len(cont) < 2 {
				continue
			}
			seq := len(contState.seqs)
			contState.seqs = append(contState.seqs, ctxState.seqs[g].clone())
			starts = append(starts, at{g, k, len(ids)})
			for j, id := range cont[:len(cont)-1] {
				ids, pos, contState.seqOf = append(ids, id), append(pos, int32(len(gr.Context)+j)), append(contState.seqOf, seq)
			}
		}
	}
	var h2 []float32
	if len(ids) > 0 {
		if h2, err = m.cachedForward(a, contState, ids, pos); err != nil {
			return nil, err
		}
	}
	// The hidden states the scored tokens are predicted from: each
	// context's last, then step two's, and a query per scored token.
	D := c.Hidden
	h := make([]float32, 0, (len(groups)+len(h2)/D)*D)
	for _, r := range last {
		h = append(h, h1[r*D:(r+1)*D]...)
	}
	h = append(h, h2...)
	out := make([][][]TokenLogProb, len(groups))
	var queries []tokenQuery
	var where [][3]int
	for g, gr := range groups {
		out[g] = make([][]TokenLogProb, len(gr.Continuations))
		for k, cont := range gr.Continuations {
			out[g][k] = make([]TokenLogProb, len(cont))
			queries = append(queries, tokenQuery{row: g, id: cont[0]})
			where = append(where, [3]int{g, k, 0})
		}
	}
	for _, s := range starts {
		cont := groups[s.g].Continuations[s.k]
		for j := 1; j < len(cont); j++ {
			queries = append(queries, tokenQuery{row: len(groups) + s.row + j - 1, id: cont[j]})
			where = append(where, [3]int{s.g, s.k, j})
		}
	}
	for i, lp := range headLogProbs(h, m.Embed, V, D, queries) {
		w := where[i]
		out[w[0]][w[1]][w[2]] = lp
	}
	return out, nil
}

// cachedForward runs tokens through the model against the caches of st
// (the decoding path) and returns the final hidden states of every token.
func (m *Model) cachedForward(a *Adapter, st *decodeState, ids, pos []int32) ([]float32, error) {
	b := &Batch{IDs: ids, Pos: pos, SegStart: make([]int32, len(ids)), Targets: make([]int32, len(ids))}
	for i := range b.Targets {
		b.Targets[i] = IgnoreIndex
	}
	r, err := newRunner(m, a, b, 0, false)
	if err != nil {
		return nil, err
	}
	r.kv = st
	xf, _, _, _, _ := r.forward(false)
	if st.canceled() {
		return nil, st.ctx.Err()
	}
	return xf, nil
}

// clone copies a sequence's cache, so that two continuations of one
// context extend it apart.
func (kc *kvCache) clone() *kvCache {
	out := &kvCache{first: append([]int32(nil), kc.first...), k: make([][]float32, len(kc.k)), v: make([][]float32, len(kc.v))}
	for l := range kc.k {
		out.k[l] = append([]float32(nil), kc.k[l]...)
		out.v[l] = append([]float32(nil), kc.v[l]...)
	}
	return out
}

// tokenQuery asks for the log-probability of token id after the hidden
// state in row row.
type tokenQuery struct {
	row int
	id  int32
}

// headLogProbs answers queries from final hidden states h[rows×D] through
// the tied head E[V×D]; each row's logits are computed once however many
// queries ask of it.
func headLogProbs(h, E []float32, V, D int, queries []tokenQuery) []TokenLogProb {
	byRow := map[int][]int{}
	var rows []int
	for i, q := range queries {
		if _, ok := byRow[q.row]; !ok {
			rows = append(rows, q.row)
		}
		byRow[q.row] = append(byRow[q.row], i)
	}
	sort.Ints(rows)
	out := make([]TokenLogProb, len(queries))
	buf := getScratch(lossChunk * V)
	defer scratch.Put(buf)
	logits := (*buf)[:lossChunk*V]
	hc := make([]float32, lossChunk*D)
	for c0 := 0; c0 < len(rows); c0 += lossChunk {
		chunk := rows[c0:min(c0+lossChunk, len(rows))]
		n := len(chunk)
		for r, t := range chunk {
			copy(hc[r*D:(r+1)*D], h[t*D:(t+1)*D])
		}
		lmHeadLogits(logits[:n*V], hc[:n*D], E, n, V, D)
		parallelFor(n, func(lo, hi int) {
			for r := lo; r < hi; r++ {
				qs := byRow[chunk[r]]
				ids := make([]int32, len(qs))
				for j, qi := range qs {
					ids[j] = queries[qi].id
				}
				for j, lp := range TokenLogProbs(logits[r*V:(r+1)*V], ids) {
					out[qs[j]] = lp
				}
			}
		})
	}
	return out
}

// TokenLogProbs is the log-softmax of one position's logits at ids, and
// whether each id is the most likely token there (the first of equals, as
// torch's argmax picks): max + log(sum exp(v − max)) − logit, as
// LMHeadLoss computes it. It overwrites logits (with exp(v − max)).
func TokenLogProbs(logits []float32, ids []int32) []TokenLogProb {
	mx, arg := logits[0], 0
	for i, v := range logits {
		if v > mx {
			mx, arg = v, i
		}
	}
	out := make([]TokenLogProb, len(ids))
	for j, id := range ids {
		out[j] = TokenLogProb{LogProb: float64(logits[id]), Greedy: int(id) == arg}
	}
	lse := float64(mx) + math.Log(expShift(logits, mx))
	for j := range out {
		out[j].LogProb -= lse
	}
	return out
}
