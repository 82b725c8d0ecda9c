package tokenizer

import (
	"runtime"

	"encoding/json"
	"fmt"
	"os"
	"strings"
	"unicode/utf8"

	"golang.org/x/sync/errgroup"
)

// The JSON shapes of the small parts of tokenizer.json. The vocabulary and
// the merges are read by scanner (see jsonscan.go).

type addedTokenJSON struct {
	ID         int32  `json:"id"`
	Content    string `json:"content"`
	SingleWord bool   `json:"single_word"`
	LStrip     bool   `json:"lstrip"`
	RStrip     bool   `json:"rstrip"`
	Normalized bool   `json:"normalized"`
	Special    bool   `json:"special"`
}

type patternJSON struct {
	String *string `json:"String"`
	Regex  *string `json:"Regex"`
}

type componentJSON struct {
	Type     string          `json:"type"`
	Pattern  patternJSON     `json:"pattern"`
	Content  string          `json:"content"`
	Behavior string          `json:"behavior"`
	Invert   bool            `json:"invert"`
	Decoders []componentJSON `json:"decoders"`

	// TemplateProcessing.
	Single        []templateItemJSON `json:"single"`
	SpecialTokens map[string]struct {
		ID  string  `json:"id"`
		IDs []int32 `json:"ids"`
	} `json:"special_tokens"`
}

type templateItemJSON struct {
	SpecialToken *struct {
		ID string `json:"id"`
	} `json:"SpecialToken"`
	Sequence *struct {
		ID string `json:"id"`
	} `json:"Sequence"`
}

// LoadFile reads a Hugging Face tokenizer.json.
func LoadFile(path string) (*Tokenizer, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	t, err := Load(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return t, nil
}

// Load parses the contents of a Hugging Face tokenizer.json. Every
// component and option that would change the output is checked: one this
// package does not implement is an error naming it and its JSON path.
func Load(data []byte) (*Tokenizer, error) {
	t := &Tokenizer{unkID: -1}
	s := &scanner{data: data}
	var (
		haveModel bool
		added     []addedTokenJSON
		raw       = map[string][]byte{}
		merges    [][2]string // only for the older "a b" string format
	)
	err := s.object(func(key []byte) error {
		if string(key) == "model" {
			haveModel = true
			return t.loadModel(s, &merges)
		}
		v, err := s.skip()
		if err != nil {
			return fmt.Errorf("%s: %w", key, err)
		}
		raw[string(key)] = v
		return nil
	})
	if err == nil {
		err = s.end()
	}
	if err != nil {
		return nil, fmt.Errorf("tokenizer.json: %w", err)
	}
	if !haveModel {
		// tokenizer_config.json, special_tokens_map.json and the like sit
		// beside the file meant.
		return nil, fmt.Errorf("tokenizer.json: no model: not a tokenizer.json (the tokenizers library's file, with the vocabulary under \"model\")")
	}
	for _, key := range []string{"truncation", "padding"} {
		if v, ok := raw[key]; ok && string(v) != "null" {
			return nil, fmt.Errorf("tokenizer.json: %s is set; truncation and padding are not supported", key)
		}
	}
	if v, ok := raw["added_tokens"]; ok {
		if err := json.Unmarshal(v, &added); err != nil {
			return nil, fmt.Errorf("tokenizer.json: added_tokens: %w", err)
		}
	}
	if err := t.setAddedTokens(added); err != nil {
		return nil, err
	}
	if err := t.setNormalizer(raw["normalizer"]); err != nil {
		return nil, err
	}
	if err := t.setPreTokenizer(raw["pre_tokenizer"]); err != nil {
		return nil, err
	}
	if err := t.setPostProcessor(raw["post_processor"]); err != nil {
		return nil, err
	}
	if err := t.setDecoder(raw["decoder"]); err != nil {
		return nil, err
	}
	if err := t.prepare(); err != nil {
		return nil, err
	}
	return t, nil
}

// decodeComponent unmarshals one pipeline component; a missing or null
// component gives ok == false.
func decodeComponent(name string, raw []byte) (c componentJSON, ok bool, err error) {
	if len(raw) == 0 || string(raw) == "null" {
		return c, false, nil
	}
	if err := json.Unmarshal(raw, &c); err != nil {
		return c, false, fmt.Errorf("tokenizer.json: %s: %w", name, err)
	}
	return c, true, nil
}

// unsupportedModel is the error for a tokenizer model other than BPE
// (Unigram, WordPiece, WordLevel).
func unsupportedModel(typ string) error {
	return fmt.Errorf("type %q is not supported: only BPE is supported (the model of the Gemma, Llama 3 and GPT-2 tokenizers)", typ)
}

func unsupported(path, typ string) error {
	return fmt.Errorf("tokenizer.json: %s type %q is not supported", path, typ)
}

// loadModel reads the "model" object: a BPE model with its vocabulary and
// merges.
func (t *Tokenizer) loadModel(s *scanner, oldMerges *[][2]string) error {
	var (
		typ       string
		arena     []byte   // every vocabulary string, end to end
		ends      []uint32 // ends[i] is where token i's string ends in arena
		ids       []int32
		mergeIDs  [][3]int32 // left, right, merged; filled after the vocabulary is known
		mergeStrs []byte     // merge strings, when they come before the vocabulary
		mergeEnds []uint32
		unkToken  *string
		vocabDone chan error
	)
	// Room for Gemma 3's sizes, so the appends below rarely copy.
	arena = make([]byte, 0, len(s.data)/8)
	ends = make([]uint32, 0, 1<<18)
	ids = make([]int32, 0, 1<<18)
	mergeStrs = make([]byte, 0, len(s.data)/6)
	mergeEnds = make([]uint32, 0, 1<<20)
	var tmp []byte
	err := s.object(func(key []byte) error {
		var err error
		switch string(key) {
		case "type":
			tmp, err = s.str(tmp[:0])
			typ = string(tmp)
			if err == nil && typ != "BPE" {
				// Other models' fields would fail to parse first; say why.
				return unsupportedModel(typ)
			}
		case "vocab":
			if vocabDone != nil {
				return fmt.Errorf("vocab appears twice")
			}
			err = s.object(func(tok []byte) error {
				arena = append(arena, tok...)
				ends = append(ends, uint32(len(arena)))
				id, err := s.integer()
				if err != nil {
					return err
				}
				if id < 0 || id > 1<<30 {
					return fmt.Errorf("vocab: id %d of %q out of range", id, tok)
				}
				ids = append(ids, int32(id))
				return nil
			})
			if err != nil {
				err = fmt.Errorf("vocab: %w", err)
				break
			}
			// Build the map on another core while the merges are read.
			vocabDone = make(chan error, 1)
			go func() { vocabDone <- t.buildVocab(arena, ends, ids) }()
		case "merges":
			err = s.array(func() error {
				if s.peek() == '"' {
					// Older format: "left right".
					str, err := s.str(tmp[:0])
					tmp = str
					if err != nil {
						return err
					}
					l, r, ok := strings.Cut(string(str), " ")
					if !ok {
						return fmt.Errorf("merge %q has no space", str)
					}
					*oldMerges = append(*oldMerges, [2]string{l, r})
					return nil
				}
				n := 0
				err := s.array(func() error {
					var err error
					if n >= 2 {
						return fmt.Errorf("merge with more than two parts")
					}
					mergeStrs, err = s.str(mergeStrs)
					mergeEnds = append(mergeEnds, uint32(len(mergeStrs)))
					n++
					return err
				})
				if err == nil && n != 2 {
					err = fmt.Errorf("merge with %d parts, want 2", n)
				}
				return err
			})
			if err != nil {
				err = fmt.Errorf("merges: %w", err)
			}
		case "unk_token":
			var raw []byte
			if raw, err = s.skip(); err == nil {
				err = json.Unmarshal(raw, &unkToken)
			}
		case "fuse_unk":
			err = t.loadBool(s, &t.fuseUnk)
		case "byte_fallback":
			err = t.loadBool(s, &t.byteFallback)
		case "ignore_merges":
			var b bool
			if err = t.loadBool(s, &b); err == nil && b {
				err = fmt.Errorf("ignore_merges true is not supported")
			}
		case "dropout", "continuing_subword_prefix", "end_of_word_suffix":
			var raw []byte
			if raw, err = s.skip(); err == nil && string(raw) != "null" {
				err = fmt.Errorf("%s %s is not supported", key, raw)
			}
		default:
			if _, err = s.skip(); err == nil {
				err = fmt.Errorf("unknown field %q", key)
			}
		}
		return err
	})
	if err != nil {
		return fmt.Errorf("model: %w", err)
	}
	if typ != "BPE" {
		return fmt.Errorf("model: %w", unsupportedModel(typ))
	}

	// The vocabulary: one string holds every token, and the map keys are
	// substrings of it, so loading allocates a handful of large blocks
	// instead of a quarter million small ones.
	if vocabDone == nil {
		return fmt.Errorf("model: no vocab")
	}
	if err := <-vocabDone; err != nil {
		return err
	}

	if unkToken != nil {
		id, ok := t.vocab[*unkToken]
		if !ok {
			return fmt.Errorf("model: unk_token %q is not in the vocabulary", *unkToken)
		}
		t.unkID = id
	}

	// Merges, as (left id, right id) -> (rank, merged id). Resolving half a
	// million merges is three map lookups each, so it is spread over the
	// cores.
	mergeText := string(mergeStrs)
	nNew := len(mergeEnds) / 2
	part := func(k int) string {
		start := uint32(0)
		if k > 0 {
			start = mergeEnds[k-1]
		}
		return mergeText[start:mergeEnds[k]]
	}
	mergeIDs = make([][3]int32, nNew+len(*oldMerges))
	var g errgroup.Group
	workers := runtime.GOMAXPROCS(0)
	for w := range workers {
		g.Go(func() error {
			var cat []byte
			for i := w; i < len(mergeIDs); i += workers {
				var l, r string
				if i < nNew {
					l, r = part(2*i), part(2*i+1)
				} else {
					l, r = (*oldMerges)[i-nNew][0], (*oldMerges)[i-nNew][1]
				}
				li, lok := t.vocab[l]
				ri, rok := t.vocab[r]
				cat = append(append(cat[:0], l...), r...)
				ni, nok := t.vocab[string(cat)]
				if !lok || !rok || !nok {
					return fmt.Errorf("model: merges[%d]: %q + %q: a part or the merged token is not in the vocabulary", i, l, r)
				}
				mergeIDs[i] = [3]int32{li, ri, ni}
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return err
	}
	t.mergeList = mergeIDs
	return nil
}

// buildVocab makes the vocabulary map and the id -> string table. One
// string holds every token and the map keys are substrings of it, so this
// allocates a few large blocks instead of a quarter million small ones.
func (t *Tokenizer) buildVocab(arena []byte, ends []uint32, ids []int32) error {
	all := string(arena)
	t.vocab = make(map[string]int32, len(ids))
	maxID := int32(-1)
	for _, id := range ids {
		maxID = max(maxID, id)
	}
	t.tokens = make([]string, maxID+1)
	t.inVocab = make([]bool, maxID+1)
	for i, id := range ids {
		start := uint32(0)
		if i > 0 {
			start = ends[i-1]
		}
		tok := all[start:ends[i]]
		if t.inVocab[id] {
			return fmt.Errorf("model: vocab: id %d is given to both %q and %q", id, t.tokens[id], tok)
		}
		t.vocab[tok] = id
		t.tokens[id] = tok
		t.inVocab[id] = true
	}
	if len(t.vocab) != len(ids) {
		return fmt.Errorf("model: vocab: a token appears twice")
	}
	t.modelSize = int(maxID) + 1
	return nil
}

func (t *Tokenizer) loadBool(s *scanner, dst *bool) error {
	raw, err := s.skip()
	if err != nil {
		return err
	}
	return json.Unmarshal(raw, dst)
}

func (t *Tokenizer) setAddedTokens(added []addedTokenJSON) error {
	for i, a := range added {
		path := fmt.Sprintf("tokenizer.json: added_tokens[%d] (%q)", i, a.Content)
		switch {
		case a.SingleWord, a.LStrip, a.RStrip:
			return fmt.Errorf("%s: single_word, lstrip and rstrip are not supported", path)
		case a.Normalized:
			return fmt.Errorf("%s: normalized added tokens are not supported", path)
		case a.Content == "":
			return fmt.Errorf("%s: empty content", path)
		case a.ID < 0:
			return fmt.Errorf("%s: negative id", path)
		case !utf8.ValidString(a.Content):
			return fmt.Errorf("%s: content is not UTF-8", path)
		}
		if int(a.ID) >= len(t.tokens) {
			grow := int(a.ID) + 1 - len(t.tokens)
			t.tokens = append(t.tokens, make([]string, grow)...)
			t.inVocab = append(t.inVocab, make([]bool, grow)...)
		}
		if t.inVocab[a.ID] && t.tokens[a.ID] != a.Content {
			// Hugging Face decodes an id through the added vocabulary
			// first, so the added content wins.
			t.inVocab[a.ID] = false
		}
		t.tokens[a.ID] = a.Content
		if a.Special {
			if t.special == nil {
				t.special = map[int32]bool{}
			}
			t.special[a.ID] = true
		}
		if t.isAdded == nil {
			t.isAdded = map[int32]bool{}
		}
		t.isAdded[a.ID] = true
		t.added.add(a.Content, a.ID)
	}
	return nil
}

// setNormalizer accepts no normalizer, or a Replace of one character by one
// character: that keeps every normalized character aligned with exactly one
// input character, which is what lets Encode work on the input directly.
func (t *Tokenizer) setNormalizer(raw []byte) error {
	c, ok, err := decodeComponent("normalizer", raw)
	if err != nil || !ok {
		return err
	}
	if c.Type != "Replace" {
		return unsupported("normalizer", c.Type)
	}
	if c.Pattern.String == nil {
		return fmt.Errorf("tokenizer.json: normalizer Replace: only a String pattern is supported")
	}
	from, to := *c.Pattern.String, c.Content
	if utf8.RuneCountInString(from) != 1 || utf8.RuneCountInString(to) != 1 {
		return fmt.Errorf("tokenizer.json: normalizer Replace %q -> %q: only one character replaced by one character is supported", from, to)
	}
	t.replaceFrom, _ = utf8.DecodeRuneInString(from)
	t.replaceTo, _ = utf8.DecodeRuneInString(to)
	t.hasReplace = true
	return nil
}

// setPreTokenizer accepts no pre-tokenizer, or a Split whose pattern the
// normalizer has already removed from every text (Gemma 3 replaces " " by
// "▁" and then splits on " ", which never matches). A Split that could
// match is refused rather than ignored.
func (t *Tokenizer) setPreTokenizer(raw []byte) error {
	c, ok, err := decodeComponent("pre_tokenizer", raw)
	if err != nil || !ok {
		return err
	}
	if c.Type != "Split" {
		return unsupported("pre_tokenizer", c.Type)
	}
	if c.Pattern.String == nil {
		return fmt.Errorf("tokenizer.json: pre_tokenizer Split: only a String pattern is supported")
	}
	switch c.Behavior {
	case "Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous":
	default:
		return fmt.Errorf("tokenizer.json: pre_tokenizer Split: unknown behavior %q", c.Behavior)
	}
	p := *c.Pattern.String
	if c.Invert || p == "" || !t.hasReplace || t.replaceTo == t.replaceFrom ||
		!strings.ContainsRune(p, t.replaceFrom) {
		return fmt.Errorf("tokenizer.json: pre_tokenizer Split on %q: only a split whose pattern the normalizer removes is supported", p)
	}
	return nil
}

func (t *Tokenizer) setPostProcessor(raw []byte) error {
	c, ok, err := decodeComponent("post_processor", raw)
	if err != nil || !ok {
		return err
	}
	if c.Type != "TemplateProcessing" {
		return unsupported("post_processor", c.Type)
	}
	seen := false
	for i, item := range c.Single {
		switch {
		case item.Sequence != nil && item.SpecialToken == nil:
			if item.Sequence.ID != "A" || seen {
				return fmt.Errorf("tokenizer.json: post_processor.single[%d]: want one Sequence A", i)
			}
			seen = true
		case item.SpecialToken != nil && item.Sequence == nil:
			sp, ok := c.SpecialTokens[item.SpecialToken.ID]
			if !ok {
				return fmt.Errorf("tokenizer.json: post_processor.single[%d]: special token %q is not in special_tokens", i, item.SpecialToken.ID)
			}
			for _, id := range sp.IDs {
				if id < 0 || int(id) >= len(t.tokens) {
					return fmt.Errorf("tokenizer.json: post_processor: special token %q has id %d outside the vocabulary", sp.ID, id)
				}
			}
			if seen {
				t.suffix = append(t.suffix, sp.IDs...)
			} else {
				t.prefix = append(t.prefix, sp.IDs...)
			}
		default:
			return fmt.Errorf("tokenizer.json: post_processor.single[%d]: want SpecialToken or Sequence", i)
		}
	}
	if !seen {
		return fmt.Errorf("tokenizer.json: post_processor.single has no Sequence A")
	}
	return nil
}

func (t *Tokenizer) setDecoder(raw []byte) error {
	c, ok, err := decodeComponent("decoder", raw)
	if err != nil || !ok {
		return err
	}
	steps := []componentJSON{c}
	path := "decoder"
	if c.Type == "Sequence" {
		steps = c.Decoders
		path = "decoder.decoders"
	}
	for i, d := range steps {
		p := fmt.Sprintf("%s[%d]", path, i)
		switch d.Type {
		case "Replace":
			if d.Pattern.String == nil {
				return fmt.Errorf("tokenizer.json: %s Replace: only a String pattern is supported", p)
			}
			t.decoders = append(t.decoders, decodeStep{kind: decodeReplace, from: *d.Pattern.String, to: d.Content})
		case "ByteFallback":
			t.decoders = append(t.decoders, decodeStep{kind: decodeByteFallback})
		case "Fuse":
			t.decoders = append(t.decoders, decodeStep{kind: decodeFuse})
		default:
			return unsupported(p, d.Type)
		}
	}
	return nil
}
