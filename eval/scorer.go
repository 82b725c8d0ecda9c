// Package eval scores Gemma 3 models and adapters: the mean token loss of
// held-out chat records, and multiple-choice questions by log-likelihood as
// lm-evaluation-harness scores MMLU.
//
// Everything it computes goes through one small interface, Scorer: the
// log-likelihood of token continuations given token contexts (lm-evaluation-
// harness's loglikelihood requests). ModelScorer serves it on the CPU
// reference model of package trainer; another device serves the same
// requests by implementing Scorer.
package eval

import (
	"context"
	"fmt"
	"sort"

	"gemmaft/trainer"
)

// A Request asks for the log-likelihood of Continuation given Context:
// the sum over the continuation's tokens of log p(token | everything
// before it). Context starts with <bos> and is not empty; neither is
// Continuation.
type Request struct {
	Context, Continuation []int32
}

// Len is the number of tokens the model reads for the request.
func (r Request) Len() int { return len(r.Context) + len(r.Continuation) - 1 }

// Result is a request's answer.
type Result struct {
	// LogLik is the sum of the continuation's token log-probabilities.
	LogLik float64
	// Greedy is whether every continuation token is the most likely one at
	// its position (lm-evaluation-harness's is_greedy).
	Greedy bool
}

// Scorer computes log-likelihoods of continuations.
type Scorer interface {
	// LogLikelihoods answers the requests, in order.
	LogLikelihoods(ctx context.Context, reqs []Request) ([]Result, error)
	// MaxLength is the most tokens one request may hold (context and
	// continuation): the model's context length.
	MaxLength() int
}

// CheckLengths reports the first request longer than the scorer takes.
// what names a request for the message ("question 12 (acc prompt)").
func CheckLengths(s Scorer, reqs []Request, what func(i int) string) error {
	max := s.MaxLength()
	for i, r := range reqs {
		if n := len(r.Context) + len(r.Continuation); n > max {
			return fmt.Errorf("%s is %d tokens long, more than the model's context of %d tokens", what(i), n, max)
		}
	}
	return nil
}

// ModelScorer serves requests on the CPU reference model, the adapter
// applied when Adapter is not nil.
type ModelScorer struct {
	Model   *trainer.Model
	Adapter *trainer.Adapter
	// BatchTokens is about how many tokens one forward pass takes (0:
	// 4096); requests are laid end to end as the examples of a packed row,
	// each attending only to itself.
	BatchTokens int
	// Progress, when set, is called after each forward pass with the
	// requests answered so far.
	Progress func(done, total int)
}

// MaxLength is the model's context length.
func (s *ModelScorer) MaxLength() int { return s.Model.Config.MaxPositions }

// LogLikelihoods evaluates the requests in batches. Requests with one-token
// continuations and the same context (the answer letters of one question)
// share one run of the context and one row of logits.
func (s *ModelScorer) LogLikelihoods(ctx context.Context, reqs []Request) ([]Result, error) {
	for i, r := range reqs {
		if len(r.Context) == 0 || len(r.Continuation) == 0 {
			return nil, fmt.Errorf("request %d: empty context or continuation", i)
		}
	}
	if err := CheckLengths(s, reqs, func(i int) string { return fmt.Sprintf("request %d", i) }); err != nil {
		return nil, err
	}
	budget := s.BatchTokens
	if budget <= 0 {
		budget = 4096
	}
	// A segment is one sequence the model reads: a request's context and
	// all but the last continuation token, or a context shared by several
	// one-token continuations.
	type segment struct {
		ids  []int32
		reqs []int // the requests it answers
	}
	var segs []segment
	shared := map[string]int{} // context → index in segs
	for i, r := range reqs {
		if len(r.Continuation) == 1 {
			key := idsKey(r.Context)
			if si, ok := shared[key]; ok {
				segs[si].reqs = append(segs[si].reqs, i)
				continue
			}
			shared[key] = len(segs)
			segs = append(segs, segment{ids: r.Context, reqs: []int{i}})
			continue
		}
		ids := make([]int32, 0, r.Len())
		ids = append(append(ids, r.Context...), r.Continuation[:len(r.Continuation)-1]...)
		segs = append(segs, segment{ids: ids, reqs: []int{i}})
	}
	// Long segments first, so batches fill evenly; results go back by index.
	order := make([]int, len(segs))
	for i := range order {
		order[i] = i
	}
	sort.SliceStable(order, func(a, b int) bool { return len(segs[order[a]].ids) > len(segs[order[b]].ids) })

	out := make([]Result, len(reqs))
	done := 0
	for lo := 0; lo < len(order); {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		b := &trainer.Batch{}
		var queries []trainer.TokenQuery
		var owner []int // the request of each query
		hi := lo
		for ; hi < len(order) && (hi == lo || len(b.IDs)+len(segs[order[hi]].ids) <= budget); hi++ {
			sg := segs[order[hi]]
			start := int32(len(b.IDs))
			for j, id := range sg.ids {
				b.IDs = append(b.IDs, id)
				b.Pos = append(b.Pos, int32(j))
				b.SegStart = append(b.SegStart, start)
				b.Targets = append(b.Targets, trainer.IgnoreIndex)
			}
			for _, ri := range sg.reqs {
				r := reqs[ri]
				// The continuation's k-th token is predicted at the
				// position before it.
				for k, id := range r.Continuation {
					queries = append(queries, trainer.TokenQuery{Pos: int(start) + len(r.Context) - 1 + k, ID: id})
					owner = append(owner, ri)
				}
			}
		}
		lps, err := s.Model.TokenLogProbs(s.Adapter, b, queries)
		if err != nil {
			return nil, err
		}
		for _, si := range order[lo:hi] {
			for _, ri := range segs[si].reqs {
				out[ri].Greedy = true
			}
		}
		for qi, lp := range lps {
			r := &out[owner[qi]]
			r.LogLik += lp.LogProb
			r.Greedy = r.Greedy && lp.Greedy
		}
		for _, si := range order[lo:hi] {
			done += len(segs[si].reqs)
		}
		if s.Progress != nil {
			s.Progress(done, len(reqs))
		}
		lo = hi
	}
	return out, nil
}

func idsKey(ids []int32) string {
	b := make([]byte, 4*len(ids))
	for i, id := range ids {
		b[4*i], b[4*i+1], b[4*i+2], b[4*i+3] = byte(id), byte(id>>8), byte(id>>16), byte(id>>24)
	}
	return string(b)
}
