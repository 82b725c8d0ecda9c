package stages

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"gemmaft/pipeline"
)

// TestQLoRAInputsByKind: a qlora stage tells its needs apart by their kind
// and names the stage it cannot use and what it wants instead.
func TestQLoRAInputsByKind(t *testing.T) {
	r := newTestRun(t)
	data := filepath.Join(r.dir, "a.jsonl")
	if err := os.WriteFile(data, []byte(`{"instruction": "Selam ver", "input": "", "output": "Merhaba."}`+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	spec := r.spec(`name: wrong-input
stages:
  alpaca: {kind: jsonl, with: {paths: [a.jsonl]}}
  chat: {kind: chat_template, needs: [alpaca]}
  base: {kind: model, with: {preset: tiny}}
  adapter: {kind: qlora, needs: [chat, base], with: {backend: cpu}}
`)
	_, err := r.run(spec, pipeline.Options{})
	if err == nil {
		t.Fatal("a qlora stage trained on chat text")
	}
	for _, want := range []string{"stage adapter (qlora)", "stage chat of kind chat_template", "a pack stage (packed rows)"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q: %v", want, err)
		}
	}
}
