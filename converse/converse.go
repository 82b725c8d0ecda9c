// Package converse answers conversations with a Gemma 3 model: it renders
// them with the chat template, tokenizes, decodes with a trainer.Decoder
// (the CPU reference, or any device that implements one) and turns the
// new tokens back into text, piece by piece as they come. The chat command
// and the generate stage are both built on it.
package converse

import (
	"context"
	"errors"
	"fmt"

	"gemmaft/chat"
	"gemmaft/tokenizer"
	"gemmaft/trainer"
)

// Conversation is a chat so far: an optional system text, the user's
// turns, and the model's answers to every turn but the last, which is the
// one to answer.
type Conversation struct {
	System  string
	Turns   []string
	Answers []string
}

// Messages returns the conversation as chat messages, the system text
// first when there is one.
func (c Conversation) Messages() ([]chat.Message, error) {
	if len(c.Turns) == 0 {
		return nil, errors.New("converse: a conversation without a user turn")
	}
	if len(c.Answers) != len(c.Turns)-1 {
		return nil, fmt.Errorf("converse: %d user turns and %d answers; the model answers the last turn, so there must be one answer fewer",
			len(c.Turns), len(c.Answers))
	}
	var msgs []chat.Message
	if c.System != "" {
		msgs = append(msgs, chat.Message{Role: "system", Content: c.System})
	}
	for i, t := range c.Turns {
		msgs = append(msgs, chat.Message{Role: "user", Content: t})
		if i < len(c.Answers) {
			msgs = append(msgs, chat.Message{Role: "assistant", Content: c.Answers[i]})
		}
	}
	return msgs, nil
}

// Prompt renders the conversation with Gemma 3's chat template and the
// generation prompt: the text the model continues to answer the last turn,
// byte for byte what transformers' apply_chat_template(...,
// add_generation_prompt=True) renders.
func (c Conversation) Prompt() (string, error) {
	msgs, err := c.Messages()
	if err != nil {
		return "", err
	}
	text, _, err := chat.RenderGemma3Prompt(msgs)
	return text, err
}

// Generator answers conversations with a decoder and its tokenizer.
type Generator struct {
	dec  trainer.Decoder
	tok  *tokenizer.Tokenizer
	stop []int32
}

// StopTokens are the tokens a Gemma 3 answer ends with.
var StopTokens = []string{"<end_of_turn>", "<eos>"}

// New returns a Generator that stops answers at <end_of_turn> and <eos>
// (and at extra ids, such as a generation_config.json's eos_token_id).
func New(dec trainer.Decoder, tok *tokenizer.Tokenizer, extraStop ...int32) (*Generator, error) {
	stop, err := stopIDs(tok)
	if err != nil {
		return nil, fmt.Errorf("converse: %w", err)
	}
	g := &Generator{dec: dec, tok: tok, stop: stop}
	for _, id := range extraStop {
		if !g.isStop(id) {
			g.stop = append(g.stop, id)
		}
	}
	return g, nil
}

func stopIDs(tok *tokenizer.Tokenizer) ([]int32, error) {
	var ids []int32
	for _, s := range StopTokens {
		id, ok := tok.ID(s)
		if !ok {
			return nil, fmt.Errorf("the tokenizer has no %s token; is it Gemma 3's?", s)
		}
		ids = append(ids, id)
	}
	return ids, nil
}

// CheckTokenizer says whether tok can serve a model of vocab ids: it has
// Gemma 3's stop tokens, and its vocabulary fits the model's embedding
// (added tokens past it may remain: Encode refuses a prompt that holds
// one). A caller that loads the model afterwards learns of a wrong
// tokenizer before the minutes a large checkpoint takes, rather than at
// some later prompt.
func CheckTokenizer(tok *tokenizer.Tokenizer, vocab int) error {
	if _, err := stopIDs(tok); err != nil {
		return err
	}
	if n := tok.ModelVocabSize(); n > vocab {
		return fmt.Errorf("the tokenizer's vocabulary has %d tokens, the model's %d: is it this model's tokenizer?", n, vocab)
	}
	return nil
}

func (g *Generator) isStop(id int32) bool {
	for _, s := range g.stop {
		if s == id {
			return true
		}
	}
	return false
}

// Stop lists the ids that end an answer.
func (g *Generator) Stop() []int32 { return append([]int32(nil), g.stop...) }

// Tokenizer is the generator's tokenizer.
func (g *Generator) Tokenizer() *tokenizer.Tokenizer { return g.tok }

// Context is the most positions a prompt and its answer may take.
func (g *Generator) Context() int { return g.dec.Info().Config.MaxPositions }

// Encode tokenizes a rendered prompt. The template writes <bos> itself, so
// the tokenizer adds none (one <bos>, as transformers' apply_chat_template
// with tokenize=True gives).
func (g *Generator) Encode(prompt string) ([]int32, error) {
	ids := g.tok.EncodeIDs(prompt, false)
	vocab := g.dec.Info().Config.VocabSize
	for _, id := range ids {
		if int(id) >= vocab {
			tok, _ := g.tok.Token(id)
			return nil, fmt.Errorf("converse: the prompt holds token %s (id %d), beyond the model's vocabulary of %d", tok, id, vocab)
		}
	}
	return ids, nil
}

// Reply is the model's answer to a conversation's last turn.
type Reply struct {
	// Text is the answer: the new tokens decoded without special tokens,
	// white space stripped as the chat template strips a turn (and as
	// FastChat's gen_model_answer stores answers).
	Text string
	// Tokens are the new tokens, the stop token included when one ended
	// the answer.
	Tokens []int32
	// PromptTokens is the length of the rendered conversation in tokens.
	PromptTokens int
	// Stopped says that a stop token ended the answer; false means it was
	// cut at MaxNewTokens.
	Stopped bool
}

// ContextError says that a prompt with room for its answer does not fit
// the model's context.
type ContextError struct {
	Conversation int // index in the batch
	PromptTokens int
	MaxNewTokens int
	Context      int
}

func (e *ContextError) Error() string {
	if e.PromptTokens >= e.Context {
		return fmt.Sprintf("the prompt is %d tokens long, beyond the model's context of %d positions", e.PromptTokens, e.Context)
	}
	return fmt.Sprintf("the prompt is %d tokens long and max_new_tokens %d more would reach position %d, beyond the model's context of %d",
		e.PromptTokens, e.MaxNewTokens, e.PromptTokens+e.MaxNewTokens, e.Context)
}

// Reply answers the last turn of each conversation, all of them decoded
// together. o.Stop is the generator's stop tokens when empty. emit, when
// not nil, receives each conversation's text as it grows, in pieces that
// never split a character.
func (g *Generator) Reply(ctx context.Context, convs []Conversation, o trainer.GenerateOptions, emit func(conv int, piece string)) ([]Reply, error) {
	if len(convs) == 0 {
		return nil, nil
	}
	if len(o.Stop) == 0 {
		o.Stop = g.stop
	}
	if err := o.Validate(); err != nil {
		return nil, err
	}
	prompts := make([][]int32, len(convs))
	for i, c := range convs {
		text, err := c.Prompt()
		if err != nil {
			return nil, err
		}
		if prompts[i], err = g.Encode(text); err != nil {
			return nil, err
		}
		if n := len(prompts[i]); n+o.MaxNewTokens > g.Context() {
			return nil, &ContextError{Conversation: i, PromptTokens: n, MaxNewTokens: o.MaxNewTokens, Context: g.Context()}
		}
	}
	var streams []*Streamer
	var cb func(int, int32)
	if emit != nil {
		streams = make([]*Streamer, len(convs))
		for i := range streams {
			streams[i] = NewStreamer(g.tok)
		}
		cb = func(seq int, tok int32) {
			if g.isStop(tok) {
				if s := streams[seq].Flush(); s != "" {
					emit(seq, s)
				}
				return
			}
			if s := streams[seq].Add(tok); s != "" {
				emit(seq, s)
			}
		}
	}
	out, err := g.dec.Generate(ctx, prompts, o, cb)
	if err != nil {
		return nil, err
	}
	stops := map[int32]bool{}
	for _, s := range o.Stop {
		stops[s] = true
	}
	replies := make([]Reply, len(convs))
	for i, toks := range out {
		r := Reply{Tokens: toks, PromptTokens: len(prompts[i])}
		body := toks
		if n := len(toks); n > 0 && stops[toks[n-1]] {
			r.Stopped, body = true, toks[:n-1]
		}
		if emit != nil && !r.Stopped {
			if s := streams[i].Flush(); s != "" {
				emit(i, s)
			}
		}
		text, err := g.Decode(body)
		if err != nil {
			return nil, err
		}
		r.Text = chat.Strip(text)
		replies[i] = r
	}
	return replies, nil
}

// Decode turns new tokens into text, leaving out special tokens and ids
// the tokenizer does not know (a model's embedding may be larger than its
// tokenizer), as transformers' decode(skip_special_tokens=True) does.
func (g *Generator) Decode(ids []int32) (string, error) {
	return decodeText(g.tok, ids)
}

func decodeText(tok *tokenizer.Tokenizer, ids []int32) (string, error) {
	known := ids[:0:0]
	for _, id := range ids {
		if _, ok := tok.Token(id); ok {
			known = append(known, id)
		}
	}
	return tok.Decode(known, true)
}
