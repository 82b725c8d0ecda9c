package tokenizer

import (
	"bufio"
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
)

// Helpers that run the oracles: Hugging Face tokenizers through Node
// (npm/hf-tokenize.js) and the real chat template through Python's jinja2
// (scripts/oracle/render_chat.py).

func repoRoot(t testing.TB) string {
	dir, err := filepath.Abs(".")
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("no go.mod above the test directory")
		}
		dir = parent
	}
}

func gemmaModelFile(t testing.TB, name string) string {
	p := filepath.Join(repoRoot(t), "npm", "node_modules", "@lenml", "tokenizer-gemma3", "models", name)
	if _, err := os.Stat(p); err != nil {
		t.Skipf("%s is missing; run scripts/npm-deps.sh (scripts/test.sh does)", p)
	}
	return p
}

var (
	gemmaOnce sync.Once
	gemmaTok  *Tokenizer
	gemmaErr  error
)

// gemma loads the real Gemma 3 tokenizer once for all tests.
func gemma(t testing.TB) *Tokenizer {
	path := gemmaModelFile(t, "tokenizer.json")
	gemmaOnce.Do(func() { gemmaTok, gemmaErr = LoadFile(path) })
	if gemmaErr != nil {
		t.Fatal(gemmaErr)
	}
	return gemmaTok
}

func needTool(t testing.TB, name string) {
	if _, err := exec.LookPath(name); err != nil {
		t.Skipf("%s is not installed; the oracle needs it", name)
	}
}

// runLines runs a command with JSON lines on stdin and returns its output
// lines decoded into values of type T.
func runLines[T any](t testing.TB, in [][]byte, name string, args ...string) []T {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = repoRoot(t)
	cmd.Stdin = bytes.NewReader(bytes.Join(append(in, nil), []byte("\n")))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, stderr.Bytes())
	}
	var res []T
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(nil, 1<<28)
	for sc.Scan() {
		var v T
		if err := json.Unmarshal(sc.Bytes(), &v); err != nil {
			t.Fatalf("%s: bad output line: %v", name, err)
		}
		res = append(res, v)
	}
	return res
}

type hfEncoding struct {
	IDs     []int32  `json:"ids"`
	Offsets [][2]int `json:"offsets"`
}

// hfEncode runs Hugging Face tokenizers on texts (with byte offsets).
func hfEncode(t testing.TB, tokenizerJSON string, texts []string, addSpecial bool) []hfEncoding {
	needTool(t, "node")
	in := make([][]byte, len(texts))
	for i, s := range texts {
		in[i], _ = json.Marshal(map[string]string{"text": s})
	}
	args := []string{"npm/hf-tokenize.js", "encode", tokenizerJSON, "--offsets"}
	if addSpecial {
		args = append(args, "--add-special")
	}
	res := runLines[hfEncoding](t, in, "node", args...)
	if len(res) != len(texts) {
		t.Fatalf("oracle gave %d encodings for %d texts", len(res), len(texts))
	}
	return res
}

// hfDecode runs Hugging Face's decode on each id list.
func hfDecode(t testing.TB, tokenizerJSON string, ids [][]int32, skipSpecial bool) []string {
	needTool(t, "node")
	in := make([][]byte, len(ids))
	for i, x := range ids {
		if x == nil {
			x = []int32{}
		}
		in[i], _ = json.Marshal(map[string][]int32{"ids": x})
	}
	args := []string{"npm/hf-tokenize.js", "decode", tokenizerJSON}
	if skipSpecial {
		args = append(args, "--skip-special")
	}
	res := runLines[struct{ Text string }](t, in, "node", args...)
	if len(res) != len(ids) {
		t.Fatalf("oracle gave %d texts for %d id lists", len(res), len(ids))
	}
	out := make([]string, len(res))
	for i, r := range res {
		out[i] = r.Text
	}
	return out
}

// alpacaPath returns the shared alpaca-tr records, or skips.
func alpacaPath(t testing.TB) string {
	p := filepath.Join(repoRoot(t), "..", "shared", "data", "alpaca-tr", "alpaca-tr.jsonl.gz")
	if _, err := os.Stat(p); err != nil {
		t.Skipf("alpaca-tr data is missing at %s", p)
	}
	return p
}

// renderAlpaca renders every alpaca-tr record with the real Gemma 3 chat
// template through Python's jinja2, as transformers would.
func renderAlpaca(t testing.TB, system *string) []string {
	needTool(t, "python3")
	args := []string{"scripts/oracle/render_chat.py", gemmaModelFile(t, "tokenizer_config.json"), "--alpaca", alpacaPath(t)}
	if system != nil {
		args = append(args, "--system", *system)
	}
	res := runLines[struct {
		Text  string
		Error string
	}](t, nil, "python3", args...)
	texts := make([]string, len(res))
	for i, r := range res {
		if r.Error != "" {
			t.Fatalf("record %d: template error: %s", i, r.Error)
		}
		texts[i] = r.Text
	}
	return texts
}
