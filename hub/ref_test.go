package hub

import "testing"

// TestRefFor: a missing local path written as a repository's id is taken
// for the Hub reference it was meant as; file paths are not.
func TestRefFor(t *testing.T) {
	for path, want := range map[string]string{
		"google/gemma-3-1b-it":     "hf://google/gemma-3-1b-it/tokenizer.json",
		"meta-llama/Llama-3.2-1B":  "hf://meta-llama/Llama-3.2-1B/tokenizer.json",
		"data/tokenizer.json":      "",
		"data/train-00000.parquet": "",
		"../models/x":              "",
		"/abs/gemma":               "",
		"gemma-3-1b-it":            "",
		"models/gemma/3":           "",
	} {
		if got := RefFor(path, "tokenizer.json"); got != want {
			t.Errorf("RefFor(%q) = %q, want %q", path, got, want)
		}
	}
	if got := RefFor("google/gemma-3-12b-it", ""); got != "hf://google/gemma-3-12b-it" {
		t.Errorf("a model folder: %q", got)
	}
}
