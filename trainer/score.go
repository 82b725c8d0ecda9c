package trainer

import (
	"fmt"
	"math"
	"sort"
)

// TokenQuery asks for the log-probability of token ID as the next token
// after position Pos of a batch (so given the tokens of Pos's example up
// to and including Pos).
type TokenQuery struct {
	Pos int
	ID  int32
}

// TokenLogProb answers a TokenQuery: the log-softmax of the logits at the
// position, at the token, and whether the token is the most likely one
// there (the first of equals, as torch's argmax picks).
type TokenLogProb struct {
	LogProb float64
	Greedy  bool
}

// TokenLogProbs runs the batch forward (the adapter applied when a is not
// nil, without dropout) and answers each query. Only the queried
// positions' logits over the vocabulary are computed, lossChunk positions
// at a time, and each position once however many tokens are asked of it,
// so scoring costs what the training loss costs on the same tokens. The
// batch's Targets are not used; the log-probabilities are those whose
// negatives LMHeadLoss sums.
func (m *Model) TokenLogProbs(a *Adapter, b *Batch, queries []TokenQuery) ([]TokenLogProb, error) {
	r, err := newRunner(m, a, b, 0, false)
	if err != nil {
		return nil, err
	}
	V := m.Config.VocabSize
	for i, q := range queries {
		if q.Pos < 0 || q.Pos >= r.T {
			return nil, fmt.Errorf("query %d: position %d outside the batch of %d tokens", i, q.Pos, r.T)
		}
		if q.ID < 0 || int(q.ID) >= V {
			return nil, fmt.Errorf("query %d: token %d outside the vocabulary [0, %d)", i, q.ID, V)
		}
	}
	xf, _, _, _, _ := r.forward(false)
	return headLogProbs(xf, m.Embed, V, m.Config.Hidden, queries), nil
}

// headLogProbs answers queries from the final hidden states h[T×D] through
// the tied head E[V×D].
func headLogProbs(h, E []float32, V, D int, queries []TokenQuery) []TokenLogProb {
	// The distinct positions, in order, and which queries ask of each.
	byPos := map[int][]int{}
	var positions []int
	for i, q := range queries {
		if _, ok := byPos[q.Pos]; !ok {
			positions = append(positions, q.Pos)
		}
		byPos[q.Pos] = append(byPos[q.Pos], i)
	}
	sort.Ints(positions)
	out := make([]TokenLogProb, len(queries))
	buf := getScratch(lossChunk * V)
	defer scratch.Put(buf)
	logits := (*buf)[:lossChunk*V]
	hc := make([]float32, lossChunk*D)
	for c0 := 0; c0 < len(positions); c0 += lossChunk {
		chunk := positions[c0:min(c0+lossChunk, len(positions))]
		n := len(chunk)
		for r, t := range chunk {
			copy(hc[r*D:(r+1)*D], h[t*D:(t+1)*D])
		}
		lmHeadLogits(logits[:n*V], hc[:n*D], E, n, V, D)
		parallelFor(n, func(lo, hi int) {
			for r := lo; r < hi; r++ {
				row := logits[r*V : (r+1)*V]
				qs := byPos[chunk[r]]
				mx, arg := row[0], 0
				for i, v := range row {
					if v > mx {
						mx, arg = v, i
					}
				}
				picked := make([]float64, len(qs))
				for j, qi := range qs {
					picked[j] = float64(row[queries[qi].ID])
				}
				// As LMHeadLoss: max + log(sum exp(v - max)) - logit.
				lse := float64(mx) + math.Log(expShift(row, mx))
				for j, qi := range qs {
					out[qi] = TokenLogProb{LogProb: picked[j] - lse, Greedy: int(queries[qi].ID) == arg}
				}
			}
		})
	}
	return out
}
