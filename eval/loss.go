package eval

import (
	"context"
	"errors"
	"fmt"
	"math"

	"gemmaft/chat"
	"gemmaft/tokenizer"
	"gemmaft/trainer"
)

// ChatRecord is one held-out record, as the sources give them: an Alpaca
// record (Instruction, Input, Output and System), a conversation
// (Messages, when not nil) or a plain text (Text, when Plain).
type ChatRecord struct {
	Instruction, Input, Output, System string
	Messages                           []chat.Message
	Text                               string
	Plain                              bool
}

// Values of LossOptions.LossOn, as the tokenize stage names them.
const (
	LossOnAssistant     = "assistant"
	LossOnLastAssistant = "last_assistant"
	LossOnAll           = "all"
)

// LossOptions say which tokens training learned, as the tokenize stage
// did: LossOn (LossOnAssistant when empty) for chat records, and whether
// plain texts end with <eos>.
type LossOptions struct {
	LossOn  string
	Newline bool // the "\n" after each trained <end_of_turn> is trained too
	EOS     bool
}

// LossRequests renders each record with the Gemma 3 chat template and
// tokenizes it as the tokenize stage does for training (exactly one <bos>,
// labels from the assistant turns' byte spans through the token offsets:
// every turn's, the last one's, or every token, as opts.LossOn says; a
// plain text is <bos>, its tokens and <eos> when opts.EOS, every token
// learned), and makes one request per run of trained tokens (see
// LabelRequests). A record with nothing to score (an empty text) is an
// error: its loss is undefined.
func LossRequests(tok *tokenizer.Tokenizer, recs []ChatRecord, opts LossOptions) ([]Request, []int, error) {
	bos, ok := tok.ID("<bos>")
	if !ok {
		return nil, nil, errors.New("the tokenizer has no <bos> token; only Gemma-style tokenizers are supported")
	}
	eos := int32(-1)
	if opts.EOS {
		if eos, ok = tok.ID("<eos>"); !ok {
			return nil, nil, errors.New("the tokenizer has no <eos> token")
		}
	}
	switch opts.LossOn {
	case "":
		opts.LossOn = LossOnAssistant
	case LossOnAssistant, LossOnLastAssistant, LossOnAll:
	default:
		return nil, nil, fmt.Errorf("unknown loss_on %q", opts.LossOn)
	}
	texts := make([]string, len(recs))
	spans := make([][]chat.Span, len(recs))
	for i, r := range recs {
		if r.Plain {
			texts[i] = r.Text
			continue
		}
		msgs := r.Messages
		if msgs == nil {
			msgs = chat.Alpaca(r.Instruction, r.Input, r.Output, r.System)
		}
		text, sp, err := chat.RenderGemma3(msgs)
		if err != nil {
			return nil, nil, &RecordError{i, err}
		}
		texts[i] = text
		for _, s := range sp {
			if s.Role == "assistant" {
				spans[i] = append(spans[i], s)
			}
		}
		if opts.LossOn == LossOnLastAssistant && len(spans[i]) > 1 {
			spans[i] = spans[i][len(spans[i])-1:]
		}
		if opts.Newline {
			spans[i] = chat.ThroughNewline(text, spans[i])
		}
	}
	// The template writes <bos> itself; the post-processor's is not added.
	ids, offs := tok.EncodeBatchOffsets(texts, false)
	labels := make([][]int32, len(recs))
	for i, r := range recs {
		if r.Plain && texts[i] == "" || len(ids[i]) == 0 {
			return nil, nil, &RecordError{i, errors.New("renders to no tokens")}
		}
		if ids[i][0] != bos {
			ids[i] = append([]int32{bos}, ids[i]...)
			offs[i] = append([][2]int{{0, 0}}, offs[i]...)
		}
		var trained []bool
		switch {
		case r.Plain:
			if eos >= 0 {
				ids[i] = append(ids[i], eos)
			}
		case opts.LossOn != LossOnAll:
			trained = chat.LabelMask(offs[i], spans[i])
		}
		labels[i] = make([]int32, len(ids[i]))
		for j, id := range ids[i] {
			labels[i][j] = id
			if trained != nil && !trained[j] {
				labels[i][j] = trainer.IgnoreIndex
			}
		}
	}
	return LabelRequests(ids, labels)
}

// LabelRequests makes the requests that score tokenized records as
// training does: a token is learned where its label is not -100 (the
// first token never is: nothing predicts it), and each run of learned
// tokens is one request, the tokens before it as the context and the run
// as the continuation. The summed log-likelihoods of the requests are then
// the negated summed training loss of the records. It also returns each
// request's record. A record with nothing learned is an error.
func LabelRequests(ids, labels [][]int32) ([]Request, []int, error) {
	var reqs []Request
	var recOf []int
	for i := range ids {
		if len(labels[i]) != len(ids[i]) {
			return nil, nil, &RecordError{i, fmt.Errorf("%d labels for %d tokens", len(labels[i]), len(ids[i]))}
		}
		n := 0
		for j := 1; j < len(ids[i]); {
			if labels[i][j] == trainer.IgnoreIndex {
				j++
				continue
			}
			k := j
			for k < len(ids[i]) && labels[i][k] != trainer.IgnoreIndex {
				k++
			}
			reqs = append(reqs, Request{Context: ids[i][:j], Continuation: ids[i][j:k]})
			recOf = append(recOf, i)
			n++
			j = k
		}
		if n == 0 {
			return nil, nil, &RecordError{i, errors.New("has no tokens to score (an empty answer?)")}
		}
	}
	return reqs, recOf, nil
}

// A RecordError is what is wrong with one record of LossRequests or
// LabelRequests, by its index, for the caller to name its place.
type RecordError struct {
	Record int
	Err    error
}

func (e *RecordError) Error() string { return fmt.Sprintf("record %d: %v", e.Record, e.Err) }
func (e *RecordError) Unwrap() error { return e.Err }

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
