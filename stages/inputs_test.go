package stages

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"gemmaft/pipeline"
)

// Stages wired to an input of the wrong kind are spec errors at the
// stage's `needs:`, before anything runs (they used to fail only once the
// stages before them had computed).

// wrongInput loads spec (a.jsonl holds one record, tok.json stands in for a
// tokenizer) and checks that it fails at line with every string in want.
func wrongInput(t *testing.T, spec string, line int, want ...string) {
	t.Helper()
	r := newTestRun(t)
	data := filepath.Join(r.dir, "a.jsonl")
	if err := os.WriteFile(data, []byte(`{"instruction": "Selam ver", "input": "", "output": "Merhaba."}`+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(r.dir, "tok.json"), []byte("{}"), 0o644)
	path := r.spec(spec)
	_, err := loadSpec(path, Registry())
	if err == nil {
		t.Fatal("loaded with an input of the wrong kind")
	}
	if !pipeline.IsSpecError(err) {
		t.Fatalf("not a spec error: %v", err)
	}
	if !strings.HasPrefix(err.Error(), path+":"+strconv.Itoa(line)+":") {
		t.Errorf("want line %d: %v", line, err)
	}
	for _, w := range want {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error lacks %q: %v", w, err)
		}
	}
	if r.entries() != 0 {
		t.Error("something ran")
	}
}

func TestPackNeedsTokens(t *testing.T) {
	wrongInput(t, `name: wrong-input
stages:
  alpaca: {kind: jsonl, with: {paths: [a.jsonl]}}
  chat: {kind: chat_template, needs: [alpaca]}
  pack:
    kind: pack
    needs: [chat]
    with: {seq_len: 64}
`, 7, `stage "pack": needs: "chat" is a chat_template stage, but a pack stage reads the tokens of a tokenize or mix stage`, "name a tokenize or mix stage in needs")
}

func TestTokenizeNeedsChat(t *testing.T) {
	wrongInput(t, `name: wrong-input
stages:
  alpaca: {kind: jsonl, with: {paths: [a.jsonl]}}
  tokens: {kind: tokenize, needs: [alpaca], with: {tokenizer: tok.json}}
`, 4, `"alpaca" is a jsonl stage, but a tokenize stage reads the chat text of a chat_template or text stage`)
}

func TestChatNeedsRecords(t *testing.T) {
	wrongInput(t, `name: wrong-input
stages:
  alpaca: {kind: jsonl, with: {paths: [a.jsonl]}}
  chat: {kind: chat_template, needs: [alpaca]}
  again: {kind: chat_template, needs: [chat]}
`, 5, `"chat" is a chat_template stage, but a chat_template stage reads the records of a parquet or jsonl stage`)
}

// TestQLoRAInputsByKind: a qlora stage tells its needs apart by their kind.
func TestQLoRAInputsByKind(t *testing.T) {
	wrongInput(t, `name: wrong-input
stages:
  alpaca: {kind: jsonl, with: {paths: [a.jsonl]}}
  chat: {kind: chat_template, needs: [alpaca]}
  base: {kind: model, with: {preset: tiny}}
  adapter: {kind: qlora, needs: [chat, base], with: {backend: cpu}}
`, 6, `"chat" is a chat_template stage, but a qlora stage reads the packed rows of a pack stage`)
	const head = `name: wrong-input
stages:
  alpaca: {kind: jsonl, with: {paths: [a.jsonl]}}
  chat: {kind: chat_template, needs: [alpaca]}
  tokens: {kind: tokenize, needs: [chat], with: {tokenizer: tok.json}}
  pack: {kind: pack, needs: [tokens], with: {seq_len: 64}}
  base: {kind: model, with: {preset: tiny}}
  other: {kind: model, with: {preset: tiny, seed: 2}}
`
	wrongInput(t, head+"  adapter: {kind: qlora, needs: [pack], with: {backend: cpu}}\n", 9, "no base model", "add a model stage to needs")
	wrongInput(t, head+"  adapter: {kind: qlora, needs: [pack, pack2], with: {backend: cpu}}\n  pack2: {kind: pack, needs: [tokens]}\n", 9, "two pack stages (pack, pack2)")
	wrongInput(t, head+"  adapter: {kind: qlora, needs: [base], with: {backend: cpu}}\n", 9, "no pack stage")
}

// TestMergeAndGGUFInputsByKind: a merge stage takes one qlora stage and one
// base, a gguf stage one checkpoint; other wiring is a spec error, not a
// failure once training is done.
func TestMergeAndGGUFInputsByKind(t *testing.T) {
	const head = `name: wrong-input
stages:
  alpaca: {kind: jsonl, with: {paths: [a.jsonl]}}
  chat: {kind: chat_template, needs: [alpaca]}
  tokens: {kind: tokenize, needs: [chat], with: {tokenizer: tok.json}}
  pack: {kind: pack, needs: [tokens], with: {seq_len: 64}}
  base: {kind: model, with: {preset: tiny}}
  adapter: {kind: qlora, needs: [pack, base], with: {backend: cpu}}
  adapter2: {kind: qlora, needs: [pack, base], with: {backend: cpu, r: 4}}
`
	wrongInput(t, head+"  merged: {kind: merge, needs: [pack, base]}\n", 10, `"pack" is a pack stage, but a merge stage reads the adapter of a qlora stage and the checkpoint of a model stage`)
	wrongInput(t, head+"  merged: {kind: merge, needs: [base]}\n", 10, "no adapter", "add the qlora stage")
	wrongInput(t, head+"  merged: {kind: merge, needs: [adapter, adapter2]}\n", 10, "two qlora stages (adapter, adapter2)")
	wrongInput(t, head+"  merged: {kind: merge, needs: [adapter]}\n", 10, "no base model")
	wrongInput(t, head+"  merged: {kind: merge, needs: [adapter, base], with: {model: m}}\n", 10, "two base models")
	wrongInput(t, head+"  q: {kind: gguf, needs: [adapter]}\n", 10, `"adapter" is a qlora stage, but a gguf stage reads the checkpoint of a merge or model stage`)
	wrongInput(t, head+"  q: {kind: gguf}\n", 10, "nothing to convert")
	wrongInput(t, head+"  q: {kind: gguf, needs: [base], with: {model: m}}\n", 10, "two models to convert")
	wrongInput(t, head+"  q: {kind: gguf, needs: [base]}\n", 10, `model stage "base" writes a random checkpoint without a tokenizer`, "convert a merge stage's model")
	// An adapter trained on a model stage, scored or asked without it: the
	// base would be missed only once training is done. Its stage may come
	// later in the file.
	mc := "  ev: {kind: eval, needs: [adapter], with: {tasks: [multiple_choice], multiple_choice: {paths: [a.jsonl]}}}\n"
	wrongInput(t, head+mc, 10, "no base model: the adapter of stage adapter was trained on model stage base", "add base to needs")
	wrongInput(t, strings.Replace(head, "  adapter: {kind: qlora, needs: [pack, base], with: {backend: cpu}}\n", "", 1)+mc+
		"  adapter: {kind: qlora, needs: [pack, base], with: {backend: cpu}}\n", 9, "no base model: the adapter of stage adapter was trained on model stage base")
	wrongInput(t, head+"  questions: {kind: mt_bench, with: {paths: [a.jsonl]}}\n  answers: {kind: generate, needs: [questions, adapter]}\n", 11,
		"no base model: the adapter of stage adapter was trained on model stage base")
}
