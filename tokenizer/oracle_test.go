package tokenizer

import (
	"bufio"
	"bytes"
	"encoding/json"
	"os/exec"
	"sync"
	"testing"

	"gemmaft/internal/testenv"
)

// Helpers that run the oracles: Hugging Face tokenizers through Node
// (npm/hf-tokenize.js) and the real chat template through Python's jinja2
// (scripts/oracle/render_chat.py).

var (
	gemmaOnce sync.Once
	gemmaTok  *Tokenizer
	gemmaErr  error
)

// gemma loads the real Gemma 3 tokenizer once for all tests.
func gemma(t testing.TB) *Tokenizer {
	path := testenv.GemmaFile(t, "tokenizer.json")
	gemmaOnce.Do(func() { gemmaTok, gemmaErr = LoadFile(path) })
	if gemmaErr != nil {
		t.Fatal(gemmaErr)
	}
	return gemmaTok
}

// runLines runs a command with JSON lines on stdin and returns its output
// lines decoded into values of type T.
func runLines[T any](t testing.TB, in [][]byte, name string, args ...string) []T {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = testenv.RepoRoot(t)
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
	testenv.NeedTool(t, "node")
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
	testenv.NeedTool(t, "node")
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

// renderAlpaca renders every alpaca-tr record with the real Gemma 3 chat
// template through Python's jinja2, as transformers would.
func renderAlpaca(t testing.TB, system *string) []string {
	testenv.NeedTool(t, "python3")
	args := []string{"scripts/oracle/render_chat.py", testenv.GemmaFile(t, "tokenizer_config.json"), "--alpaca", testenv.AlpacaTR(t, "alpaca-tr.jsonl.gz")}
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
