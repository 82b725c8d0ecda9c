package trainer

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"
)

// logSoftmaxAt is log p(id) from one position's logits, in float64.
func logSoftmaxAt(logits []float32, id int32) (float64, bool) {
	mx := math.Inf(-1)
	arg := 0
	for i, v := range logits {
		if float64(v) > mx {
			mx, arg = float64(v), i
		}
	}
	var s float64
	for _, v := range logits {
		s += math.Exp(float64(v) - mx)
	}
	return float64(logits[id]) - mx - math.Log(s), arg == int(id)
}

// TestContinuationLogProbsMatchLogits: every token's log-probability, with
// contexts shared by several continuations and longer than the sliding
// window, equals the log-softmax of Model.Logits of the whole sequence at
// the position before it; greedy is the argmax there. With and without an
// adapter.
func TestContinuationLogProbsMatchLogits(t *testing.T) {
	m, a := decodeModel(t)
	V := m.Config.VocabSize
	rng := rand.New(rand.NewPCG(5, 6))
	seq := func(n int) []int32 {
		out := make([]int32, n)
		for i := range out {
			out[i] = int32(rng.IntN(V))
		}
		return out
	}
	groups := []ContinuationGroup{
		{Context: append([]int32{2}, seq(8)...), Continuations: [][]int32{seq(1), seq(1), seq(4), seq(2)}},
		{Context: []int32{2}, Continuations: [][]int32{seq(5)}},
		{Context: append([]int32{2}, seq(3)...), Continuations: [][]int32{seq(1)}},
	}
	// A continuation whose tokens are the greedy ones, so that Greedy is
	// seen true as well as false.
	b0, _ := NewBatch([]PackedRow{{InputIDs: groups[0].Context, Labels: groups[0].Context, SeqLengths: []int32{int32(len(groups[0].Context))}}})
	for _, ad := range []*Adapter{nil, a} {
		t.Run(fmt.Sprintf("adapter=%v", ad != nil), func(t *testing.T) {
			lg, err := m.Logits(ad, b0)
			if err != nil {
				t.Fatal(err)
			}
			last := lg[(len(groups[0].Context)-1)*V:]
			best := int32(0)
			for i, v := range last[:V] {
				if v > last[best] {
					best = int32(i)
				}
			}
			gs := append([]ContinuationGroup(nil), groups...)
			gs[0].Continuations = append(append([][]int32(nil), gs[0].Continuations...), []int32{best})
			got, err := m.ContinuationLogProbs(ad, gs)
			if err != nil {
				t.Fatal(err)
			}
			sawGreedy := false
			for g, gr := range gs {
				for k, cont := range gr.Continuations {
					whole := append(append([]int32(nil), gr.Context...), cont...)
					b, err := NewBatch([]PackedRow{{InputIDs: whole, Labels: whole, SeqLengths: []int32{int32(len(whole))}}})
					if err != nil {
						t.Fatal(err)
					}
					logits, err := m.Logits(ad, b)
					if err != nil {
						t.Fatal(err)
					}
					for j, id := range cont {
						p := len(gr.Context) - 1 + j
						want, greedy := logSoftmaxAt(logits[p*V:(p+1)*V], id)
						lp := got[g][k][j]
						if math.Abs(lp.LogProb-want) > 1e-6 {
							t.Errorf("group %d continuation %d token %d: log-prob %.8f, from the logits %.8f", g, k, j, lp.LogProb, want)
						}
						if lp.Greedy != greedy {
							t.Errorf("group %d continuation %d token %d: greedy %v, the logits say %v", g, k, j, lp.Greedy, greedy)
						}
						sawGreedy = sawGreedy || greedy
					}
				}
			}
			if !sawGreedy {
				t.Error("no greedy token was checked")
			}
		})
	}
}

// TestContinuationLogProbsSumToTheLoss: the negated log-probabilities of
// labelled tokens sum to Model.Loss of the same sequence.
func TestContinuationLogProbsSumToTheLoss(t *testing.T) {
	m, a := decodeModel(t)
	ids := prompts(m.Config.VocabSize, 14)[0]
	labels := make([]int32, len(ids))
	for i := range labels {
		labels[i] = IgnoreIndex
		if i >= 6 {
			labels[i] = ids[i]
		}
	}
	b, _ := NewBatch([]PackedRow{{InputIDs: ids, Labels: labels, SeqLengths: []int32{int32(len(ids))}}})
	sum, n, err := m.Loss(a, b)
	if err != nil {
		t.Fatal(err)
	}
	got, err := m.ContinuationLogProbs(a, []ContinuationGroup{{Context: ids[:6], Continuations: [][]int32{ids[6:]}}})
	if err != nil {
		t.Fatal(err)
	}
	var s float64
	for _, lp := range got[0][0] {
		s -= lp.LogProb
	}
	if n != len(ids)-6 || math.Abs(s-sum) > 1e-5*sum {
		t.Errorf("scored %.8f over %d tokens, Loss %.8f over %d", s, len(got[0][0]), sum, n)
	}
}

func TestContinuationLogProbsRejects(t *testing.T) {
	m, _ := decodeModel(t)
	V := int32(m.Config.VocabSize)
	for name, g := range map[string]ContinuationGroup{
		"empty context":      {Context: nil, Continuations: [][]int32{{1}}},
		"empty continuation": {Context: []int32{2}, Continuations: [][]int32{{}}},
		"token outside":      {Context: []int32{2}, Continuations: [][]int32{{V}}},
	} {
		if _, err := m.ContinuationLogProbs(nil, []ContinuationGroup{g}); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
}
