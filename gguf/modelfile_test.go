package gguf

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"text/template"

	"gemmaft/chat"
)

// ollamaMessage is the shape Ollama's templates see in .Messages.
type ollamaMessage struct{ Role, Content string }

// TestOllamaTemplateRendersAsTraining: Ollama executes TEMPLATE with Go's
// text/template; for conversations with and without a system text, ending
// in a user turn (the prompt Ollama sends) or a model turn, it renders what
// our chat template (byte-equal to the Jinja template) renders, less the
// <bos> llama.cpp adds itself.
func TestOllamaTemplateRendersAsTraining(t *testing.T) {
	tmpl, err := template.New("ollama").Parse(OllamaTemplate)
	if err != nil {
		t.Fatal(err)
	}
	sys := chat.Message{Role: "system", Content: "Sen yardımsever bir Türkçe asistansın."}
	u1 := chat.Message{Role: "user", Content: "Merhaba! Bugün hava nasıl?"}
	a1 := chat.Message{Role: "assistant", Content: "Güneşli.\n\nBaşka bir sorunuz var mı?"}
	u2 := chat.Message{Role: "user", Content: "Ankara'da da öyle mi?"}
	a2 := chat.Message{Role: "assistant", Content: "Ankara'da bulutlu."}
	for _, conv := range [][]chat.Message{
		{u1}, {sys, u1}, {u1, a1, u2}, {sys, u1, a1, u2}, {sys, u1, a1, u2, a2}, {u1, a1},
	} {
		var want string
		if conv[len(conv)-1].Role == "user" {
			want, _, err = chat.RenderGemma3Prompt(conv)
		} else {
			// Ollama leaves the last answer open, to be continued.
			want, _, err = chat.RenderGemma3(conv)
			want = strings.TrimSuffix(want, "<end_of_turn>\n")
		}
		if err != nil {
			t.Fatal(err)
		}
		want = strings.TrimPrefix(want, "<bos>")
		var msgs []ollamaMessage
		for _, m := range conv {
			msgs = append(msgs, ollamaMessage{m.Role, m.Content})
		}
		var got strings.Builder
		if err := tmpl.Execute(&got, map[string]any{"Messages": msgs}); err != nil {
			t.Fatal(err)
		}
		if got.String() != want {
			t.Errorf("%d messages:\nOllama  %q\ntraining %q", len(conv), got.String(), want)
		}
	}
}

func TestModelfile(t *testing.T) {
	dir := t.TempDir()
	// Gemma 3's: it samples, and leaves the temperature at transformers' 1.
	os.WriteFile(filepath.Join(dir, "generation_config.json"), []byte(`{"do_sample": true, "top_k": 64, "top_p": 0.95, "eos_token_id": [1, 106]}`), 0o644)
	mf, err := Modelfile(ModelfileOptions{GGUF: "tr.q8_0.gguf", System: "Sen yardımsever bir asistansın.", ModelDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"FROM ./tr.q8_0.gguf\n",
		"TEMPLATE \"\"\"" + OllamaTemplate + "\"\"\"\n",
		"SYSTEM \"\"\"Sen yardımsever bir asistansın.\"\"\"\n",
		"PARAMETER stop \"<end_of_turn>\"\n",
		"PARAMETER top_k 64\n",
		"PARAMETER top_p 0.95\n",
		"PARAMETER temperature 1\n",
	} {
		if !strings.Contains(mf, want) {
			t.Errorf("Modelfile lacks %q:\n%s", want, mf)
		}
	}
	// Without do_sample transformers decodes greedily; so does Ollama then.
	os.WriteFile(filepath.Join(dir, "generation_config.json"), []byte(`{"top_k": 64, "eos_token_id": [1, 106]}`), 0o644)
	if mf, err := Modelfile(ModelfileOptions{GGUF: "m.gguf", ModelDir: dir}); err != nil || !strings.Contains(mf, "PARAMETER temperature 0\n") || strings.Contains(mf, "top_k") {
		t.Errorf("a greedy config: %v\n%s", err, mf)
	}
	if _, err := Modelfile(ModelfileOptions{GGUF: "m.gguf", System: `say """hi"""`}); err == nil {
		t.Error("a system text with \"\"\" was written into a Modelfile")
	}
}
