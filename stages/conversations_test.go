package stages

import (
	"bytes"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/memory"

	"gemmaft/chat"
	"gemmaft/internal/testenv"
	"gemmaft/pipeline"
)

// testConversations are the project's Turkish conversations
// (dataset/demo/conversations-tr-demo.jsonl, roles mapped) and, where the
// shared Turkish Alpaca data is beside the repository, its records chained
// into conversations of 1 to 8 turns, every other one with a system
// message.
func testConversations(t *testing.T, short bool) [][]chat.Message {
	var convs [][]chat.Message
	data, err := os.ReadFile(demoFile(t, "conversations-tr-demo.jsonl"))
	if err != nil {
		t.Fatal(err)
	}
	roles := map[string]string{"system": "system", "human": "user", "gpt": "assistant"}
	for _, line := range bytes.Split(bytes.TrimSpace(data), []byte("\n")) {
		var rec struct {
			Conversations []struct{ From, Value string }
		}
		if err := json.Unmarshal(line, &rec); err != nil {
			t.Fatal(err)
		}
		var c []chat.Message
		for _, m := range rec.Conversations {
			c = append(c, chat.Message{Role: roles[m.From], Content: m.Value})
		}
		convs = append(convs, c)
	}
	if _, err := os.Stat(filepath.Join(testenv.RepoRoot(t), "..", "shared", "data", "alpaca-tr", "alpaca-tr.jsonl.gz")); err != nil {
		t.Logf("no shared Alpaca data: only the %d demo conversations", len(convs))
		return convs
	}
	recs := testenv.AlpacaRecords(t)
	if short {
		recs = recs[:1000]
	}
	for i, k := 0, 0; i < len(recs); k++ {
		turns := k%8 + 1
		var c []chat.Message
		if k%2 == 1 {
			c = append(c, chat.Message{Role: "system", Content: testSystem})
		}
		for j := 0; j < turns && i < len(recs); j, i = j+1, i+1 {
			r := recs[i]
			c = append(c, chat.Alpaca(r.Instruction, r.Input, r.Output, "")...)
		}
		convs = append(convs, c)
	}
	return convs
}

// writeShareGPT writes conversations as ShareGPT JSON lines (human, gpt).
func writeShareGPT(t *testing.T, path string, convs [][]chat.Message) {
	names := map[string]string{"system": "system", "user": "human", "assistant": "gpt"}
	var b bytes.Buffer
	for _, c := range convs {
		var msgs []map[string]string
		for _, m := range c {
			msgs = append(msgs, map[string]string{"from": names[m.Role], "value": m.Content})
		}
		line, _ := json.Marshal(map[string]any{"conversations": msgs})
		b.Write(line)
		b.WriteByte('\n')
	}
	if err := os.WriteFile(path, b.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
}

// writeOpenAIParquet writes conversations as a Parquet column of
// {role, content} lists.
func writeOpenAIParquet(t *testing.T, path string, convs [][]chat.Message) {
	schema := arrow.NewSchema([]arrow.Field{{Name: "messages", Type: arrow.ListOf(arrow.StructOf(
		arrow.Field{Name: "role", Type: arrow.BinaryTypes.String},
		arrow.Field{Name: "content", Type: arrow.BinaryTypes.String},
	))}}, nil)
	b := array.NewRecordBuilder(memory.DefaultAllocator, schema)
	defer b.Release()
	lb := b.Field(0).(*array.ListBuilder)
	sb := lb.ValueBuilder().(*array.StructBuilder)
	for _, c := range convs {
		lb.Append(true)
		for _, m := range c {
			sb.Append(true)
			sb.FieldBuilder(0).(*array.StringBuilder).Append(m.Role)
			sb.FieldBuilder(1).(*array.StringBuilder).Append(m.Content)
		}
	}
	rec := b.NewRecordBatch()
	defer rec.Release()
	writeParquet(t, path, rec)
}

// modelSpans finds the model turns of a rendered text by searching it:
// from after each "<start_of_turn>model\n" through the next
// "<end_of_turn>".
func modelSpans(t *testing.T, text string) [][2]int {
	const open, close = "<start_of_turn>model\n", "<end_of_turn>"
	var spans [][2]int
	for at := 0; ; {
		s := strings.Index(text[at:], open)
		if s < 0 {
			return spans
		}
		s += at + len(open)
		e := strings.Index(text[s:], close)
		if e < 0 {
			t.Fatalf("model turn not closed in %q", text)
		}
		e += s + len(close)
		spans = append(spans, [2]int{s, e})
		at = e
	}
}

// spanLabels: a token is trained when it holds a byte of a span (HF's
// return_assistant_tokens_mask).
func spanLabels(ids []int32, offs [][2]int, spans [][2]int) []int32 {
	labels := make([]int32, len(ids))
	for k, o := range offs {
		labels[k] = -100
		for _, s := range spans {
			if o[0] < s[1] && o[1] > s[0] {
				labels[k] = ids[k]
			}
		}
	}
	return labels
}

// TestConversationStagesMatchOracles runs conversations of 1 to 8 turns
// (with and without system messages) through a ShareGPT source, the chat
// template and the tokenizer, and checks every text against the real
// template through jinja2, every id against Hugging Face tokenizers, and
// the labels against the model turns found in the text: every assistant
// turn, or with loss_on: last_assistant the last one only. The same
// conversations in OpenAI's layout in Parquet render the same.
func TestConversationStagesMatchOracles(t *testing.T) {
	testenv.NeedTool(t, "node")
	testenv.NeedTool(t, "python3")
	tok := testenv.GemmaFile(t, "tokenizer.json")
	config := filepath.Join(filepath.Dir(tok), "tokenizer_config.json")
	convs := testConversations(t, testing.Short())
	r := newTestRun(t)
	sharegpt := filepath.Join(r.dir, "conv.jsonl")
	writeShareGPT(t, sharegpt, convs)
	openai := filepath.Join(r.dir, "conv.parquet")
	writeOpenAIParquet(t, openai, convs)
	rec, err := r.run(r.spec(fmt.Sprintf(`name: conversations
stages:
  conv: {kind: jsonl, with: {paths: [%s], format: sharegpt}}
  chat: {kind: chat_template, needs: [conv]}
  tokens: {kind: tokenize, needs: [chat], with: {tokenizer: %s}}
  last: {kind: tokenize, needs: [chat], with: {tokenizer: %s, loss_on: last_assistant}}
  newline: {kind: tokenize, needs: [chat], with: {tokenizer: %[2]s, loss_on_newline: true}}
  oa: {kind: parquet, with: {paths: [%[4]s], format: openai}}
  oachat: {kind: chat_template, needs: [oa]}
`, sharegpt, tok, tok, openai)), pipeline.Options{})
	if err != nil {
		t.Fatal(err)
	}
	chats := readChat(t, r, rec, "chat")
	oaChats := readChat(t, r, rec, "oachat")
	tokens := readTokens(t, r, rec, "tokens")
	last := readTokens(t, r, rec, "last")
	newline := readTokens(t, r, rec, "newline")
	if len(chats) != len(convs) || len(oaChats) != len(convs) || len(tokens) != len(convs) || len(last) != len(convs) {
		t.Fatalf("%d conversations, %d/%d chat rows, %d/%d token rows", len(convs), len(chats), len(oaChats), len(tokens), len(last))
	}

	// 1. Chat text: byte-identical to the real template through jinja2.
	var in bytes.Buffer
	for _, c := range convs {
		line, _ := json.Marshal(map[string]any{"messages": c})
		in.Write(line)
		in.WriteByte('\n')
	}
	rendered := oracleLines(t, in.Bytes(), "python3", "scripts/oracle/render_chat.py", config)
	if len(rendered) != len(convs) {
		t.Fatalf("oracle rendered %d texts", len(rendered))
	}
	var texts bytes.Buffer
	turnsOf := map[int]int{}
	for i, line := range rendered {
		var o struct{ Text, Error string }
		if err := json.Unmarshal(line, &o); err != nil || o.Error != "" {
			t.Fatalf("conversation %d: oracle: %v %s", i, err, o.Error)
		}
		if o.Text != chats[i].text {
			t.Fatalf("conversation %d: chat text differs from the template's rendering:\n got %q\nwant %q", i, chats[i].text, o.Text)
		}
		if oaChats[i].text != o.Text {
			t.Fatalf("conversation %d: the OpenAI layout in Parquet renders differently", i)
		}
		assistant := 0
		for _, m := range convs[i] {
			if m.Role == "assistant" {
				assistant++
			}
		}
		if len(chats[i].start) != assistant {
			t.Fatalf("conversation %d: %d spans for %d assistant turns", i, len(chats[i].start), assistant)
		}
		turnsOf[assistant]++
		json.NewEncoder(&texts).Encode(map[string]string{"text": o.Text})
	}
	for n := 1; n <= 4; n++ {
		if turnsOf[n] == 0 {
			t.Errorf("no conversation of %d turns", n)
		}
	}

	// 2. Ids identical to HF tokenizers; 3. labels on exactly the model
	// turns the text shows, every one or the last.
	hf := oracleLines(t, texts.Bytes(), "node", "npm/hf-tokenize.js", "encode", tok, "--offsets")
	var trained, trainedLast, total int64
	for i, line := range hf {
		var o struct {
			IDs     []int32  `json:"ids"`
			Offsets [][2]int `json:"offsets"`
		}
		if err := json.Unmarshal(line, &o); err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(tokens[i].ids, o.IDs) || !slices.Equal(last[i].ids, o.IDs) {
			t.Fatalf("conversation %d: ids differ from HF tokenizers (%d vs %d tokens)", i, len(tokens[i].ids), len(o.IDs))
		}
		if o.IDs[0] != 2 || slices.Contains(o.IDs[1:], 2) {
			t.Fatalf("conversation %d: not exactly one <bos> at the start", i)
		}
		spans := modelSpans(t, chats[i].text)
		if len(spans) != len(chats[i].start) {
			t.Fatalf("conversation %d: %d model turns in the text, %d spans", i, len(spans), len(chats[i].start))
		}
		if want := spanLabels(o.IDs, o.Offsets, spans); !slices.Equal(tokens[i].labels, want) {
			t.Fatalf("conversation %d: labels differ from the model turns' tokens", i)
		}
		if want := spanLabels(o.IDs, o.Offsets, spans[len(spans)-1:]); !slices.Equal(last[i].labels, want) {
			t.Fatalf("conversation %d: last_assistant labels differ from the last model turn's tokens", i)
		}
		// TRL's assistant_only_loss template closes its generation block
		// after "<end_of_turn>\n": the line break is trained too.
		withNewline := make([][2]int, len(spans))
		for k, sp := range spans {
			if chats[i].text[sp[1]] != '\n' {
				t.Fatalf("conversation %d: no line break after a model turn", i)
			}
			withNewline[k] = [2]int{sp[0], sp[1] + 1}
		}
		if want := spanLabels(o.IDs, o.Offsets, withNewline); !slices.Equal(newline[i].labels, want) {
			t.Fatalf("conversation %d: loss_on_newline labels differ from the model turns' tokens with their line breaks", i)
		}
		for k := range o.IDs {
			if tokens[i].labels[k] != -100 {
				trained++
			}
			if last[i].labels[k] != -100 {
				trainedLast++
			}
		}
		total += int64(len(o.IDs))
	}
	if trainedLast >= trained {
		t.Errorf("last_assistant trains %d tokens, every turn %d", trainedLast, trained)
	}
	t.Logf("%d conversations (turns: %v), %d tokens, %d trained on every assistant turn, %d on the last", len(convs), turnsOf, total, trained, trainedLast)
	if rec.Stages[1].Stats["assistant_turns"] == nil {
		t.Errorf("chat stage statistics %v lack assistant_turns", rec.Stages[1].Stats)
	}
}

// TestInvalidConversationsDropped: invalid: drop drops the conversations
// the template refuses, counting and naming them; a source left with none
// fails; Alpaca records take no such policy.
func TestInvalidConversationsDropped(t *testing.T) {
	r := newTestRun(t)
	var logs bytes.Buffer
	r.log = slog.New(slog.NewTextHandler(&logs, nil))
	path := filepath.Join(r.dir, "c.jsonl")
	os.WriteFile(path, []byte(`{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}
{"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}
`), 0o644)
	spec := func(with string) string {
		return r.spec(fmt.Sprintf("name: i\nstages:\n  c: {kind: jsonl, with: {paths: [%s], %s}}\n", path, with))
	}
	rec, err := r.run(spec("format: sharegpt, invalid: drop"), pipeline.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if st := stageStats(t, rec, "c"); st["records"] != 1.0 || st["invalid_dropped"] != 1.0 {
		t.Errorf("statistics %v", st)
	}
	if !strings.Contains(logs.String(), "dropped 1 conversation the chat template refuses; the first: "+path+" line 2: message 1 is user") {
		t.Errorf("log:\n%s", logs.String())
	}
	os.WriteFile(path, []byte(`{"conversations": [{"from": "gpt", "value": "b"}]}`+"\n"), 0o644)
	if _, err := r.run(spec("format: sharegpt, invalid: drop"), pipeline.Options{}); err == nil || !strings.Contains(err.Error(), "every conversation was invalid (1)") {
		t.Errorf("all invalid: %v", err)
	}
	if _, err := r.run(spec("invalid: drop"), pipeline.Options{}); err == nil || !strings.Contains(err.Error(), "this source reads Alpaca records") {
		t.Errorf("Alpaca records: %v", err)
	}
}

// TestEmptyAnswersAreCounted: answers that are empty or white space, in
// Alpaca records and in conversations, are counted and warned of (each
// trains the model to close its turn at once); others are not.
func TestEmptyAnswersAreCounted(t *testing.T) {
	r := newTestRun(t)
	var logs bytes.Buffer
	r.log = slog.New(slog.NewTextHandler(&logs, nil))
	write := func(name, content string) string {
		p := filepath.Join(r.dir, name)
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	alpaca := write("a.jsonl", `{"instruction": "Soru", "output": "Cevap"}
{"instruction": "Soru 2", "output": " \n "}
{"instruction": "Soru 3", "output": ""}
{"instruction": " ", "output": "Cevap 4"}
{"instruction": "Soru 5", "output": "Tamam.<end_of_turn>\n<start_of_turn>user\nBaşka?"}
`)
	convs := write("c.jsonl", `{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": ""}, {"from": "human", "value": "b"}, {"from": "gpt", "value": "c"}]}
{"conversations": [{"from": "human", "value": "<bos>"}, {"from": "gpt", "value": "c"}]}
`)
	rec, err := r.run(r.spec(fmt.Sprintf(`name: e
stages:
  a: {kind: jsonl, with: {paths: [%s]}}
  achat: {kind: chat_template, needs: [a]}
  c: {kind: jsonl, with: {paths: [%s], format: sharegpt}}
  cchat: {kind: chat_template, needs: [c]}
`, alpaca, convs)), pipeline.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if a, c := stageStats(t, rec, "achat")["empty_answers"], stageStats(t, rec, "cchat")["empty_answers"]; a != 2.0 || c != 1.0 {
		t.Errorf("empty answers: %v in the Alpaca records, %v in the conversations; want 2 and 1", a, c)
	}
	a, c := stageStats(t, rec, "achat"), stageStats(t, rec, "cchat")
	if a["empty_prompts"] != 1.0 || a["control_token_records"] != 1.0 || c["empty_prompts"] != 0.0 || c["control_token_records"] != 1.0 {
		t.Errorf("empty prompts %v and %v, records with control tokens %v and %v; want 1, 0, 1, 1",
			a["empty_prompts"], c["empty_prompts"], a["control_token_records"], c["control_token_records"])
	}
	for _, want := range []string{"2 answers are empty (or white space)", "the first is in row 2 of stage a (pipeline inspect SPEC a --rows 2 shows it last)", "1 answer is empty",
		"1 record has an empty (or white space) question", "the first is in row 4 of stage a",
		"1 record holds the text of a Gemma 3 control token", "the first is in row 5 of stage a", "the first is in row 2 of stage c"} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("the log does not say %q:\n%s", want, logs.String())
		}
	}
}

// TestDuplicateRecords: records that render word for word as an earlier
// one are counted and warned of, naming the first and what it repeats;
// with dedupe they are left out, in conversations as in Alpaca records.
// Records that differ in a field the template renders apart (the input)
// are not duplicates.
func TestDuplicateRecords(t *testing.T) {
	r := newTestRun(t)
	var logs bytes.Buffer
	r.log = slog.New(slog.NewTextHandler(&logs, nil))
	alpaca := filepath.Join(r.dir, "a.jsonl")
	os.WriteFile(alpaca, []byte(`{"instruction": "Soru", "output": "Cevap"}
{"instruction": "Soru", "input": "ek", "output": "Cevap"}
{"instruction": "Soru", "output": "Cevap"}
{"instruction": "Başka", "output": "Cevap"}
{"instruction": "Soru", "input": "ek", "output": "Cevap"}
`), 0o644)
	convs := filepath.Join(r.dir, "c.jsonl")
	os.WriteFile(convs, []byte(`{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}
{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}
`), 0o644)
	spec := func(dedupe string) string {
		return r.spec(fmt.Sprintf(`name: d
stages:
  a: {kind: jsonl, with: {paths: [%s]}}
  achat: {kind: chat_template, needs: [a]%s}
  c: {kind: jsonl, with: {paths: [%s], format: sharegpt}}
  cchat: {kind: chat_template, needs: [c]%s}
`, alpaca, dedupe, convs, dedupe))
	}
	rec, err := r.run(spec(""), pipeline.Options{})
	if err != nil {
		t.Fatal(err)
	}
	a, c := stageStats(t, rec, "achat"), stageStats(t, rec, "cchat")
	if a["duplicate_records"] != 2.0 || c["duplicate_records"] != 1.0 || stageRows(rec, "achat") != 5 {
		t.Errorf("duplicates %v and %v in %d rows; want 2 and 1 in all 5", a["duplicate_records"], c["duplicate_records"], stageRows(rec, "achat"))
	}
	if want := "2 records render word for word as an earlier one: row 3 of stage a repeats row 1"; !strings.Contains(logs.String(), want) || !strings.Contains(logs.String(), "dedupe: true") {
		t.Errorf("the log does not say %q:\n%s", want, logs.String())
	}
	rec, err = r.run(spec(", with: {dedupe: true}"), pipeline.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if stageRows(rec, "achat") != 3 || stageRows(rec, "cchat") != 1 || stageStats(t, rec, "achat")["duplicate_records"] != 2.0 {
		t.Errorf("dedupe kept %d and %d rows; want 3 and 1", stageRows(rec, "achat"), stageRows(rec, "cchat"))
	}
}

func stageRows(rec *pipeline.RunRecord, name string) int64 {
	for _, s := range rec.Stages {
		if s.Name == name {
			return s.Rows
		}
	}
	return -1
}

// TestOpenAIContentParts: contents given as lists of text parts render as
// the template renders them from the file's own messages.
func TestOpenAIContentParts(t *testing.T) {
	testenv.NeedTool(t, "python3")
	tok := testenv.GemmaFile(t, "tokenizer.json")
	config := filepath.Join(filepath.Dir(tok), "tokenizer_config.json")
	lines := []string{
		`{"messages": [{"role": "user", "content": [{"type": "text", "text": " Merhaba, "}, {"type": "text", "text": "nasılsın?\n"}]}, {"role": "assistant", "content": [{"type": "text", "text": "İyiyim."}]}]}`,
		`{"messages": [{"role": "system", "content": [{"type": "text", "text": " Kısa yanıt ver. "}]}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": [{"type": "text", "text": "4"}, {"type": "text", "text": "\n"}]}, {"role": "user", "content": [{"type": "text", "text": "Ya "}, {"type": "text", "text": " 3+3?"}]}, {"role": "assistant", "content": " 6 "}]}`,
	}
	r := newTestRun(t)
	path := filepath.Join(r.dir, "parts.jsonl")
	if err := os.WriteFile(path, []byte(strings.Join(lines, "\n")+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	rec, err := r.run(r.spec(fmt.Sprintf(`name: parts
stages:
  conv: {kind: jsonl, with: {paths: [%s], format: openai}}
  chat: {kind: chat_template, needs: [conv]}
`, path)), pipeline.Options{})
	if err != nil {
		t.Fatal(err)
	}
	chats := readChat(t, r, rec, "chat")
	want := oracleLines(t, []byte(strings.Join(lines, "\n")+"\n"), "python3", "scripts/oracle/render_chat.py", config)
	for i, line := range want {
		var o struct{ Text, Error string }
		if err := json.Unmarshal(line, &o); err != nil || o.Error != "" {
			t.Fatalf("oracle: %v %s", err, o.Error)
		}
		if chats[i].text != o.Text {
			t.Errorf("conversation %d:\n got %q\nwant %q", i, chats[i].text, o.Text)
		}
	}
}

// TestConversationSourceErrors: a bad conversation fails the source
// stage, naming the file and line; bad options are spec errors.
func TestConversationSourceErrors(t *testing.T) {
	r := newTestRun(t)
	path := filepath.Join(r.dir, "bad.jsonl")
	os.WriteFile(path, []byte(`{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}
{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "gpt", "value": "c"}]}
`), 0o644)
	_, err := r.run(r.spec(fmt.Sprintf(`name: bad
stages:
  conv: {kind: jsonl, with: {paths: [%s], format: sharegpt}}
`, path)), pipeline.Options{})
	if err == nil || !strings.Contains(err.Error(), path+" line 2: message 2 is assistant after message 1 (assistant), want user") {
		t.Errorf("alternation: %v", err)
	}
	for _, c := range []struct{ with, want string }{
		{`format: chatml`, `unknown format "chatml"`},
		{`format: text`, "plain texts are read by a stage of kind text"},
		{`format: sharegpt, columns: {instruction: x}`, `cannot map "instruction"`},
		{`roles: {insan: user}`, "roles are mapped only in conversations"},
		{`format: openai, roles: {insan: model}`, `insan maps to "model"`},
	} {
		_, err := r.run(r.spec(fmt.Sprintf("name: bad\nstages:\n  conv: {kind: jsonl, with: {paths: [%s], %s}}\n", path, c.with)), pipeline.Options{})
		if err == nil || !pipeline.IsSpecError(err) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v", c.with, err)
		}
	}
}

// TestNewOptionsKeepKeys: the options this file's sources and tokenize
// stages gained leave the canonical parameters, and so the keys, of specs
// that do not use them as they were; writing their defaults changes
// nothing either.
func TestNewOptionsKeepKeys(t *testing.T) {
	r := newTestRun(t)
	demo := demoFile(t, "alpaca-tr-demo.jsonl")
	tok := testenv.GemmaFile(t, "tokenizer.json")
	load := func(with, tokWith string) *pipeline.DAG {
		dag, err := loadSpec(r.spec(fmt.Sprintf(`name: keys
stages:
  alpaca: {kind: jsonl, with: {paths: [%s], system: "Sen yardımsever bir Türkçe asistansın."%s}}
  chat: {kind: chat_template, needs: [alpaca]}
  tokens: {kind: tokenize, needs: [chat], with: {tokenizer: %s%s}}
`, demo, with, tok, tokWith)), Registry())
		if err != nil {
			t.Fatal(err)
		}
		return dag
	}
	// The canonical parameters before conversations existed.
	wantSource := fmt.Sprintf(`{"paths":[%q],"system":"Sen yardımsever bir Türkçe asistansın.","limit":0,"shuffle":false,"seed":0}`, demo)
	wantTokens := fmt.Sprintf(`{"tokenizer":%q,"loss_on":"assistant"}`, tok)
	for _, c := range []struct{ with, tokWith string }{
		{"", ""},
		{", format: alpaca", ", eos: false"},
		{", columns: {instruction: instruction}", ", loss_on: assistant"},
	} {
		dag := load(c.with, c.tokWith)
		if got := string(dag.Node("alpaca").Canon); got != wantSource {
			t.Errorf("source with %q: %s, want %s", c.with, got, wantSource)
		}
		if got := string(dag.Node("tokens").Canon); got != wantTokens {
			t.Errorf("tokenize with %q: %s, want %s", c.tokWith, got, wantTokens)
		}
	}
	// Roles known already are left out too.
	dag, err := loadSpec(r.spec(fmt.Sprintf(`name: keys
stages:
  conv: {kind: jsonl, with: {paths: [%s], format: sharegpt, roles: {human: user, gpt: assistant}}}
`, demo)), Registry())
	if err != nil {
		t.Fatal(err)
	}
	if got, want := string(dag.Node("conv").Canon), fmt.Sprintf(`{"paths":[%q],"format":"sharegpt","limit":0,"shuffle":false,"seed":0}`, demo); got != want {
		t.Errorf("default roles: %s, want %s", got, want)
	}
}

// TestTextStage: plain texts (whole files and a JSON lines column) are
// tokenized as Hugging Face tokenizers does with its special tokens (one
// <bos>), and with eos: true end with <eos>; every token is trained; an
// empty text is left out, counted and warned of.
func TestTextStage(t *testing.T) {
	testenv.NeedTool(t, "node")
	tok := testenv.GemmaFile(t, "tokenizer.json")
	r := newTestRun(t)
	var logs bytes.Buffer
	r.log = slog.New(slog.NewTextHandler(&logs, nil))
	jsonl := filepath.Join(r.dir, "texts.jsonl")
	os.WriteFile(jsonl, []byte(`{"body": "Kısa bir metin.", "system": "Kısa yanıt ver."}
{"body": ""}
{"body": "  Boşluklarla başlayan\nve biten bir metin.  "}
`), 0o644)
	texts := filepath.Join(testenv.RepoRoot(t), "dataset", "demo", "metin", "*.txt")
	rec, err := r.run(r.spec(fmt.Sprintf(`name: texts
stages:
  files: {kind: text, with: {paths: [%s]}}
  rows: {kind: text, with: {paths: [%s], column: body}}
  tokens: {kind: tokenize, needs: [files], with: {tokenizer: %s}}
  eos: {kind: tokenize, needs: [rows], with: {tokenizer: %s, eos: true}}
`, texts, jsonl, tok, tok)), pipeline.Options{})
	if err != nil {
		t.Fatal(err)
	}
	var all []string
	forEach(t, r.table(rec, "files"), func(b arrow.RecordBatch) {
		c := b.Column(0).(*array.String)
		for i := 0; i < c.Len(); i++ {
			all = append(all, c.Value(i))
		}
	})
	if len(all) != 3 || !strings.HasPrefix(all[0], "İstanbul Boğazı") {
		t.Fatalf("texts %q", all)
	}
	check := func(stage string, texts []string, eos bool) {
		got := readTokens(t, r, rec, stage)
		var in bytes.Buffer
		for _, s := range texts {
			json.NewEncoder(&in).Encode(map[string]string{"text": s})
		}
		hf := oracleLines(t, in.Bytes(), "node", "npm/hf-tokenize.js", "encode", tok, "--add-special")
		if len(got) != len(hf) {
			t.Fatalf("%s: %d rows, want %d", stage, len(got), len(hf))
		}
		for i, line := range hf {
			var o struct {
				IDs []int32 `json:"ids"`
			}
			json.Unmarshal(line, &o)
			if eos {
				o.IDs = append(o.IDs, 1)
			}
			if !slices.Equal(got[i].ids, o.IDs) || !slices.Equal(got[i].labels, o.IDs) {
				t.Errorf("%s: text %d: ids %v labels %v, want both %v", stage, i, got[i].ids, got[i].labels, o.IDs)
			}
			if o.IDs[0] != 2 || slices.Contains(o.IDs[1:], 2) {
				t.Errorf("%s: text %d: not one <bos>", stage, i)
			}
		}
	}
	if strings.Contains(logs.String(), "system text") { // the text source reads body alone
		t.Errorf("a text source warned of the file's other columns:\n%s", logs.String())
	}
	check("tokens", all, false)
	check("eos", []string{"Kısa bir metin.", "  Boşluklarla başlayan\nve biten bir metin.  "}, true)
	if st := rec.Stages[3].Stats; fmt.Sprint(st["dropped_records"]) != "1" {
		t.Errorf("the empty text: statistics %v", st)
	}
	if !strings.Contains(logs.String(), "1 record is empty, and left out; the first is row 2 of stage rows") {
		t.Errorf("the empty text was not warned of:\n%s", logs.String())
	}

	// Wiring: eos ends plain texts; last_assistant picks a turn; a chat
	// template does not read plain texts.
	for _, c := range []struct{ spec, want string }{
		{`  a: {kind: jsonl, with: {paths: [%[1]s]}}
  c: {kind: chat_template, needs: [a]}
  t: {kind: tokenize, needs: [c], with: {tokenizer: %[2]s, eos: true}}`, "eos: ends plain texts"},
		{`  a: {kind: text, with: {paths: [%[1]s], column: body}}
  t: {kind: tokenize, needs: [a], with: {tokenizer: %[2]s, loss_on: last_assistant}}`, "last_assistant picks a conversation's last turn"},
		{`  a: {kind: text, with: {paths: [%[1]s], column: body}}
  c: {kind: chat_template, needs: [a]}`, `"a" is a text stage, but a chat_template stage reads the records of a parquet or jsonl stage`},
	} {
		_, err := r.run(r.spec("name: wiring\nstages:\n"+fmt.Sprintf(c.spec, jsonl, tok)+"\n"), pipeline.Options{})
		if err == nil || !pipeline.IsSpecError(err) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v", c.want, err)
		}
	}
}
