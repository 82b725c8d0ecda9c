// Package chat renders conversations with chat templates, byte for byte as
// Hugging Face transformers renders the model's own Jinja template, and
// reports where each assistant turn lies in the text so that loss masks
// can be made from token offsets.
package chat

import (
	"errors"
	"fmt"
	"strings"
)

// Message is one turn of a conversation. Role is "system", "user" or
// "assistant".
type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

// Span is a byte range [Start, End) of a rendered text that belongs to a
// role: for assistant turns, the content and the closing <end_of_turn>,
// which are the tokens a model is trained on.
type Span struct {
	Role       string
	Start, End int
}

// Alpaca builds the conversation for an Alpaca record: one user turn (the
// instruction, then a blank line and the input when the input is not
// empty) and one assistant turn (the output), after a system message when
// system is not empty.
func Alpaca(instruction, input, output, system string) []Message {
	prompt := instruction
	if input != "" {
		prompt += "\n\n" + input
	}
	msgs := make([]Message, 0, 3)
	if system != "" {
		msgs = append(msgs, Message{Role: "system", Content: system})
	}
	return append(msgs, Message{Role: "user", Content: prompt}, Message{Role: "assistant", Content: output})
}

// ErrRoles is returned when turns do not alternate user/assistant; the
// Gemma 3 template raises the same error.
var ErrRoles = errors.New("chat: conversation roles must alternate user/assistant/user/assistant/...")

// RenderGemma3 renders msgs as Gemma 3's chat template does (without a
// generation prompt): <bos>, then each turn as
// "<start_of_turn>ROLE\n" + content.strip() + "<end_of_turn>\n", with the
// assistant role written "model". Gemma 3 has no system role: a leading
// system message's content (not stripped) and a blank line go in front of
// the first turn's content. It returns the text and one Span per assistant
// turn.
func RenderGemma3(msgs []Message) (string, []Span, error) {
	if len(msgs) == 0 {
		return "", nil, errors.New("chat: no messages")
	}
	prefix := ""
	loop := msgs
	if msgs[0].Role == "system" {
		prefix = msgs[0].Content + "\n\n"
		loop = msgs[1:]
	}
	var b strings.Builder
	size := len("<bos>") + len(prefix)
	for _, m := range loop {
		size += len(m.Content) + len("<start_of_turn>model\n<end_of_turn>\n")
	}
	b.Grow(size)
	b.WriteString("<bos>")
	var spans []Span
	for i, m := range loop {
		// The template's check: a user turn exactly at even positions.
		if (m.Role == "user") != (i%2 == 0) {
			return "", nil, fmt.Errorf("%w (message %d has role %q)", ErrRoles, i+len(msgs)-len(loop), m.Role)
		}
		role := m.Role
		if role == "assistant" {
			role = "model"
		}
		b.WriteString("<start_of_turn>")
		b.WriteString(role)
		b.WriteByte('\n')
		if i == 0 {
			b.WriteString(prefix)
		}
		start := b.Len()
		b.WriteString(Strip(m.Content))
		b.WriteString("<end_of_turn>")
		if role == "model" {
			spans = append(spans, Span{Role: "assistant", Start: start, End: b.Len()})
		}
		b.WriteByte('\n')
	}
	return b.String(), spans, nil
}

// RenderGemma3Prompt is RenderGemma3 with the template's generation prompt
// (add_generation_prompt=True): the text ends with "<start_of_turn>model\n",
// ready for the model to write the next assistant turn.
func RenderGemma3Prompt(msgs []Message) (string, []Span, error) {
	text, spans, err := RenderGemma3(msgs)
	if err != nil {
		return "", nil, err
	}
	return text + "<start_of_turn>model\n", spans, nil
}

// Strip removes leading and trailing white space as Python's str.strip()
// does, which is what Jinja's trim filter calls. Python's set is not Go's
// unicode.IsSpace: it also holds U+001C..U+001F (the information
// separators).
func Strip(s string) string {
	return strings.TrimFunc(s, isPythonSpace)
}

// isPythonSpace is Python 3's str.isspace for one character: Unicode
// White_Space plus the bidirectional classes B and S.
func isPythonSpace(r rune) bool {
	switch {
	case r <= 0x20:
		return r == ' ' || (r >= '\t' && r <= '\r') || (r >= 0x1c && r <= 0x1f)
	case r < 0x85:
		return false
	}
	switch r {
	case 0x85, 0xa0, 0x1680, 0x2028, 0x2029, 0x202f, 0x205f, 0x3000:
		return true
	}
	return r >= 0x2000 && r <= 0x200a
}

// ThroughNewline extends each span of text over the "\n" that follows it:
// the line break after <end_of_turn>, which TRL's assistant_only_loss
// template and Unsloth's train_on_responses_only train with the turn.
func ThroughNewline(text string, spans []Span) []Span {
	out := make([]Span, len(spans))
	for i, s := range spans {
		if s.End < len(text) && text[s.End] == '\n' {
			s.End++
		}
		out[i] = s
	}
	return out
}

// LabelMask says which tokens are trained on, given each token's byte
// offsets [start, end) in the rendered text and the spans from the
// renderer. It follows Hugging Face's return_assistant_tokens_mask: for
// each span, every token from the one holding the span's first byte
// through the one holding its last byte. A span whose first byte no token
// holds (the text was cut short) is skipped; one whose last byte no token
// holds runs to the end.
func LabelMask(offsets [][2]int, spans []Span) []bool {
	mask := make([]bool, len(offsets))
	holder := func(pos int) int {
		for k, o := range offsets {
			if o[0] <= pos && pos < o[1] {
				return k
			}
		}
		return -1
	}
	for _, s := range spans {
		if s.End <= s.Start {
			continue
		}
		first := holder(s.Start)
		if first < 0 {
			continue
		}
		last := holder(s.End - 1)
		if last < 0 {
			last = len(offsets) - 1
		}
		for k := first; k <= last; k++ {
			mask[k] = true
		}
	}
	return mask
}
