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
	// BatchTokens is about how many tokens one batch of requests holds
	// (0: 4096).
	BatchTokens int
	// Progress, when set, is called after each forward pass with the
	// requests answered so far.
	Progress func(done, total int)
}

// MaxLength is the model's context length.
func (s *ModelScorer) MaxLength() int { return s.Model.Config.MaxPositions }

// LogLikelihoods evaluates the requests in batches. Requests with the same
// context (the choices of one question) share one run of the context:
// the continuations run against copies of its key/value cache.
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
	type group struct {
		ctx    []int32
		reqs   []int // the requests it answers, in order
		tokens int   // what the model reads for it
	}
	var groups []*group
	byCtx := map[string]*group{}
	for i, r := range reqs {
		key := idsKey(r.Context)
		g := byCtx[key]
		if g == nil {
			g = &group{ctx: r.Context, tokens: len(r.Context)}
			byCtx[key] = g
			groups = append(groups, g)
		}
		g.reqs = append(g.reqs, i)
		g.tokens += len(r.Continuation) - 1
	}
	out := make([]Result, len(reqs))
	done := 0
	for lo := 0; lo < len(groups); {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		var batch []trainer.ContinuationGroup
		tokens := 0
		hi := lo
		for ; hi < len(groups) && (hi == lo || tokens+groups[hi].tokens <= budget); hi++ {
			g := groups[hi]
			cg := trainer.ContinuationGroup{Context: g.ctx}
			for _, ri := range g.reqs {
				cg.Continuations = append(cg.Continuations, reqs[ri].Continuation)
			}
			batch = append(batch, cg)
			tokens += g.tokens
		}
		lps, err := s.Model.ContinuationLogProbs(s.Adapter, batch)
		if err != nil {
			return nil, err
		}
		for bi, g := range groups[lo:hi] {
			for k, ri := range g.reqs {
				r := Result{Greedy: true}
				for _, lp := range lps[bi][k] {
					r.LogLik += lp.LogProb
					r.Greedy = r.Greedy && lp.Greedy
				}
				out[ri] = r
			}
			done += len(g.reqs)
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

// SessionScorer serves requests on a trainer session that returns logits
// (the GPU backend's): requests are packed end to end as examples of rows
// of up to MaxTokens tokens, and each continuation token is scored from
// the logits at the position before it. Each request reads its whole
// context; the GPU makes that cheaper than sharing it.
type SessionScorer struct {
	Session trainer.LogitSession
	// MaxTokens is the session's micro-batch (SessionConfig.MaxTokens).
	MaxTokens int
	Progress  func(done, total int)
}

// MaxLength is the model's context length, or the micro-batch if shorter.
func (s *SessionScorer) MaxLength() int {
	return min(s.Session.Model().Config.MaxPositions, s.MaxTokens)
}

// LogLikelihoods packs the requests into rows and scores them row by row.
func (s *SessionScorer) LogLikelihoods(ctx context.Context, reqs []Request) ([]Result, error) {
	for i, r := range reqs {
		if len(r.Context) == 0 || len(r.Continuation) == 0 {
			return nil, fmt.Errorf("request %d: empty context or continuation", i)
		}
	}
	if err := CheckLengths(s, reqs, func(i int) string { return fmt.Sprintf("request %d", i) }); err != nil {
		return nil, err
	}
	out := make([]Result, len(reqs))
	var row trainer.PackedRow
	var inRow []int // the requests of row, in order
	flush := func() error {
		if len(inRow) == 0 {
			return nil
		}
		b, err := trainer.NewBatch([]trainer.PackedRow{row})
		if err != nil {
			return err
		}
		logits, err := s.Session.PositionLogits(b)
		if err != nil {
			return err
		}
		k := 0
		for _, ri := range inRow {
			r := Result{Greedy: true}
			for _, id := range reqs[ri].Continuation {
				if k >= len(logits) {
					return fmt.Errorf("the session returned %d positions' logits for more continuation tokens", len(logits))
				}
				lp := trainer.TokenLogProbs(logits[k], []int32{id})[0]
				r.LogLik += lp.LogProb
				r.Greedy = r.Greedy && lp.Greedy
				k++
			}
			out[ri] = r
		}
		row, inRow = trainer.PackedRow{}, nil
		return nil
	}
	for i, r := range reqs {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		n := len(r.Context) + len(r.Continuation)
		if len(row.InputIDs)+n > s.MaxTokens {
			if err := flush(); err != nil {
				return nil, err
			}
			if s.Progress != nil {
				s.Progress(i, len(reqs))
			}
		}
		// The continuation's tokens are the labels; the context's are not.
		for j := range n {
			id, lab := int32(0), int32(trainer.IgnoreIndex)
			if j < len(r.Context) {
				id = r.Context[j]
			} else {
				id = r.Continuation[j-len(r.Context)]
				lab = id
			}
			row.InputIDs, row.Labels, row.PositionIDs = append(row.InputIDs, id), append(row.Labels, lab), append(row.PositionIDs, int32(j))
		}
		row.SeqLengths = append(row.SeqLengths, int32(n))
		inRow = append(inRow, i)
	}
	if err := flush(); err != nil {
		return nil, err
	}
	if s.Progress != nil {
		s.Progress(len(reqs), len(reqs))
	}
	return out, nil
}
