package dataset

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"

	"gemmaft/chat"
)

// readConversations reads every conversation of a source.
func readConversations(t testing.TB, opts SourceOptions) [][]chat.Message {
	t.Helper()
	s, err := Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	out, err := drainConversations(s)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func drainConversations(s *Source) ([][]chat.Message, error) {
	var out [][]chat.Message
	for {
		rec, err := s.Next(context.Background())
		if err == io.EOF {
			return out, nil
		}
		if err != nil {
			return out, err
		}
		if !arrow.TypeEqual(rec.Schema().Field(0).Type, MessagesType) || rec.NumCols() != 1 {
			return nil, &schemaError{rec.Schema()}
		}
		out = append(out, messagesOf(rec.Column(0).(*array.List))...)
		rec.Release()
	}
}

type schemaError struct{ s *arrow.Schema }

func (e *schemaError) Error() string { return "unexpected schema " + e.s.String() }

func writeFile(t *testing.T, name, data string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func msgs(pairs ...string) []chat.Message {
	var out []chat.Message
	for i := 0; i+1 < len(pairs); i += 2 {
		out = append(out, chat.Message{Role: pairs[i], Content: pairs[i+1]})
	}
	return out
}

func TestShareGPTAndOpenAI(t *testing.T) {
	sharegpt := writeFile(t, "s.jsonl", `{"id": 1, "conversations": [{"from": "human", "value": "Merhaba!"}, {"from": "gpt", "value": "Merhaba, nasıl yardımcı olabilirim?"}]}
{"conversations": [{"from": "system", "value": "Kısa yanıt ver."}, {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}, {"from": "human", "value": "Ya 3+3?"}, {"from": "gpt", "value": "6"}]}
`)
	want := [][]chat.Message{
		msgs("user", "Merhaba!", "assistant", "Merhaba, nasıl yardımcı olabilirim?"),
		msgs("system", "Kısa yanıt ver.", "user", "2+2?", "assistant", "4", "user", "Ya 3+3?", "assistant", "6"),
	}
	if got := readConversations(t, SourceOptions{Paths: []string{sharegpt}, Layout: LayoutShareGPT}); !reflect.DeepEqual(got, want) {
		t.Errorf("sharegpt:\n got %q\nwant %q", got, want)
	}

	// A system text goes in front of conversations that have none.
	withSys := [][]chat.Message{append(msgs("system", "Türkçe yanıtla."), want[0]...), want[1]}
	if got := readConversations(t, SourceOptions{Paths: []string{sharegpt}, Layout: LayoutShareGPT, SystemText: "Türkçe yanıtla."}); !reflect.DeepEqual(got, withSys) {
		t.Errorf("sharegpt with a system text:\n got %q\nwant %q", got, withSys)
	}

	// OpenAI's layout, with a content given as text parts (each stripped,
	// as the template renders them), a null content and mapped names.
	openai := writeFile(t, "o.jsonl", `{"msgs": [{"speaker": "kullanıcı", "text": [{"type": "text", "text": " Bir "}, {"type": "text", "text": "soru\n"}]}, {"speaker": "asistan", "text": null}], "sys": "Nazik ol."}
{"msgs": [{"speaker": "system", "text": [{"type": "text", "text": " Sistem "}]}, {"speaker": "kullanıcı", "text": "Soru"}, {"speaker": "asistan", "text": "Cevap"}], "sys": "kullanılmaz"}
`)
	opts := SourceOptions{Paths: []string{openai}, Layout: LayoutOpenAI,
		Columns:      map[string]string{"messages": "msgs", "role": "speaker", "content": "text"},
		Roles:        map[string]string{"kullanıcı": "user", "asistan": "assistant"},
		SystemColumn: "sys"}
	s, err := Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	got, err := drainConversations(s)
	if err != nil {
		t.Fatal(err)
	}
	want = [][]chat.Message{
		msgs("system", "Nazik ol.", "user", "Birsoru", "assistant", ""),
		msgs("system", " Sistem ", "user", "Soru", "assistant", "Cevap"),
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("openai:\n got %q\nwant %q", got, want)
	}
	if n := s.Nulls(); n.Columns["content"] != 1 || n.First["content"] != openai+" line 1" {
		t.Errorf("nulls %+v, want one null content at line 1", n)
	}
	// What the source renders is what the template renders of the parts.
	for _, c := range got {
		if _, _, err := chat.RenderGemma3(c); err != nil {
			t.Error(err)
		}
	}

	// The same conversations from Parquet: a list of structs, and text
	// holding the list as JSON.
	structs := writeParquet(t, "c.parquet", []arrow.Field{{Name: "conversations", Type: arrow.ListOf(arrow.StructOf(
		arrow.Field{Name: "from", Type: arrow.BinaryTypes.String, Nullable: true},
		arrow.Field{Name: "value", Type: arrow.BinaryTypes.String, Nullable: true},
		arrow.Field{Name: "weight", Type: arrow.PrimitiveTypes.Float64, Nullable: true},
	)), Nullable: true}}, func(b *array.RecordBuilder) {
		lb := b.Field(0).(*array.ListBuilder)
		sb := lb.ValueBuilder().(*array.StructBuilder)
		for _, conv := range [][]string{{"human", "Merhaba!", "gpt", "Merhaba, nasıl yardımcı olabilirim?"},
			{"system", "Kısa yanıt ver.", "human", "2+2?", "gpt", "4", "human", "Ya 3+3?", "gpt", "6"}} {
			lb.Append(true)
			for i := 0; i < len(conv); i += 2 {
				sb.Append(true)
				sb.FieldBuilder(0).(*array.StringBuilder).Append(conv[i])
				sb.FieldBuilder(1).(*array.StringBuilder).Append(conv[i+1])
				sb.FieldBuilder(2).(*array.Float64Builder).Append(1)
			}
		}
	})
	want = [][]chat.Message{
		msgs("user", "Merhaba!", "assistant", "Merhaba, nasıl yardımcı olabilirim?"),
		msgs("system", "Kısa yanıt ver.", "user", "2+2?", "assistant", "4", "user", "Ya 3+3?", "assistant", "6"),
	}
	if got := readConversations(t, SourceOptions{Paths: []string{structs}, Layout: LayoutShareGPT}); !reflect.DeepEqual(got, want) {
		t.Errorf("parquet structs:\n got %q\nwant %q", got, want)
	}
	jsonText := writeParquet(t, "j.parquet", []arrow.Field{{Name: "messages", Type: arrow.BinaryTypes.String}}, func(b *array.RecordBuilder) {
		for _, c := range want {
			data, _ := json.Marshal(c)
			b.Field(0).(*array.StringBuilder).Append(string(data))
		}
	})
	if got := readConversations(t, SourceOptions{Paths: []string{jsonText}, Layout: LayoutOpenAI}); !reflect.DeepEqual(got, want) {
		t.Errorf("parquet JSON text:\n got %q\nwant %q", got, want)
	}
	notJSON := writeParquet(t, "nj.parquet", []arrow.Field{{Name: "messages", Type: arrow.BinaryTypes.String}}, func(b *array.RecordBuilder) {
		b.Field(0).(*array.StringBuilder).Append("not json")
	})
	if err := openOrNext(SourceOptions{Paths: []string{notJSON}, Layout: LayoutOpenAI}); err == nil || !strings.Contains(err.Error(), "column messages: a text column read as a JSON list of messages, and this row's text is not JSON") {
		t.Errorf("a text column that is not JSON: %v", err)
	}
	// Shuffled and limited like any source.
	got = readConversations(t, SourceOptions{Paths: []string{structs, sharegpt}, Layout: LayoutShareGPT, Shuffle: true, Seed: 3, Limit: 3})
	if len(got) != 3 {
		t.Errorf("%d conversations, want 3", len(got))
	}
}

// TestParquetTextParts: OpenAI messages whose content is a list of text
// parts, as Hugging Face datasets store them in Parquet (a list of structs
// with type and text, and other fields, null), read as the same
// conversations from JSON lines read; other parts are refused, naming the
// row.
func TestParquetTextParts(t *testing.T) {
	type part struct{ typ, text string } // text "<null>": null
	type message struct {
		role  string
		parts []part // nil: a null content
	}
	convs := [][]message{
		{{"system", []part{{"text", " Kısa yanıtla. "}}}, {"user", []part{{"text", " Bir "}, {"text", "soru\n"}}}, {"assistant", []part{{"text", "Cevap."}}}},
		{{"user", []part{{"text", "Selam"}}}, {"assistant", nil}},
		{{"user", []part{}}, {"assistant", []part{{"text", "Boş soru."}}}},
	}
	partType := arrow.StructOf(
		arrow.Field{Name: "image", Type: arrow.BinaryTypes.String, Nullable: true},
		arrow.Field{Name: "text", Type: arrow.BinaryTypes.String, Nullable: true},
		arrow.Field{Name: "type", Type: arrow.BinaryTypes.String, Nullable: true},
	)
	fields := []arrow.Field{{Name: "messages", Type: arrow.ListOf(arrow.StructOf(
		arrow.Field{Name: "content", Type: arrow.ListOf(partType), Nullable: true},
		arrow.Field{Name: "role", Type: arrow.BinaryTypes.String, Nullable: true},
	)), Nullable: true}}
	write := func(convs [][]message) string {
		return writeParquet(t, "parts.parquet", fields, func(b *array.RecordBuilder) {
			lb := b.Field(0).(*array.ListBuilder)
			mb := lb.ValueBuilder().(*array.StructBuilder)
			cb := mb.FieldBuilder(0).(*array.ListBuilder)
			pb := cb.ValueBuilder().(*array.StructBuilder)
			for _, conv := range convs {
				lb.Append(true)
				for _, m := range conv {
					mb.Append(true)
					mb.FieldBuilder(1).(*array.StringBuilder).Append(m.role)
					if m.parts == nil {
						cb.AppendNull()
						continue
					}
					cb.Append(true)
					for _, p := range m.parts {
						pb.Append(true)
						pb.FieldBuilder(0).AppendNull()
						if p.text == "<null>" {
							pb.FieldBuilder(1).AppendNull()
						} else {
							pb.FieldBuilder(1).(*array.StringBuilder).Append(p.text)
						}
						pb.FieldBuilder(2).(*array.StringBuilder).Append(p.typ)
					}
				}
			}
		})
	}
	// The same conversations as JSON lines.
	var lines strings.Builder
	for _, conv := range convs {
		var ms []map[string]any
		for _, m := range conv {
			var content any
			if m.parts != nil {
				ps := []map[string]any{}
				for _, p := range m.parts {
					ps = append(ps, map[string]any{"type": p.typ, "text": p.text})
				}
				content = ps
			}
			ms = append(ms, map[string]any{"role": m.role, "content": content})
		}
		data, _ := json.Marshal(map[string]any{"messages": ms})
		lines.Write(append(data, '\n'))
	}
	jsonl := writeFile(t, "parts.jsonl", lines.String())
	want := readConversations(t, SourceOptions{Paths: []string{jsonl}, Layout: LayoutOpenAI})
	if len(want) != 3 || want[0][1].Content != "Birsoru" {
		t.Fatalf("the JSON lines read as %q", want)
	}
	got := readConversations(t, SourceOptions{Paths: []string{write(convs)}, Layout: LayoutOpenAI})
	if !reflect.DeepEqual(got, want) {
		t.Errorf("parquet parts:\n got %q\nwant %q", got, want)
	}

	for _, c := range []struct {
		part part
		want string
	}{
		{part{"image", "<null>"}, `part 0 is of type "image"; only text parts are supported`},
		{part{"text", "<null>"}, "part 0 has no text string"},
	} {
		bad := write([][]message{convs[1], {{"user", []part{c.part}}, {"assistant", []part{{"text", "b"}}}}})
		if err := openOrNext(SourceOptions{Paths: []string{bad}, Layout: LayoutOpenAI}); err == nil || !strings.Contains(err.Error(), bad+" row index 1, column messages: message 0, field content: "+c.want) {
			t.Errorf("%v: %v, want row index 1 and %q", c.part, err, c.want)
		}
		// The conversation's flaw, not the file's: invalid: drop drops it.
		if got := readConversations(t, SourceOptions{Paths: []string{bad}, Layout: LayoutOpenAI, DropInvalid: true}); len(got) != 1 || got[0][0].Content != "Selam" {
			t.Errorf("%v, dropped: got %q, want the first conversation alone", c.part, got)
		}
	}
	// A list of strings, as some ShareGPT exports write a turn.
	strs := writeFile(t, "strs.jsonl", `{"conversations": [{"from": "human", "value": ["a", "b"]}, {"from": "gpt", "value": "c"}]}`+"\n")
	if err := openOrNext(SourceOptions{Paths: []string{strs}, Layout: LayoutShareGPT}); err == nil || !strings.Contains(err.Error(), `message 0, field value: a list whose element 0 is a string: a content given as a list holds {"type": "text", "text": "..."} parts`) {
		t.Errorf("a value of strings: %v", err)
	}
}

// TestDropInvalidConversations: with DropInvalid, the conversations the
// template refuses are dropped and counted, the first few named; without,
// the first stops the source, saying how to drop them.
func TestDropInvalidConversations(t *testing.T) {
	path := writeFile(t, "c.jsonl", `{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}
{"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}
{"conversations": [{"from": "gpt", "value": "önce model"}]}
{"conversations": [{"from": "human", "value": "c"}, {"from": "gpt", "value": "d"}]}
{"conversations": [{"from": "tool", "value": "x"}]}
{"conversations": [{"from": "human", "value": "soru"}]}
{"conversations": [{"from": null, "value": "x"}, {"from": "gpt", "value": "y"}]}
{"conversations": [{"from": "human", "value": [{"type": "image_url", "image_url": {"url": "x"}}]}, {"from": "gpt", "value": "y"}]}
`)
	convs := readConversations(t, SourceOptions{Paths: []string{path}, Layout: LayoutShareGPT, DropInvalid: true, Limit: 2})
	if len(convs) != 2 || convs[1][0].Content != "c" {
		t.Fatalf("got %v, want the two valid conversations", convs)
	}
	s, err := Open(SourceOptions{Paths: []string{path}, Layout: LayoutShareGPT, DropInvalid: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := drainConversations(s); err != nil {
		t.Fatal(err)
	}
	inv := s.Invalid()
	if inv.Dropped != 6 || len(inv.First) != 3 || !strings.Contains(inv.First[0], path+" line 2: message 1 is user") || !strings.Contains(inv.First[2], `unknown role "tool"`) {
		t.Errorf("report %+v", inv)
	}
	err = openOrNext(SourceOptions{Paths: []string{path}, Layout: LayoutShareGPT})
	if err == nil || !strings.Contains(err.Error(), "line 2: message 1 is user") || !strings.Contains(err.Error(), "invalid: drop drops such conversations") {
		t.Errorf("without DropInvalid: %v", err)
	}
}

// TestRoleNamesInAnyCase: ShareGPT dumps that write Human and GPT, and
// data in Gemma's own role name (model), read without a roles: mapping.
func TestRoleNamesInAnyCase(t *testing.T) {
	path := writeFile(t, "c.jsonl", `{"conversations": [{"from": "System", "value": "s"}, {"from": "Human", "value": "a"}, {"from": "GPT", "value": "b"}, {"from": "user", "value": "c"}, {"from": "model", "value": "d"}]}`+"\n")
	var roles []string
	for _, m := range readConversations(t, SourceOptions{Paths: []string{path}, Layout: LayoutShareGPT}) {
		for _, msg := range m {
			roles = append(roles, msg.Role)
		}
	}
	if !slices.Equal(roles, []string{"system", "user", "assistant", "user", "assistant"}) {
		t.Errorf("roles %v", roles)
	}
	// The spec's own role names too.
	path = writeFile(t, "b.jsonl", `{"conversations": [{"from": "Soran", "value": "a"}, {"from": "Bot", "value": "b"}]}`+"\n")
	roles = nil
	for _, m := range readConversations(t, SourceOptions{Paths: []string{path}, Layout: LayoutShareGPT, Roles: map[string]string{"soran": "user", "bot": "assistant"}}) {
		for _, msg := range m {
			roles = append(roles, msg.Role)
		}
	}
	if !slices.Equal(roles, []string{"user", "assistant"}) {
		t.Errorf("the spec's roles in another case: %v", roles)
	}
}

// TestConversationErrors: a conversation the template would refuse, or
// one with nothing to learn, is an error naming its file and line or row.
func TestConversationErrors(t *testing.T) {
	cases := []struct{ line, want string }{
		{`{"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}`, "message 1 is user after message 0 (user), want assistant: roles must alternate"},
		{`{"conversations": [{"from": "gpt", "value": "önce model"}]}`, "message 0 is assistant after the start, want user"},
		{`{"conversations": [{"from": "system", "value": "s"}, {"from": "gpt", "value": "a"}]}`, "message 1 is assistant after the system message, want user"},
		{`{"conversations": [{"from": "human", "value": "a"}, {"from": "system", "value": "s"}]}`, "message 1 is a system message; only the first message may be one"},
		{`{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "human", "value": "c"}]}`, "the last message (2) is a user turn with no answer to learn"},
		{`{"conversations": [{"from": "system", "value": "s"}]}`, "only a system message"},
		{`{"conversations": []}`, "no messages"},
		{`{"conversations": null}`, "column conversations is null: no messages; nulls: drop skips such records"},
		{`{"conversations": [{"from": "tool", "value": "x"}]}`, `message 0: unknown role "tool"`},
		{`{"conversations": [{"role": "user", "content": "x"}]}`, `message 0 has no field "from"; it has "content", "role"`},
		{`{"conversations": [{"from": null, "value": "x"}]}`, `message 0 has a null from`},
		{`{"conversations": [{"from": 7, "value": "x"}]}`, `message 0, field from: a number, not a string`},
		{`{"conversations": [null]}`, `message 0 is null`},
		{`{"conversations": "metin"}`, "column conversations: want a list of objects"},
		{`{"conversations": [{"from": "human", "value": 3}]}`, "field value: a number, not a string"},
		{`{"conversations": [{"from": "human", "value": [{"type": "image"}]}]}`, `part 0 is of type "image"`},
		{`{"conversations": [{"from": "human", "value": [{"type": "text", "text": null}]}]}`, `part 0 has no text`},
		{"{\"conversations\": [{\"from\": \"human\", \"value\": [{\"type\": \"text\", \"text\": \"a\xffb\"}]}]}", "part 0: invalid UTF-8 at byte 1"},
		{`{"conversations": [{"from": "human", "value": [{"type": "text", "text": "\ud800"}]}]}`, "part 0: unpaired UTF-16 surrogate"},
		{`{"conversations": [{"from": "system", "value": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}, {"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]}`, "a system message of 2 parts"},
		{`{"chat": []}`, `no field "conversations", which the file's first record has; this record has fields "chat": mend or remove it`},
		{`{"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]}`, `unknown role "bot" (known: assistant, gpt, human, model, system, user); map it with roles:, e.g. roles: {bot: assistant}`},
		{`{"conversations": [{"from": "soran", "value": "a"}, {"from": "gpt", "value": "b"}]}`, `map it with roles:, e.g. roles: {soran: user}`},
	}
	for _, c := range cases {
		good := `{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}`
		path := writeFile(t, "bad.jsonl", good+"\n\n"+c.line+"\n")
		err := openOrNext(SourceOptions{Paths: []string{path}, Layout: LayoutShareGPT})
		if err == nil || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), path+" line 3") && !strings.Contains(err.Error(), path+": line 3") {
			t.Errorf("%s:\n got %v\nwant an error naming line 3 with %q", c.line, err, c.want)
		}
	}
	// A file whose first record lacks the list: what in the spec reads it.
	for line, want := range map[string]string{
		`{"chat": []}`:                        `no field "conversations"; the record has fields "chat"; name the record's field with columns:, e.g. columns: {conversations: chat}`,
		`{"messages": []}`:                    `no field "conversations"; the record has fields "messages"; an OpenAI-style record: set format: openai`,
		`{"instruction": "a", "output": "b"}`: `an Alpaca record: leave format out`,
	} {
		path := writeFile(t, "first.jsonl", line+"\n")
		if err := openOrNext(SourceOptions{Paths: []string{path}, Layout: LayoutShareGPT}); err == nil || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), path+": line 1") {
			t.Errorf("%s:\n got %v\nwant an error naming line 1 with %q", line, err, want)
		}
	}

	// In Parquet the row is named.
	bad := writeParquet(t, "bad.parquet", []arrow.Field{{Name: "messages", Type: arrow.BinaryTypes.String}}, func(b *array.RecordBuilder) {
		b.Field(0).(*array.StringBuilder).Append(`[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]`)
		b.Field(0).(*array.StringBuilder).Append(`[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]`)
	})
	if err := openOrNext(SourceOptions{Paths: []string{bad}, Layout: LayoutOpenAI}); err == nil || !strings.Contains(err.Error(), bad+" row index 1: message 1 is user") {
		t.Errorf("parquet: %v", err)
	}
	notList := writeParquet(t, "n.parquet", []arrow.Field{{Name: "messages", Type: arrow.PrimitiveTypes.Int64}}, func(b *array.RecordBuilder) {
		b.Field(0).(*array.Int64Builder).Append(1)
	})
	if err := openOrNext(SourceOptions{Paths: []string{notList}, Layout: LayoutOpenAI}); err == nil || !strings.Contains(err.Error(), "want a list of structs") {
		t.Errorf("a number column: %v", err)
	}

	// Nulls: drop drops the conversation, error stops at it.
	nulls := writeFile(t, "n.jsonl", `{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
{"messages": null}
{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": null}]}
`)
	s, err := Open(SourceOptions{Paths: []string{nulls}, Layout: LayoutOpenAI, Nulls: NullsDrop})
	if err != nil {
		t.Fatal(err)
	}
	got, err := drainConversations(s)
	if err != nil || len(got) != 1 || s.Nulls().Dropped != 2 {
		t.Errorf("nulls: drop: %d conversations, %v, %+v", len(got), err, s.Nulls())
	}
	if err := openOrNext(SourceOptions{Paths: []string{nulls}, Layout: LayoutOpenAI, Nulls: NullsError}); err == nil || !strings.Contains(err.Error(), "line 2: column messages is null") {
		t.Errorf("nulls: error: %v", err)
	}
	third := writeFile(t, "n3.jsonl", `{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": null}]}`+"\n")
	if err := openOrNext(SourceOptions{Paths: []string{third}, Layout: LayoutOpenAI, Nulls: NullsError}); err == nil || !strings.Contains(err.Error(), "line 1: a message's content is null (nulls: error)") {
		t.Errorf("nulls: error, a message's content: %v", err)
	}

	// Options that do not fit the layout.
	for _, opts := range []SourceOptions{
		{Paths: []string{nulls}, Layout: LayoutOpenAI, Columns: map[string]string{"instruction": "x"}},
		{Paths: []string{nulls}, Layout: LayoutAlpaca, Roles: map[string]string{"a": "user"}},
		{Paths: []string{nulls}, Layout: LayoutOpenAI, Roles: map[string]string{"a": "model"}},
		{Paths: []string{nulls}, Layout: LayoutText, SystemText: "x"},
		{Paths: []string{nulls}, Layout: "chatml"},
	} {
		if _, err := Open(opts); err == nil {
			t.Errorf("%+v accepted", opts)
		}
	}
}

func TestTextLayout(t *testing.T) {
	dir := t.TempDir()
	write := func(name string, data []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	a := write("a.txt", []byte("\xef\xbb\xbfBirinci belge.\n\nİkinci paragraf.\n"))
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write([]byte("Sıkıştırılmış belge."))
	zw.Close()
	b := write("b.md.gz", gz.Bytes())
	j := write("c.jsonl", []byte(`{"body": "Satır bir."}`+"\n"+`{"body": "Satır iki."}`+"\n"))
	p := writeParquet(t, "d.parquet", []arrow.Field{{Name: "text", Type: arrow.BinaryTypes.String}}, func(b *array.RecordBuilder) {
		b.Field(0).(*array.StringBuilder).Append("Parquet metni.")
	})
	// Line endings as Python's universal newlines read them: CRLF and CR are "\n".
	crlf := write("e.txt", []byte("Windows satırı.\r\nEski Mac satırı.\rSon.\r\n"))
	rows := readAll(t, SourceOptions{Paths: []string{a, b, p, crlf}, Layout: LayoutText})
	want := [][]string{{"Birinci belge.\n\nİkinci paragraf.\n"}, {"Sıkıştırılmış belge."}, {"Parquet metni."}, {"Windows satırı.\nEski Mac satırı.\nSon.\n"}}
	if !reflect.DeepEqual(rows, want) {
		t.Errorf("got %q, want %q", rows, want)
	}
	rows = readAll(t, SourceOptions{Paths: []string{j}, Layout: LayoutText, Columns: map[string]string{"text": "body"}})
	if !reflect.DeepEqual(rows, [][]string{{"Satır bir."}, {"Satır iki."}}) {
		t.Errorf("jsonl text column: %q", rows)
	}
	// A text stage names its one field with column:, not columns:.
	for columns, want := range map[string]string{"": `no field "text"; the record has fields "body"; name the record's field with column: FIELD`, "bdy": `column: names "bdy": did you mean "body"?`} {
		opts := SourceOptions{Paths: []string{j}, Layout: LayoutText}
		if columns != "" {
			opts.Columns = map[string]string{"text": columns}
		}
		if err := openOrNext(opts); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("column %q: %v, want %q", columns, err, want)
		}
	}
	s, err := Open(SourceOptions{Paths: []string{a, b}, Layout: LayoutText})
	if err != nil {
		t.Fatal(err)
	}
	if n, known := s.Rows(); n != 2 || !known {
		t.Errorf("rows %d (known %v), want 2", n, known)
	}
	s.Close()

	// A text file is not an Alpaca record; a bad one names itself.
	if _, err := Open(SourceOptions{Paths: []string{a}}); err == nil || !strings.Contains(err.Error(), "read by a text source") {
		t.Errorf("text file as alpaca: %v", err)
	}
	bad := write("bad.txt", []byte("iyi\xffkötü"))
	if err := openOrNext(SourceOptions{Paths: []string{bad}, Layout: LayoutText}); err == nil || !strings.Contains(err.Error(), "bad.txt: invalid UTF-8 at byte 3") {
		t.Errorf("bad UTF-8: %v", err)
	}
	old := MaxTextFileBytes
	MaxTextFileBytes = 8
	defer func() { MaxTextFileBytes = old }()
	if err := openOrNext(SourceOptions{Paths: []string{a}, Layout: LayoutText}); err == nil || !strings.Contains(err.Error(), "longer than 8 bytes") {
		t.Errorf("too long: %v", err)
	}
}

// messagesOf reads every conversation of a ColMessages column.
func messagesOf(l *array.List) [][]chat.Message {
	c, err := NewMessagesColumn(l)
	if err != nil {
		panic(err)
	}
	out := make([][]chat.Message, l.Len())
	for i := range out {
		out[i] = c.Row(i)
	}
	return out
}
