package eval

import (
	"context"
	"errors"
	"fmt"
	"math"

	"gemmaft/chat"
	"gemmaft/tokenizer"
)

// ChatRecord is one held-out conversation, as the sources give them.
type ChatRecord struct {
	Instruction, Input, Output, System string
}

// LossRequests renders each record with the Gemma 3 chat template and
// tokenizes it as the tokenize stage does for training (exactly one <bos>,
// labels from the assistant turns' byte spans through the token offsets,
// or every token when lossOnAll), and makes one request per run of
// trained tokens: the tokens before it as the context, the run as the
// continuation. The summed log-likelihoods of the requests are then the
// negated summed training loss of the records. A record with nothing to
// score (an empty text) is an error: its loss is undefined.
func LossRequests(tok *tokenizer.Tokenizer, recs []ChatRecord, lossOnAll bool) ([]Request, []int, error) {
	bos, ok := tok.ID("<bos>")
	if !ok {
		return nil, nil, errors.New("the tokenizer has no <bos> token; only Gemma-style tokenizers are supported")
	}
	texts := make([]string, len(recs))
	spans := make([][]chat.Span, len(recs))
	for i, r := range recs {
		text, sp, err := chat.RenderGemma3(chat.Alpaca(r.Instruction, r.Input, r.Output, r.System))
		if err != nil {
			return nil, nil, fmt.Errorf("record %d: %w", i, err)
		}
		texts[i] = text
		for _, s := range sp {
			if s.Role == "assistant" {
				spans[i] = append(spans[i], s)
			}
		}
	}
	// The template writes <bos> itself; the post-processor's is not added.
	ids, offs := tok.EncodeBatchOffsets(texts, false)
	var reqs []Request
	var recOf []int // the record of each request
	for i := range recs {
		if len(ids[i]) == 0 {
			return nil, nil, fmt.Errorf("record %d renders to no tokens", i)
		}
		if ids[i][0] != bos {
			ids[i] = append([]int32{bos}, ids[i]...)
			offs[i] = append([][2]int{{0, 0}}, offs[i]...)
		}
		trained := make([]bool, len(ids[i]))
		if lossOnAll {
			for j := range trained {
				trained[j] = true
			}
		} else {
			trained = chat.LabelMask(offs[i], spans[i])
		}
		// The first token is never predicted.
		trained[0] = false
		n := 0
		for j := 1; j < len(ids[i]); {
			if !trained[j] {
				j++
				continue
			}
			k := j
			for k < len(ids[i]) && trained[k] {
				k++
			}
			reqs = append(reqs, Request{Context: ids[i][:j], Continuation: ids[i][j:k]})
			recOf = append(recOf, i)
			n++
			j = k
		}
		if n == 0 {
			return nil, nil, fmt.Errorf("record %d has no tokens to score (an empty answer?)", i)
		}
	}
	return reqs, recOf, nil
}

// LossResult is the loss of a set of records.
type LossResult struct {
	Records int `json:"records"`
	// Tokens is the number of scored tokens.
	Tokens int `json:"tokens"`
	// Loss is the mean token cross-entropy (nats), Perplexity its exp.
	Loss       float64 `json:"loss"`
	Perplexity float64 `json:"perplexity"`
}

// Loss scores LossRequests' requests: the mean over all scored tokens of
// the negative log-likelihood, as training's loss is the mean over the
// trained tokens of a step (not a mean of per-record means).
func Loss(ctx context.Context, s Scorer, reqs []Request, records int) (LossResult, error) {
	res, err := s.LogLikelihoods(ctx, reqs)
	if err != nil {
		return LossResult{}, err
	}
	var sum float64
	tokens := 0
	for i, r := range res {
		sum -= r.LogLik
		tokens += len(reqs[i].Continuation)
	}
	out := LossResult{Records: records, Tokens: tokens}
	if tokens > 0 {
		out.Loss = sum / float64(tokens)
		out.Perplexity = math.Exp(out.Loss)
	}
	return out, nil
}
