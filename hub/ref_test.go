package hub

import (
	"slices"
	"strings"
	"testing"
)

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

// TestMatchAnyFolders: ** in a hf:// path is any number of folders, as the
// Hub's data_files patterns read it; a pattern matching nothing names the
// repository's files.
func TestMatchAnyFolders(t *testing.T) {
	files := []File{{Path: "README.md"}, {Path: "data/train-0.parquet"}, {Path: "data/tr/train-1.parquet"}, {Path: "data/tr/x/train-2.parquet"}}
	got, err := Match(files, []string{"data/**/*.parquet"}, "org/set")
	if want := []string{"data/train-0.parquet", "data/tr/train-1.parquet", "data/tr/x/train-2.parquet"}; err != nil || !slices.Equal(got, want) {
		t.Errorf("data/**/*.parquet: %v (%v), want %v", got, err, want)
	}
	if _, err := Match(files, []string{"data/*.jsonl"}, "org/set"); err == nil || !strings.Contains(err.Error(), "README.md") {
		t.Errorf("no match: %v", err)
	}
	if _, err := Match(files, []string{"data/[a"}, "org/set"); err == nil || !strings.Contains(err.Error(), "bad pattern") {
		t.Errorf("bad pattern: %v", err)
	}
}
