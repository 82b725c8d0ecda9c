package main

import (
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestLossMatchesReference runs `pipeline loss` on a parity case and
// compares with the loss transformers + PEFT computed for it.
func TestLossMatchesReference(t *testing.T) {
	ref, _ := filepath.Abs("../../trainer/testdata/reference")
	c := filepath.Join(ref, "t5_gqa")
	res := runCLI(t, t.TempDir(), "loss", "--model", filepath.Join(c, "model"), "--adapter", filepath.Join(c, "adapter"), "--data", filepath.Join(c, "batch.jsonl"))
	if res.code != 0 {
		t.Fatalf("exit %d: %s", res.code, res.stderr)
	}
	var got struct {
		Loss   float64 `json:"loss"`
		Tokens int     `json:"tokens"`
	}
	if err := json.Unmarshal([]byte(res.stdout), &got); err != nil {
		t.Fatalf("output %q: %v", res.stdout, err)
	}
	var want struct {
		Loss   float64 `json:"loss"`
		Tokens int     `json:"tokens"`
	}
	b, err := os.ReadFile(filepath.Join(ref, "golden", "t5_gqa", "golden.json"))
	if err != nil {
		t.Fatal(err)
	}
	json.Unmarshal(b, &want)
	if got.Tokens != want.Tokens || math.Abs(got.Loss-want.Loss) > 1e-5*want.Loss {
		t.Errorf("loss %v over %d tokens, reference %v over %d", got.Loss, got.Tokens, want.Loss, want.Tokens)
	}

	// An adapter made for another model is a clear failure, not a panic.
	res = runCLI(t, t.TempDir(), "loss", "--model", filepath.Join(c, "model"), "--adapter", filepath.Join(ref, "orig_mqa", "adapter"), "--data", filepath.Join(c, "batch.jsonl"))
	if res.code != 1 || !strings.Contains(res.stderr, "another model") {
		t.Errorf("foreign adapter: exit %d, %q", res.code, res.stderr)
	}
	res = runCLI(t, t.TempDir(), "loss", "--model", filepath.Join(c, "model"))
	if res.code != 2 {
		t.Errorf("missing --data: exit %d, %q", res.code, res.stderr)
	}

	// Rows longer than the model's context are scored, and warned of.
	short := filepath.Join(t.TempDir(), "short")
	if err := os.CopyFS(short, os.DirFS(filepath.Join(c, "model"))); err != nil {
		t.Fatal(err)
	}
	cfg, _ := os.ReadFile(filepath.Join(short, "config.json"))
	var m map[string]any
	json.Unmarshal(cfg, &m)
	m["max_position_embeddings"] = 4
	cfg, _ = json.Marshal(m)
	os.WriteFile(filepath.Join(short, "config.json"), cfg, 0o644)
	res = runCLI(t, t.TempDir(), "loss", "--model", short, "--data", filepath.Join(c, "batch.jsonl"))
	if res.code != 0 || !strings.Contains(res.stderr, "more than the model's context of 4 positions") {
		t.Errorf("rows past the context: exit %d, %q", res.code, res.stderr)
	}
}
