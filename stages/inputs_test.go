package stages

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"gemmaft/internal/testenv"
	"gemmaft/pipeline"
)

// Stages that get an input of the wrong kind say which stage it is and what
// they read instead.

// wrongInput runs spec (a.jsonl holds one record) and checks that it fails
// with every string in want.
func wrongInput(t *testing.T, spec string, want ...string) {
	t.Helper()
	r := newTestRun(t)
	data := filepath.Join(r.dir, "a.jsonl")
	if err := os.WriteFile(data, []byte(`{"instruction": "Selam ver", "input": "", "output": "Merhaba."}`+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := r.run(r.spec(spec), pipeline.Options{})
	if err == nil {
		t.Fatal("ran with an input of the wrong kind")
	}
	for _, w := range want {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error lacks %q: %v", w, err)
		}
	}
}

func TestPackNeedsTokens(t *testing.T) {
	wrongInput(t, `name: wrong-input
stages:
  alpaca: {kind: jsonl, with: {paths: [a.jsonl]}}
  chat: {kind: chat_template, needs: [alpaca]}
  pack: {kind: pack, needs: [chat], with: {seq_len: 64}}
`, "stage pack (pack)", `input stage chat (chat_template) has no "input_ids" column`, "the table of a tokenize stage")
}

func TestTokenizeNeedsChat(t *testing.T) {
	tok := testenv.GemmaFile(t, "tokenizer.json")
	wrongInput(t, fmt.Sprintf(`name: wrong-input
stages:
  alpaca: {kind: jsonl, with: {paths: [a.jsonl]}}
  tokens: {kind: tokenize, needs: [alpaca], with: {tokenizer: %s}}
`, tok), "stage tokens (tokenize)", `input stage alpaca (jsonl) has no "text" column`, "the table of a chat_template stage")
}

func TestChatNeedsRecords(t *testing.T) {
	wrongInput(t, `name: wrong-input
stages:
  alpaca: {kind: jsonl, with: {paths: [a.jsonl]}}
  chat: {kind: chat_template, needs: [alpaca]}
  again: {kind: chat_template, needs: [chat]}
`, "stage again (chat_template)", `input stage chat (chat_template) has no "instruction" column`, "the table of a parquet or jsonl stage")
}

// TestQLoRAInputsByKind: a qlora stage tells its needs apart by their kind.
func TestQLoRAInputsByKind(t *testing.T) {
	wrongInput(t, `name: wrong-input
stages:
  alpaca: {kind: jsonl, with: {paths: [a.jsonl]}}
  chat: {kind: chat_template, needs: [alpaca]}
  base: {kind: model, with: {preset: tiny}}
  adapter: {kind: qlora, needs: [chat, base], with: {backend: cpu}}
`, "stage adapter (qlora)", "stage chat of kind chat_template", "a pack stage (packed rows)")
}
