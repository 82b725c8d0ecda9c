// Package tokenizer implements the parts of Hugging Face's tokenizer.json
// that Gemma 3 uses, and encodes and decodes exactly as Hugging Face
// tokenizers does: added tokens matched in the raw text, a one-character
// Replace normalizer, BPE with byte fallback and fused unknowns, a
// TemplateProcessing post-processor and a Replace/ByteFallback/Fuse decoder
// chain. Anything else in a tokenizer.json is a load error.
//
// Hugging Face runs BPE over each whole stretch of text between added
// tokens (Gemma 3's pre-tokenizer never splits). This package cuts those
// stretches into words at boundaries that no merge can cross, proven from
// the merges when the file is loaded (see wordRules), and caches the BPE
// result of each word; the ids are the same, much faster.
//
// A Tokenizer is immutable once loaded and safe for concurrent use.
package tokenizer

import (
	"fmt"
	"strings"
	"sync"
	"unicode/utf8"
)

// Tokenizer encodes text to token ids and back. Build one with Load or
// LoadFile.
type Tokenizer struct {
	vocab     map[string]int32 // the model's vocabulary
	tokens    []string         // id -> string, model vocabulary and added tokens
	inVocab   []bool           // id is a model token whose string is tokens[id]
	modelSize int              // ids below this belong to the model's vocabulary
	special   map[int32]bool   // added tokens marked special
	isAdded   map[int32]bool   // every added token, special or not
	added     trie             // added tokens, matched in the raw text

	merges    mergeTable
	mergeList [][3]int32 // in rank order; only kept while loading

	hasReplace             bool // normalizer: replaceFrom becomes replaceTo
	replaceFrom, replaceTo rune
	byteFallback, fuseUnk  bool
	unkID                  int32
	byteIDs                [256]int32 // <0xNN> tokens, -1 where missing
	prefix, suffix         []int32    // post-processor special tokens around the text
	decoders               []decodeStep

	// Derived at load time by prepare.
	runeIDs   []int32        // single-character tokens for runes below len(runeIDs), -1 if none
	astralIDs map[rune]int32 // the same for higher runes
	rules     wordRules
	encoders  *sync.Pool // *encoder, each with its own word cache
}

// VocabSize is one more than the largest token id, added tokens included.
func (t *Tokenizer) VocabSize() int { return len(t.tokens) }

// ModelVocabSize is the number of ids the model's vocabulary takes (the
// BPE pieces, not the added tokens after them). A checkpoint's embedding
// has at least these rows: Gemma 3 1B's has exactly 262,144, one fewer
// than VocabSize, as its last added token (<image_soft_token>) is for
// images, which the text model never sees.
func (t *Tokenizer) ModelVocabSize() int { return t.modelSize }

// Token returns the string of a token id, and false for an unknown id.
func (t *Tokenizer) Token(id int32) (string, bool) {
	if id < 0 || int(id) >= len(t.tokens) || (t.tokens[id] == "" && !t.inVocab[id]) {
		return "", false
	}
	return t.tokens[id], true
}

// ID returns the id of a token string: an added token or a vocabulary entry.
func (t *Tokenizer) ID(token string) (int32, bool) {
	if id, ok := t.added.exact(token); ok {
		return id, true
	}
	id, ok := t.vocab[token]
	return id, ok
}

// IsSpecial reports whether id is an added token marked special.
func (t *Tokenizer) IsSpecial(id int32) bool { return t.special[id] }

// prepare derives the lookup tables that encoding needs.
func (t *Tokenizer) prepare() error {
	for i := range t.byteIDs {
		t.byteIDs[i] = -1
		if id, ok := t.vocab[fmt.Sprintf("<0x%02X>", i)]; ok {
			t.byteIDs[i] = id
		}
	}
	if !t.byteFallback && t.unkID < 0 {
		// Hugging Face fails on a character it cannot encode; refusing the
		// file up front is clearer than failing on some later text.
		return fmt.Errorf("tokenizer.json: model has neither byte_fallback nor unk_token")
	}
	// The merge table is independent of what follows: build it alongside.
	var wg sync.WaitGroup
	merges := t.mergeList
	wg.Go(func() { t.merges = newMergeTable(merges) })
	defer wg.Wait()
	t.runeIDs = make([]int32, 0x10000)
	for i := range t.runeIDs {
		t.runeIDs[i] = -1
	}
	t.astralIDs = map[rune]int32{}
	for id, tok := range t.tokens[:t.modelSize] {
		if !t.inVocab[id] {
			continue
		}
		r, size := utf8.DecodeRuneInString(tok)
		if size != len(tok) || (r == utf8.RuneError && size < 2) {
			continue
		}
		if r < rune(len(t.runeIDs)) {
			t.runeIDs[r] = int32(id)
		} else {
			t.astralIDs[r] = int32(id)
		}
	}
	t.rules = deriveWordRules(t)
	t.mergeList = nil
	t.encoders = newPool()
	return nil
}

func newPool() *sync.Pool { return &sync.Pool{New: newEncoder} }

// normalize applies the normalizer to one character.
func (t *Tokenizer) normalize(r rune) rune {
	if t.hasReplace && r == t.replaceFrom {
		return t.replaceTo
	}
	return r
}

// runeID returns the token of a single (normalized) character, or -1.
func (t *Tokenizer) runeID(r rune) int32 {
	if r >= 0 && r < rune(len(t.runeIDs)) {
		return t.runeIDs[r]
	}
	if id, ok := t.astralIDs[r]; ok {
		return id
	}
	return -1
}

// trie holds the added tokens for leftmost-longest matching, the rule
// Hugging Face's added vocabulary uses. Edges live in one map keyed by
// (node, byte); first says which bytes can start a match at all.
type trie struct {
	edges map[uint64]int32
	ids   []int32 // token id ending at each node, -1 if none
	first [256]bool
}

func (tr *trie) add(s string, id int32) {
	if tr.edges == nil {
		tr.edges = map[uint64]int32{}
		tr.ids = []int32{-1}
	}
	tr.first[s[0]] = true
	node := int32(0)
	for i := 0; i < len(s); i++ {
		key := uint64(node)<<8 | uint64(s[i])
		next, ok := tr.edges[key]
		if !ok {
			next = int32(len(tr.ids))
			tr.ids = append(tr.ids, -1)
			tr.edges[key] = next
		}
		node = next
	}
	tr.ids[node] = id
}

// longest returns the length and id of the longest added token that starts
// s, or 0 if none does.
func (tr *trie) longest(s string) (n int, id int32) {
	if len(s) == 0 || !tr.first[s[0]] {
		return 0, -1
	}
	node := int32(0)
	id = -1
	for i := 0; i < len(s); i++ {
		next, ok := tr.edges[uint64(node)<<8|uint64(s[i])]
		if !ok {
			break
		}
		node = next
		if tr.ids[node] >= 0 {
			n, id = i+1, tr.ids[node]
		}
	}
	return n, id
}

func (tr *trie) exact(s string) (int32, bool) {
	if n, id := tr.longest(s); n == len(s) && n > 0 {
		return id, true
	}
	return -1, false
}

// decodeStep is one decoder of the chain.
type decodeStep struct {
	kind     int
	from, to string
}

const (
	decodeReplace = iota
	decodeByteFallback
	decodeFuse
)

// Decode turns ids back into text the way Hugging Face's decode does,
// dropping special added tokens when skipSpecial is set. An id outside the
// vocabulary is an error (Hugging Face skips it silently).
func (t *Tokenizer) Decode(ids []int32, skipSpecial bool) (string, error) {
	toks := make([]string, 0, len(ids))
	for _, id := range ids {
		tok, ok := t.Token(id)
		if !ok {
			return "", fmt.Errorf("tokenizer: decode: id %d is not in the vocabulary", id)
		}
		if skipSpecial && t.special[id] {
			continue
		}
		toks = append(toks, tok)
	}
	for _, d := range t.decoders {
		switch d.kind {
		case decodeReplace:
			for i, tok := range toks {
				toks[i] = strings.ReplaceAll(tok, d.from, d.to)
			}
		case decodeByteFallback:
			toks = byteFallbackDecode(toks)
		case decodeFuse:
			toks = []string{strings.Join(toks, "")}
		}
	}
	return strings.Join(toks, ""), nil
}

// byteFallbackDecode turns runs of <0xNN> tokens into the text their bytes
// spell, or into one U+FFFD per byte when the run is not valid UTF-8.
func byteFallbackDecode(toks []string) []string {
	out := toks[:0:0]
	var run []byte
	flush := func() {
		if len(run) == 0 {
			return
		}
		if utf8.Valid(run) {
			out = append(out, string(run))
		} else {
			for range run {
				out = append(out, "\uFFFD")
			}
		}
		run = run[:0]
	}
	for _, tok := range toks {
		if b, ok := byteToken(tok); ok {
			run = append(run, b)
			continue
		}
		flush()
		out = append(out, tok)
	}
	flush()
	return out
}

// byteToken parses "<0xNN>". Hugging Face parses the two characters with
// Rust's u8::from_str_radix, which takes either case and a leading '+'.
func byteToken(tok string) (byte, bool) {
	if len(tok) != 6 || !strings.HasPrefix(tok, "<0x") || tok[5] != '>' {
		return 0, false
	}
	digits := tok[3:5]
	if digits[0] == '+' {
		digits = digits[1:]
	}
	v := 0
	for i := 0; i < len(digits); i++ {
		c := digits[i]
		switch {
		case c >= '0' && c <= '9':
			v = v*16 + int(c-'0')
		case c >= 'a' && c <= 'f':
			v = v*16 + int(c-'a'+10)
		case c >= 'A' && c <= 'F':
			v = v*16 + int(c-'A'+10)
		default:
			return 0, false
		}
	}
	return byte(v), true
}
