package tokenizer

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"gemmaft/internal/testenv"
)

// smallTokenizer is a tokenizer.json small enough to edit in tests: a few
// letters and merges, an unknown token, and no byte fallback unless asked.
func smallTokenizer(edit func(m map[string]any)) []byte {
	vocab := map[string]int{"<unk>": 0, "<bos>": 1, "a": 2, "b": 3, "▁": 4, "ab": 5, "▁a": 6, "▁ab": 7, "c": 8, "bc": 9, "abc": 10, "<0x41>": 11}
	m := map[string]any{
		"version":    "1.0",
		"truncation": nil,
		"padding":    nil,
		"added_tokens": []any{
			map[string]any{"id": 1, "content": "<bos>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
		},
		"normalizer":    map[string]any{"type": "Replace", "pattern": map[string]any{"String": " "}, "content": "▁"},
		"pre_tokenizer": map[string]any{"type": "Split", "pattern": map[string]any{"String": " "}, "behavior": "MergedWithPrevious", "invert": false},
		"post_processor": map[string]any{
			"type":           "TemplateProcessing",
			"single":         []any{map[string]any{"SpecialToken": map[string]any{"id": "<bos>", "type_id": 0}}, map[string]any{"Sequence": map[string]any{"id": "A", "type_id": 0}}},
			"pair":           []any{},
			"special_tokens": map[string]any{"<bos>": map[string]any{"id": "<bos>", "ids": []int{1}, "tokens": []string{"<bos>"}}},
		},
		"decoder": map[string]any{"type": "Sequence", "decoders": []any{
			map[string]any{"type": "Replace", "pattern": map[string]any{"String": "▁"}, "content": " "},
			map[string]any{"type": "ByteFallback"}, map[string]any{"type": "Fuse"},
		}},
		"model": map[string]any{
			"type": "BPE", "dropout": nil, "unk_token": "<unk>", "continuing_subword_prefix": nil, "end_of_word_suffix": nil,
			"fuse_unk": true, "byte_fallback": false, "ignore_merges": false, "vocab": vocab,
			"merges": [][2]string{{"a", "b"}, {"▁", "a"}, {"b", "c"}, {"▁a", "b"}, {"ab", "c"}},
		},
	}
	if edit != nil {
		edit(m)
	}
	b, err := json.Marshal(m)
	if err != nil {
		panic(err)
	}
	return b
}

func model(m map[string]any) map[string]any { return m["model"].(map[string]any) }

// TestLoadErrors: every component or option this package does not
// implement is refused with a message naming it.
func TestLoadErrors(t *testing.T) {
	cases := []struct {
		name string
		edit func(m map[string]any)
		want string
	}{
		{"metaspace", func(m map[string]any) { m["pre_tokenizer"] = map[string]any{"type": "Metaspace"} }, `pre_tokenizer type "Metaspace" is not supported`},
		{"nfc", func(m map[string]any) { m["normalizer"] = map[string]any{"type": "NFC"} }, `normalizer type "NFC" is not supported`},
		{"regex replace", func(m map[string]any) {
			m["normalizer"] = map[string]any{"type": "Replace", "pattern": map[string]any{"Regex": " +"}, "content": "▁"}
		}, "only a String pattern"},
		{"split that matters", func(m map[string]any) { m["normalizer"] = nil }, "pre_tokenizer Split"},
		{"wordpiece", func(m map[string]any) { model(m)["type"] = "WordPiece" }, `model: type "WordPiece" is not supported: only BPE is supported`},
		// A real Unigram model: its vocab is a list of [piece, score], which
		// must not be parsed as BPE's before the type is refused.
		{"unigram", func(m map[string]any) {
			m["model"] = map[string]any{"type": "Unigram", "unk_id": 0, "vocab": []any{[]any{"<unk>", 0.0}, []any{"a", -1.5}}, "byte_fallback": false}
		}, `model: type "Unigram" is not supported: only BPE is supported`},
		{"dropout", func(m map[string]any) { model(m)["dropout"] = 0.1 }, "dropout"},
		{"ignore merges", func(m map[string]any) { model(m)["ignore_merges"] = true }, "ignore_merges"},
		{"unknown model field", func(m map[string]any) { model(m)["surprise"] = 1 }, `unknown field "surprise"`},
		{"bad merge", func(m map[string]any) { model(m)["merges"] = [][2]string{{"a", "zz"}} }, `"zz"`},
		{"merge result missing", func(m map[string]any) { model(m)["merges"] = [][2]string{{"b", "a"}} }, "merges[0]"},
		{"strip decoder", func(m map[string]any) {
			m["decoder"] = map[string]any{"type": "Sequence", "decoders": []any{map[string]any{"type": "Strip"}}}
		}, `decoder.decoders[0] type "Strip" is not supported`},
		{"bytelevel post", func(m map[string]any) { m["post_processor"] = map[string]any{"type": "ByteLevel"} }, `post_processor type "ByteLevel" is not supported`},
		{"lstrip", func(m map[string]any) {
			m["added_tokens"] = []any{map[string]any{"id": 1, "content": "<bos>", "lstrip": true, "special": true}}
		}, "lstrip"},
		{"truncation", func(m map[string]any) { m["truncation"] = map[string]any{"max_length": 5} }, "truncation"},
		{"no unk no fallback", func(m map[string]any) { model(m)["unk_token"] = nil }, "neither byte_fallback nor unk_token"},
	}
	for _, c := range cases {
		_, err := Load(smallTokenizer(c.edit))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: error %v, want one containing %q", c.name, err, c.want)
		}
	}
	for _, bad := range []string{"", "{", `{"model": {"type": "BPE", "vocab": {"a": 1,}}}`, `{"model": 3}`, `[]`, `{"model":{"type":"BPE","vocab":{},"merges":[]}} x`} {
		if _, err := Load([]byte(bad)); err == nil {
			t.Errorf("Load(%q) succeeded", bad)
		}
	}
	if _, err := Load(smallTokenizer(nil)); err != nil {
		t.Fatalf("the unedited small tokenizer does not load: %v", err)
	}
}

// TestSmallParity compares a tokenizer without byte fallback (so unknown
// characters become <unk>, fused or not) with Hugging Face.
func TestSmallParity(t *testing.T) {
	texts := []string{"", "abc", " ab c", "ab  abc a", "xyz", "axyb", "a xy b", "ĞĞĞ ab ğ", "<bos>a<bos>", "abcabc abc", "\u0000ab", "A", "<0x41>"}
	for _, fuse := range []bool{true, false} {
		data := smallTokenizer(func(m map[string]any) { model(m)["fuse_unk"] = fuse })
		tk, err := Load(data)
		if err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(t.TempDir(), "tokenizer.json")
		if err := os.WriteFile(path, data, 0o644); err != nil {
			t.Fatal(err)
		}
		for _, add := range []bool{false, true} {
			compareEncodings(t, tk, texts, add, hfEncode(t, path, texts, add))
		}
	}
}

// TestLoadTime: the 33 MB Gemma 3 file loads well under a second. It
// reports rather than fails on a slow machine: timing is the benchmark's
// job (BenchmarkLoad).
func TestLoadGemma(t *testing.T) {
	path := testenv.GemmaFile(t, "tokenizer.json")
	start := time.Now()
	tk, err := LoadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("loaded in %v", time.Since(start))
	if tk.VocabSize() != 262145 || len(tk.merges) != 514906 {
		t.Errorf("vocab %d merges %d, want 262145 and 514906", tk.VocabSize(), len(tk.merges))
	}
	if id, ok := tk.ID("<start_of_turn>"); !ok || id != 105 {
		t.Errorf("ID(<start_of_turn>) = %d, %v", id, ok)
	}
	if s, ok := tk.Token(262144); !ok || s != "<image_soft_token>" {
		t.Errorf("Token(262144) = %q, %v", s, ok)
	}
	if _, err := tk.Decode([]int32{262145}, false); err == nil {
		t.Error("Decode of an id past the vocabulary succeeded")
	}
	// The word rule that makes caching safe must hold for the real merges:
	// a space starts a word except after ">" (the merge ">" + "▁</").
	sp := tk.runeID('▁')
	if !tk.rules.cutBefore('a', tk.runeID('a'), '▁', sp) || tk.rules.cutBefore('>', tk.runeID('>'), '▁', sp) ||
		tk.rules.cutBefore('▁', sp, '▁', sp) || !tk.rules.byteSafe {
		t.Error("word rules derived from the Gemma 3 merges are not the expected ones")
	}
}

// referenceEncode is Hugging Face's procedure without words or caching:
// BPE over each whole stretch between added tokens.
func referenceEncode(tk *Tokenizer, text string) []int32 {
	e := newEncoder().(*encoder)
	var ids []int32
	seg := 0
	bpe := func(start, end int) {
		if start < end {
			syms := tk.wordSymbols(e, text, start, end)
			tk.merges.mergeAll(syms, &e.heap)
			for _, s := range syms {
				if !s.gone {
					ids = append(ids, s.id)
				}
			}
		}
	}
	for i := 0; i < len(text); {
		n, id := tk.added.longest(text[i:])
		if n == 0 {
			i++
			continue
		}
		bpe(seg, i)
		ids = append(ids, id)
		i += n
		seg = i
	}
	bpe(seg, len(text))
	return ids
}

// checkEncoding holds whatever Encode returns to its own invariants.
func checkEncoding(t *testing.T, tk *Tokenizer, s string) {
	ids, offs := tk.Encode(s, false)
	if len(ids) != len(offs) {
		t.Fatalf("%d ids, %d offsets", len(ids), len(offs))
	}
	if ref := referenceEncode(tk, s); !slices.Equal(ids, ref) {
		t.Fatalf("Encode(%q) = %v, but BPE over whole stretches gives %v", s, ids, ref)
	}
	if got := tk.EncodeIDs(s, false); !slices.Equal(got, ids) {
		t.Fatalf("EncodeIDs differs from Encode")
	}
	withBOS := tk.EncodeIDs(s, true)
	if !slices.Equal(withBOS, append(slices.Clone(tk.prefix), ids...)) {
		t.Fatalf("addSpecial did not just add %v", tk.prefix)
	}
	// Offsets tile the text: each token starts where the previous ended,
	// except byte tokens of one character, which share its span.
	end := 0
	for k, o := range offs {
		if k > 0 && o == offs[k-1] && tk.isByteToken(ids[k]) {
			continue
		}
		if o[0] != end || o[1] <= o[0] || o[1] > len(s) {
			t.Fatalf("Encode(%q): token %d has offsets %v after end %d", s, k, o, end)
		}
		end = o[1]
		piece := s[o[0]:o[1]]
		tok, _ := tk.Token(ids[k])
		if !tk.isByteToken(ids[k]) && tok != piece && tok != strings.ReplaceAll(piece, " ", "▁") {
			t.Fatalf("Encode(%q): token %d is %q but covers %q", s, k, tok, piece)
		}
	}
	if end != len(s) {
		t.Fatalf("Encode(%q): tokens cover %d of %d bytes", s, end, len(s))
	}
	dec, err := tk.Decode(ids, false)
	if err != nil {
		t.Fatal(err)
	}
	if utf8.ValidString(s) && dec != strings.ReplaceAll(s, "▁", " ") {
		t.Fatalf("Decode(Encode(%q)) = %q", s, dec)
	}
}

func (t *Tokenizer) isByteToken(id int32) bool {
	tok, _ := t.Token(id)
	_, ok := byteToken(tok)
	return ok
}

// FuzzEncode: never panics, agrees with BPE over whole stretches (so the
// word cut proof holds in practice), offsets tile the input, and decoding
// gives the text back (with "▁" read as a space, as Hugging Face does).
func FuzzEncode(f *testing.F) {
	for _, s := range []string{"", "Merhaba dünya", "a>  </b", "<start_of_turn>user\nİ<end_of_turn>", "🇹🇷\u0301 \xff\xfe", "▁▁ ▁", "\t\t\n\n  x"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		checkEncoding(t, gemma(t), s)
	})
}

// TestEncodeInvariants runs the fuzz checks over the adversarial set, so
// they hold in every plain `go test` run too.
func TestEncodeInvariants(t *testing.T) {
	tk := gemma(t)
	for _, s := range adversarialTexts(tk) {
		checkEncoding(t, tk, s)
	}
	for _, s := range []string{"\xff", "a\xc3", "\xe2\x96", "\xed\xa0\x80", "ok\x80ok"} {
		checkEncoding(t, tk, s)
	}
}

// TestConcurrentEncode: many goroutines sharing one Tokenizer get the same
// ids as one goroutine alone (run with -race where cgo is available).
func TestConcurrentEncode(t *testing.T) {
	tk := gemma(t)
	texts := adversarialTexts(tk)[:2000]
	want := make([][]int32, len(texts))
	for i, s := range texts {
		want[i] = referenceEncode(tk, s)
	}
	var wg sync.WaitGroup
	errs := make(chan string, 8)
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for k := range texts {
				i := (k*7 + g*131) % len(texts)
				if ids, _ := tk.Encode(texts[i], false); !slices.Equal(ids, want[i]) {
					errs <- texts[i]
					return
				}
			}
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i, ids := range tk.EncodeBatch(texts, false) {
			if !slices.Equal(ids, want[i]) {
				errs <- texts[i]
				return
			}
		}
	}()
	wg.Wait()
	close(errs)
	for s := range errs {
		t.Errorf("concurrent Encode(%.60q) differs", s)
	}
}

// FuzzDecode: any id sequence decodes without panicking; ids outside the
// vocabulary are an error, never skipped; the result is valid UTF-8; and
// skipping special tokens is the same as removing them first.
func FuzzDecode(f *testing.F) {
	f.Add([]byte{2, 0, 0, 0, 105, 0, 0, 0})
	f.Add([]byte{0xe4, 0x01, 0, 0, 0xa1, 0x01, 0, 0})
	f.Fuzz(func(t *testing.T, data []byte) {
		tk := gemma(t)
		var ids []int32
		bad := false
		for i := 0; i+4 <= len(data); i += 4 {
			id := int32(uint32(data[i]) | uint32(data[i+1])<<8 | uint32(data[i+2])<<16 | uint32(data[i+3]&0x7f)<<24)
			id %= int32(tk.VocabSize() + 8)
			if data[i+3]&0x80 != 0 {
				id = tk.byteIDs[data[i]] // byte tokens in any order
			}
			if _, ok := tk.Token(id); !ok {
				bad = true
			}
			ids = append(ids, id)
		}
		text, err := tk.Decode(ids, false)
		if bad != (err != nil) {
			t.Fatalf("Decode(%v): error %v, but an unknown id present is %v", ids, err, bad)
		}
		if bad {
			return
		}
		if !utf8.ValidString(text) {
			t.Fatalf("Decode(%v) is not UTF-8", ids)
		}
		var plain []int32
		for _, id := range ids {
			if !tk.IsSpecial(id) {
				plain = append(plain, id)
			}
		}
		a, _ := tk.Decode(ids, true)
		b, _ := tk.Decode(plain, false)
		if a != b {
			t.Fatalf("skipping specials %q differs from removing them %q", a, b)
		}
	})
}
