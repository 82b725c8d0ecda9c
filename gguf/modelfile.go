package gguf

import (
	"fmt"
	"strings"

	"gemmaft/converse"
)

// OllamaTemplate is the TEMPLATE of the Modelfile we write: Ollama's Go
// text/template over .Messages that renders the turns as Gemma 3's chat
// template does (and so as training saw them): no system turn, but the
// system text and a blank line in front of the first user message; each
// turn "<start_of_turn>ROLE\n" + content + "<end_of_turn>\n" with the
// assistant's role written "model"; after a final user turn, the opening
// of the model's. <bos> is not written: llama.cpp adds it
// (tokenizer.ggml.add_bos_token). The template cannot trim messages as the
// Jinja one does, so a message with outer white space keeps it.
const OllamaTemplate = `{{- $system := "" }}
{{- range .Messages }}{{ if eq .Role "system" }}{{ $system = .Content }}{{ end }}{{ end }}
{{- $first := true }}
{{- range $i, $m := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq $m.Role "user" }}<start_of_turn>user
{{ if $first }}{{ if $system }}{{ $system }}

{{ end }}{{ $first = false }}{{ end }}{{ $m.Content }}<end_of_turn>
{{ if $last }}<start_of_turn>model
{{ end }}
{{- else if eq $m.Role "assistant" }}<start_of_turn>model
{{ $m.Content }}{{ if not $last }}<end_of_turn>
{{ end }}
{{- end }}
{{- end }}`

// ModelfileOptions fills a Modelfile.
type ModelfileOptions struct {
	// GGUF is the model file's name, beside the Modelfile.
	GGUF string
	// System is the system text training used for every record, if any:
	// Ollama then prompts as training did without being told.
	System string
	// ModelDir, when set, is the Hugging Face folder whose
	// generation_config.json gives the sampling defaults.
	ModelDir string
}

// Modelfile returns an Ollama Modelfile for a converted Gemma 3: the file,
// the template, <end_of_turn> as the stop sequence, the training system
// text and the checkpoint's sampling defaults.
func Modelfile(o ModelfileOptions) (string, error) {
	var b strings.Builder
	fmt.Fprintf(&b, "# Ollama: ollama create NAME -f Modelfile\nFROM ./%s\n\n", o.GGUF)
	fmt.Fprintf(&b, "TEMPLATE \"\"\"%s\"\"\"\n\n", OllamaTemplate)
	if o.System != "" {
		if strings.Contains(o.System, `"""`) {
			return "", fmt.Errorf("the system text holds \"\"\", which a Modelfile cannot quote")
		}
		fmt.Fprintf(&b, "SYSTEM \"\"\"%s\"\"\"\n\n", o.System)
	}
	b.WriteString("PARAMETER stop \"<end_of_turn>\"\n")
	if o.ModelDir != "" {
		params, err := samplingDefaults(o.ModelDir)
		if err != nil {
			return "", err
		}
		for _, p := range params {
			fmt.Fprintf(&b, "PARAMETER %s\n", p)
		}
	}
	return b.String(), nil
}

// samplingDefaults are the temperature, top_k and top_p with which
// transformers' generate decodes by the folder's generation_config.json
// (converse.Sampling: greedy unless do_sample, transformers' defaults for
// what a sampling config leaves out), so that Ollama, whose own defaults
// differ (temperature 0.8, top_k 40), answers as transformers and `pipeline
// chat` do. A folder without the file leaves Ollama's.
func samplingDefaults(dir string) ([]string, error) {
	gc, err := converse.ReadGenerationConfig(dir)
	if err != nil || gc == nil {
		return nil, err
	}
	temperature, topK, topP := gc.Sampling()
	if temperature == 0 {
		return []string{"temperature 0"}, nil
	}
	topK, topP = converse.TopPZero(topK, topP)
	return []string{fmt.Sprintf("temperature %v", temperature), fmt.Sprintf("top_k %d", topK), fmt.Sprintf("top_p %v", topP)}, nil
}
