package dataset

import (
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"
	"sync/atomic"
	"unicode/utf8"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"

	"gemmaft/chat"
	"gemmaft/internal/lines"
)

// Layout is what a source's rows hold.
type Layout string

const (
	// LayoutAlpaca rows are instruction, input and output texts, with an
	// optional system text: the columns ColInstruction, ColInput,
	// ColOutput and ColSystem.
	LayoutAlpaca Layout = ""
	// LayoutShareGPT rows hold a conversation as ShareGPT writes it: a list
	// "conversations" of {"from", "value"} objects.
	LayoutShareGPT Layout = "sharegpt"
	// LayoutOpenAI rows hold a conversation as OpenAI's chat format writes
	// it: a list "messages" of {"role", "content"} objects.
	LayoutOpenAI Layout = "openai"
	// LayoutText rows are one plain text each (the column ColText), for
	// continued pretraining: a column of JSON lines or Parquet, or a whole
	// .txt file.
	LayoutText Layout = "text"
)

// ParseLayout reads a layout's name; "alpaca" is LayoutAlpaca.
func ParseLayout(s string) (Layout, error) {
	switch l := Layout(s); l {
	case "alpaca":
		return LayoutAlpaca, nil
	case LayoutAlpaca, LayoutShareGPT, LayoutOpenAI, LayoutText:
		return l, nil
	}
	return "", fmt.Errorf("dataset: unknown layout %q (want alpaca, sharegpt, openai or text)", s)
}

// Conversational reports whether rows of the layout are conversations.
func (l Layout) Conversational() bool { return l == LayoutShareGPT || l == LayoutOpenAI }

// Column names of the conversation and text layouts' record batches.
const (
	// ColMessages holds a conversation: a list of {role, content}, roles
	// mapped to system, user and assistant.
	ColMessages = "messages"
	// ColText holds a plain text.
	ColText = "text"
)

// MessagesType is the Arrow type of ColMessages.
var MessagesType = arrow.ListOf(arrow.StructOf(
	arrow.Field{Name: "role", Type: arrow.BinaryTypes.String},
	arrow.Field{Name: "content", Type: arrow.BinaryTypes.String},
))

// ColumnNames are the names SourceOptions.Columns maps for a layout, in
// the order of the file's columns: the conversation list and its
// elements' role and content fields for conversations.
func (l Layout) ColumnNames() []string {
	switch l {
	case LayoutShareGPT:
		return []string{"conversations", "from", "value"}
	case LayoutOpenAI:
		return []string{ColMessages, "role", "content"}
	case LayoutText:
		return []string{ColText}
	}
	return []string{ColInstruction, ColInput, ColOutput}
}

// DefaultRoles maps the role names conversations use to ours: ShareGPT's
// human and gpt, Gemma's own model, and system, user and assistant as they
// are, in any case (Human, GPT). SourceOptions.Roles adds to it.
var DefaultRoles = map[string]string{
	"system": "system", "user": "user", "assistant": "assistant",
	"human": "user", "gpt": "assistant", "model": "assistant",
}

// roleMap is the roles of a conversation source: DefaultRoles with the
// options' own.
func roleMap(extra map[string]string) (map[string]string, error) {
	m := make(map[string]string, len(DefaultRoles)+len(extra))
	for k, v := range DefaultRoles {
		m[k] = v
	}
	for k, v := range extra {
		switch v {
		case "system", "user", "assistant":
		default:
			return nil, fmt.Errorf("dataset: role %q maps to %q; roles map to system, user or assistant", k, v)
		}
		m[k] = v
	}
	return m, nil
}

// convFields names a conversation's fields in a file.
type convFields struct {
	list, role, content string
	roles               map[string]string // the file's role names to ours
	// unweighted counts the model's messages (JSON) marked weight 0 or
	// false, Axolotl's switch for a turn not to train, which is not read
	// here: they train as every other.
	unweighted atomic.Int64
	// toolCalls counts the messages (JSON) with OpenAI's tool_calls, which
	// a text template has no place for: only their content is read.
	toolCalls atomic.Int64
}

// rawMessage is one message as a file holds it, before its role is mapped.
type rawMessage struct {
	role    string
	content string
	null    bool     // the content was null (read as "")
	parts   []string // the texts of a content given as a list of parts
}

// message maps a raw message's role and makes its content the text the
// Gemma 3 template renders: a content given as a list of text parts
// renders each part stripped, one after the other (a system message's
// first part, unstripped, is all the template reads of it, so a system
// message of several parts is refused rather than cut). i is the
// message's place in the conversation, for errors.
// prev is the role of the message before it ("" for the first), which
// says, of a role name not known, which role it likely is.
func (c *convFields) message(i int, m rawMessage, prev string) (chat.Message, error) {
	role, ok := c.roles[m.role]
	if !ok {
		role, ok = c.roles[strings.ToLower(m.role)]
	}
	if !ok {
		known := make([]string, 0, len(c.roles))
		for k := range c.roles {
			known = append(known, k)
		}
		sort.Strings(known)
		likely := "user"
		if prev == "user" {
			likely = "assistant" // it answers the user
		}
		return chat.Message{}, fmt.Errorf("message %d: unknown role %q (known: %s); map it with roles:, e.g. roles: {%s: %s}",
			i, m.role, strings.Join(known, ", "), m.role, likely)
	}
	content := m.content
	if m.parts != nil {
		if role == "system" {
			if len(m.parts) != 1 {
				return chat.Message{}, fmt.Errorf("message %d: a system message of %d parts; the Gemma 3 template reads only the first, so give its text as one string", i, len(m.parts))
			}
			content = m.parts[0]
		} else {
			var b strings.Builder
			for _, p := range m.parts {
				b.WriteString(chat.Strip(p))
			}
			content = b.String()
		}
	}
	return chat.Message{Role: role, Content: content}, nil
}

// checkTurns checks a conversation against what the Gemma 3 template
// accepts and what training needs: an optional system message first, then
// turns alternating user, assistant, user, …, ending with an assistant
// turn (a last user turn would have no answer to learn).
func checkTurns(msgs []chat.Message) error {
	if len(msgs) == 0 {
		return errors.New("no messages")
	}
	turns := msgs
	if msgs[0].Role == "system" {
		turns = msgs[1:]
	}
	if len(turns) == 0 {
		return errors.New("only a system message: nothing to learn")
	}
	off := len(msgs) - len(turns)
	for i, m := range turns {
		want := "user"
		if i%2 == 1 {
			want = "assistant"
		}
		if m.Role == want {
			continue
		}
		if m.Role == "system" {
			return fmt.Errorf("message %d is a system message; only the first message may be one", i+off)
		}
		after := "the start"
		if i > 0 {
			after = fmt.Sprintf("message %d (%s)", i+off-1, turns[i-1].Role)
		} else if off > 0 {
			after = "the system message"
		}
		return fmt.Errorf("message %d is %s after %s, want %s: roles must alternate user/assistant/user/assistant/... after an optional system message",
			i+off, m.Role, after, want)
	}
	if turns[len(turns)-1].Role != "assistant" {
		return fmt.Errorf("the last message (%d) is a user turn with no answer to learn", len(msgs)-1)
	}
	return nil
}

// A flawError is a flaw of one conversation's messages (a null message or
// role, a content part that is not text). Like a conversation the chat
// template refuses, it is the record's, not the file's: invalid: drop drops
// and counts it.
type flawError struct{ error }

func (e flawError) Unwrap() error { return e.error }

// flaw marks err as a flaw of the record's conversation.
func flaw(format string, args ...any) error { return flawError{fmt.Errorf(format, args...)} }

// parseJSONMessages reads a conversation given as JSON: an array of
// objects with the role and content fields. A content may be a string,
// null, or a list of parts ({"type": "text", "text": ...}).
func (c *convFields) parseJSONMessages(raw json.RawMessage) ([]rawMessage, error) {
	var elems []map[string]json.RawMessage
	if err := json.Unmarshal(raw, &elems); err != nil {
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) {
			return nil, fmt.Errorf("column %s: want a list of objects with %q and %q", c.list, c.role, c.content)
		}
		return nil, fmt.Errorf("column %s: %w", c.list, err)
	}
	out := make([]rawMessage, len(elems))
	for i, e := range elems {
		if e == nil {
			return nil, flaw("column %s: message %d is null", c.list, i)
		}
		role, ok := e[c.role]
		if !ok || len(role) == 0 {
			return nil, fmt.Errorf("column %s: message %d has no field %q%s", c.list, i, c.role, fieldsHint(e))
		}
		if role[0] == 'n' {
			return nil, flaw("column %s: message %d has a null %s", c.list, i, c.role)
		}
		if role[0] != '"' {
			return nil, flaw("column %s: message %d, field %s: %s, not a string", c.list, i, c.role, JSONKind(role[0]))
		}
		if err := DecodeJSONString(role, &out[i].role); err != nil {
			return nil, fmt.Errorf("column %s: message %d, field %s: %w", c.list, i, c.role, err)
		}
		if w, ok := e["weight"]; ok && (string(w) == "0" || string(w) == "false" || string(w) == "0.0") {
			// Only a model turn trains: weight 0 elsewhere says nothing new.
			role, known := c.roles[out[i].role]
			if !known {
				role = c.roles[strings.ToLower(out[i].role)]
			}
			if role == "assistant" {
				c.unweighted.Add(1)
			}
		}
		if tc := e["tool_calls"]; len(tc) > 2 && tc[0] == '[' { // not null, not []
			c.toolCalls.Add(1)
		}
		content, ok := e[c.content]
		if !ok {
			return nil, fmt.Errorf("column %s: message %d has no field %q%s", c.list, i, c.content, fieldsHint(e))
		}
		switch content[0] {
		case 'n':
			out[i].null = true
		case '"':
			if err := DecodeJSONString(content, &out[i].content); err != nil {
				return nil, fmt.Errorf("column %s: message %d, field %s: %w", c.list, i, c.content, err)
			}
		case '[':
			parts, err := textParts(content)
			if err != nil {
				return nil, flaw("column %s: message %d, field %s: %w", c.list, i, c.content, err)
			}
			out[i].parts = parts
		default:
			return nil, fmt.Errorf("column %s: message %d, field %s: %s, not a string", c.list, i, c.content, JSONKind(content[0]))
		}
	}
	return out, nil
}

// textParts reads a content given as a list of parts; only text parts are
// supported (this is text fine-tuning). Each text goes through
// DecodeJSONString, as every other string of a conversation does.
func textParts(raw json.RawMessage) ([]string, error) {
	var elems []json.RawMessage
	if err := json.Unmarshal(raw, &elems); err != nil {
		return nil, err
	}
	parts := make([]struct {
		Type string          `json:"type"`
		Text json.RawMessage `json:"text"`
	}, len(elems))
	for i, e := range elems {
		if e[0] != '{' || json.Unmarshal(e, &parts[i]) != nil {
			kind := JSONKind(e[0])
			if e[0] == '{' {
				kind = "an object whose type is not a string"
			}
			return nil, fmt.Errorf("a list whose element %d is %s: a content given as a list holds {\"type\": \"text\", \"text\": \"...\"} parts", i, kind)
		}
	}
	out := make([]string, len(parts))
	for i, p := range parts {
		if p.Type != "text" {
			return nil, fmt.Errorf("part %d is of type %q; only text parts are supported", i, p.Type)
		}
		if len(p.Text) == 0 || p.Text[0] != '"' {
			return nil, fmt.Errorf("part %d has no text string", i)
		}
		if err := DecodeJSONString(p.Text, &out[i]); err != nil {
			return nil, fmt.Errorf("part %d: %w", i, err)
		}
	}
	return out, nil
}

// DecodeJSONString decodes a JSON string literal, refusing invalid UTF-8
// and lone surrogate escapes (such as \ud800, which decodes to U+FFFD:
// text that never held U+FFFD itself was not valid Unicode).
func DecodeJSONString(raw json.RawMessage, dst *string) error {
	if !utf8.Valid(raw) {
		return fmt.Errorf("invalid UTF-8 at byte %d", decodedOffset(raw, lines.InvalidUTF8At(string(raw))))
	}
	if err := json.Unmarshal(raw, dst); err != nil {
		return err
	}
	if hasSurrogateEscape(raw) && strings.Count(*dst, "\uFFFD") > strings.Count(string(raw), "\uFFFD")+strings.Count(strings.ToLower(string(raw)), `\ufffd`) {
		return errors.New("unpaired UTF-16 surrogate escape (not valid Unicode)")
	}
	return nil
}

func fieldsHint(e map[string]json.RawMessage) string {
	keys := make([]string, 0, len(e))
	for k := range e {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return "; it has " + quoteList(keys) + " (map names with columns:)"
}

// MessagesColumn reads a ColMessages column (MessagesType) row by row.
type MessagesColumn struct {
	list          *array.List
	role, content *array.String
}

// NewMessagesColumn checks that a is a ColMessages column.
func NewMessagesColumn(a arrow.Array) (*MessagesColumn, error) {
	l, ok := a.(*array.List)
	if !ok || !arrow.TypeEqual(a.DataType(), MessagesType) {
		return nil, fmt.Errorf("a column of %s, not of messages (%s)", a.DataType(), MessagesType)
	}
	st := l.ListValues().(*array.Struct)
	return &MessagesColumn{list: l, role: st.Field(0).(*array.String), content: st.Field(1).(*array.String)}, nil
}

// Row returns the conversation of row i.
func (c *MessagesColumn) Row(i int) []chat.Message {
	start, end := c.list.ValueOffsets(i)
	out := make([]chat.Message, 0, end-start)
	for j := int(start); j < int(end); j++ {
		out = append(out, chat.Message{Role: c.role.Value(j), Content: c.content.Value(j)})
	}
	return out
}
