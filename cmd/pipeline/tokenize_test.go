package main

import (
	"bufio"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"gemmaft/internal/testenv"
	"gemmaft/tokenizer"
)

// TestTokenizeCommand runs `pipeline tokenize` on a file of texts and checks
// every output line against the library, in order, in both modes.
func TestTokenizeCommand(t *testing.T) {
	tokPath := testenv.GemmaFile(t, "tokenizer.json")
	tk, err := tokenizer.LoadFile(tokPath)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	texts := []string{"", "Merhaba dünya", "<start_of_turn>user\nİyi misin?<end_of_turn>\n", "  \t\n  ", "🇹🇷 \u0000 \"quoted\""}
	for i := range 5000 { // more than one batch
		texts = append(texts, strings.Repeat("kelime ", i%50))
	}
	var in strings.Builder
	for _, s := range texts {
		b, _ := json.Marshal(map[string]any{"text": s, "other": 1})
		in.Write(b)
		in.WriteByte('\n')
	}
	inPath := filepath.Join(dir, "in.jsonl")
	if err := os.WriteFile(inPath, []byte(in.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, add := range []bool{false, true} {
		outPath := filepath.Join(dir, "out.jsonl")
		args := []string{"tokenize", "--tokenizer", tokPath, "--in", inPath, "--out", outPath, "--offsets"}
		if add {
			args = append(args, "--add-special-tokens=true")
		} else {
			args = append(args, "--add-special-tokens=false")
		}
		if code := execute(args); code != 0 {
			t.Fatalf("tokenize exited %d", code)
		}
		f, err := os.Open(outPath)
		if err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(f)
		sc.Buffer(nil, 1<<24)
		n := 0
		for sc.Scan() {
			var rec struct {
				IDs     []int32  `json:"ids"`
				Offsets [][2]int `json:"offsets"`
			}
			if err := json.Unmarshal(sc.Bytes(), &rec); err != nil {
				t.Fatalf("output line %d: %v", n+1, err)
			}
			ids, offs := tk.Encode(texts[n], add)
			if !slices.Equal(rec.IDs, ids) || !slices.Equal(rec.Offsets, offs) {
				t.Fatalf("line %d (addSpecial=%v): got %v, want %v", n+1, add, rec.IDs, ids)
			}
			n++
		}
		f.Close()
		if n != len(texts) {
			t.Fatalf("%d output lines for %d inputs", n, len(texts))
		}
	}
}

func TestTokenizeCommandErrors(t *testing.T) {
	tokPath := testenv.GemmaFile(t, "tokenizer.json")
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.jsonl")
	os.WriteFile(bad, []byte("{\"text\":\"ok\"}\n{\"txt\":\"no\"}\n"), 0o644)
	notJSON := filepath.Join(dir, "notjson.jsonl")
	os.WriteFile(notJSON, []byte("{\"text\":\"ok\"}\nnot json\n"), 0o644)
	out := filepath.Join(dir, "out.jsonl")
	cases := []struct {
		args []string
		code int
	}{
		{[]string{"tokenize", "--tokenizer", "", "--in", bad, "--out", out}, exitUsage},
		{[]string{"tokenize", "--tokenizer", filepath.Join(dir, "missing.json"), "--in", bad, "--out", out}, exitUsage},
		{[]string{"tokenize", "--tokenizer", tokPath, "--in", filepath.Join(dir, "missing.jsonl"), "--out", out}, exitUsage},
		{[]string{"tokenize", "--tokenizer", tokPath, "--in", bad, "--out", dir}, exitUsage},
		{[]string{"tokenize", "--tokenizer", tokPath, "--in", bad, "--out", out}, exitFailed},
		{[]string{"tokenize", "--tokenizer", tokPath, "--in", notJSON, "--out", out}, exitFailed},
		{[]string{"tokenize", "--tokenizer", tokPath, "extra-arg"}, exitUsage},
	}
	for _, c := range cases {
		started = false // as in a fresh process
		if code := execute(c.args); code != c.code {
			t.Errorf("%v: exit %d, want %d", c.args, code, c.code)
		}
	}
	// A repository's id, as transformers takes it, names the hf:// form.
	r := runCLI(t, dir, "tokenize", "--tokenizer", "google/gemma-3-1b-it", "--in", bad)
	if r.code != exitUsage || !strings.Contains(r.stderr, "no such file; on the Hugging Face Hub that is --tokenizer hf://google/gemma-3-1b-it/tokenizer.json") {
		t.Errorf("--tokenizer google/gemma-3-1b-it: exit %d\n%s", r.code, r.stderr)
	}
}

// TestTokenizeLineErrors: a bad input line is named with what is wrong in
// the user's terms.
func TestTokenizeLineErrors(t *testing.T) {
	tokPath := testenv.GemmaFile(t, "tokenizer.json")
	dir := t.TempDir()
	for input, want := range map[string]string{
		"{\"text\":\"a\"}\n\n{\"text\":\"b\"}\n":   `input line 2: blank; every line is a {"text": ...} object`,
		"{\"text\":5}\n":                           `input line 1: "text" is a number, not a string`,
		"{\"txt\":\"a\"}\n":                        `input line 1: no "text" field`,
		"[1]\n":                                    `input line 1: not a JSON object`,
		"{\"text\":\"a\"}\n{\"text\":\"a\xff\"}\n": `input line 2: "text": invalid UTF-8 at byte 1`,
		"{\"text\":\"\\ud800\"}\n":                 `input line 1: "text": unpaired UTF-16 surrogate`,
	} {
		in := filepath.Join(dir, "in.jsonl")
		writeFile(t, in, input)
		r := runCLI(t, dir, "tokenize", "--tokenizer", tokPath, "--in", in)
		if r.code != exitFailed || !strings.Contains(r.stderr, want) {
			t.Errorf("%q: exit %d, %s; want %q", input, r.code, r.stderr, want)
		}
	}
	in := filepath.Join(dir, "bom.jsonl")
	writeFile(t, in, "\xef\xbb\xbf{\"text\":\"a\"}\n")
	if r := runCLI(t, dir, "tokenize", "--tokenizer", tokPath, "--in", in); r.code != 0 || !strings.HasPrefix(r.stdout, `{"ids":[`) {
		t.Errorf("a byte order mark first: exit %d %q\n%s", r.code, r.stdout, r.stderr)
	}
	if r := runCLI(t, dir, "tokenize", "--tokenizer", tokPath, "in.jsonl"); r.code != exitUsage || !strings.Contains(r.stderr, "read a file with --in FILE") {
		t.Errorf("an argument: exit %d, %s", r.code, r.stderr)
	}
	// Blank lines at the end answer nothing, as a file's doubled last
	// newline would have them.
	in = filepath.Join(dir, "trailing.jsonl")
	writeFile(t, in, "{\"text\":\"a\"}\n{\"text\":\"b\"}\n\n  \n")
	if r := runCLI(t, dir, "tokenize", "--tokenizer", tokPath, "--in", in); r.code != 0 || strings.Count(r.stdout, "\n") != 2 {
		t.Errorf("blank lines at the end: exit %d %q\n%s", r.code, r.stdout, r.stderr)
	}
	// --out naming --in would replace the texts with their ids.
	if r := runCLI(t, dir, "tokenize", "--tokenizer", tokPath, "--in", in, "--out", in); r.code != exitUsage || !strings.Contains(r.stderr, "is --in") {
		t.Errorf("--out the same as --in: exit %d\n%s", r.code, r.stderr)
	}
	if b, _ := os.ReadFile(in); !strings.HasPrefix(string(b), `{"text":"a"}`) {
		t.Errorf("--in was replaced: %q", b)
	}
}
