package tokenizer

import (
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"unicode/utf8"
)

// Words up to this many bytes are cached; longer ones are rare and merged
// directly.
const maxCachedWord = 64

// The word cache is dropped and refilled when it holds this many tokens,
// which bounds an encoder's memory at a few megabytes.
const maxCachedTokens = 1 << 19

// encoder is the scratch state of one encoding goroutine: the word cache
// and BPE buffers. Encoders are pooled, so the Tokenizer itself stays
// read-only and concurrent calls never share one.
type encoder struct {
	cache   map[string]uint64 // word -> start<<16 | count in ids/offs
	ids     []int32
	offs    [][2]uint16
	syms    []symbol
	heap    mergeHeap
	wordIDs []int32
	wordOff [][2]int
}

func newEncoder() any {
	return &encoder{cache: make(map[string]uint64, 1<<14)}
}

// Encode tokenizes text and returns the token ids and, for each token, the
// byte offsets [start, end) of the input it came from. With addSpecial the
// post-processor's special tokens (Gemma 3: <bos>) are added, with offsets
// [0, 0). Bytes that are not valid UTF-8 are encoded as byte tokens.
func (t *Tokenizer) Encode(text string, addSpecial bool) (ids []int32, offsets [][2]int) {
	e := t.encoders.Get().(*encoder)
	ids, offsets = t.encode(e, text, addSpecial, true)
	t.encoders.Put(e)
	return ids, offsets
}

// EncodeIDs is Encode without offsets.
func (t *Tokenizer) EncodeIDs(text string, addSpecial bool) []int32 {
	e := t.encoders.Get().(*encoder)
	ids, _ := t.encode(e, text, addSpecial, false)
	t.encoders.Put(e)
	return ids
}

// EncodeBatch encodes texts on all cores (GOMAXPROCS goroutines) and
// returns their ids in the same order.
func (t *Tokenizer) EncodeBatch(texts []string, addSpecial bool) [][]int32 {
	out := make([][]int32, len(texts))
	t.parallel(len(texts), func(e *encoder, i int) {
		out[i], _ = t.encode(e, texts[i], addSpecial, false)
	})
	return out
}

// EncodeBatchOffsets is EncodeBatch with each token's byte offsets.
func (t *Tokenizer) EncodeBatchOffsets(texts []string, addSpecial bool) ([][]int32, [][][2]int) {
	ids := make([][]int32, len(texts))
	offs := make([][][2]int, len(texts))
	t.parallel(len(texts), func(e *encoder, i int) {
		ids[i], offs[i] = t.encode(e, texts[i], addSpecial, true)
	})
	return ids, offs
}

func (t *Tokenizer) parallel(n int, work func(e *encoder, i int)) {
	workers := min(runtime.GOMAXPROCS(0), n)
	var next atomic.Int64
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			e := t.encoders.Get().(*encoder)
			defer t.encoders.Put(e)
			for {
				// Small chunks keep the cores busy to the end even when
				// text lengths vary a lot.
				start := int(next.Add(16)) - 16
				if start >= n {
					return
				}
				for i := start; i < min(start+16, n); i++ {
					work(e, i)
				}
			}
		}()
	}
	wg.Wait()
}

func (t *Tokenizer) encode(e *encoder, text string, addSpecial, withOffsets bool) ([]int32, [][2]int) {
	ids := make([]int32, 0, len(text)/3+len(t.prefix)+len(t.suffix)+1)
	var offs [][2]int
	if withOffsets {
		offs = make([][2]int, 0, cap(ids))
	}
	if addSpecial {
		for _, id := range t.prefix {
			ids = append(ids, id)
			if withOffsets {
				offs = append(offs, [2]int{0, 0})
			}
		}
	}
	// Split at added tokens, leftmost longest, then encode what lies between.
	segStart := 0
	for i := 0; i < len(text); {
		if !t.added.first[text[i]] {
			i++
			continue
		}
		n, id := t.added.longest(text[i:])
		if n == 0 {
			i++
			continue
		}
		ids, offs = t.encodeSegment(e, text, segStart, i, ids, offs, withOffsets)
		ids = append(ids, id)
		if withOffsets {
			offs = append(offs, [2]int{i, i + n})
		}
		i += n
		segStart = i
	}
	ids, offs = t.encodeSegment(e, text, segStart, len(text), ids, offs, withOffsets)
	if addSpecial {
		for _, id := range t.suffix {
			ids = append(ids, id)
			if withOffsets {
				offs = append(offs, [2]int{0, 0})
			}
		}
	}
	return ids, offs
}

// decodeChar reads the character at text[i:], normalized, with its token
// id (-1 if it has none). An invalid UTF-8 byte is a character of its own
// with no token.
func (t *Tokenizer) decodeChar(text string, i int) (r rune, size int, id int32) {
	c := text[i]
	if c < utf8.RuneSelf {
		r, size = rune(c), 1
	} else {
		r, size = utf8.DecodeRuneInString(text[i:])
		if r == utf8.RuneError && size == 1 {
			return -1, 1, -1
		}
	}
	r = t.normalize(r)
	return r, size, t.runeID(r)
}

// encodeSegment encodes text[start:end], which holds no added token, by
// cutting it into words (see wordRules) and merging each.
func (t *Tokenizer) encodeSegment(e *encoder, text string, start, end int, ids []int32, offs [][2]int, withOffsets bool) ([]int32, [][2]int) {
	if start >= end {
		return ids, offs
	}
	wordStart := start
	prev, size, prevID := t.decodeChar(text, start)
	for i := start + size; i < end; {
		r, size, id := t.decodeChar(text, i)
		if t.rules.cutBefore(prev, prevID, r, id) {
			ids, offs = t.encodeWord(e, text, wordStart, i, ids, offs, withOffsets)
			wordStart = i
		}
		prev, prevID = r, id
		i += size
	}
	return t.encodeWord(e, text, wordStart, end, ids, offs, withOffsets)
}

func (t *Tokenizer) encodeWord(e *encoder, text string, start, end int, ids []int32, offs [][2]int, withOffsets bool) ([]int32, [][2]int) {
	word := text[start:end]
	if len(word) <= maxCachedWord {
		if v, ok := e.cache[word]; ok {
			from, n := int(v>>16), int(v&0xffff)
			ids = append(ids, e.ids[from:from+n]...)
			if withOffsets {
				for _, o := range e.offs[from : from+n] {
					offs = append(offs, [2]int{start + int(o[0]), start + int(o[1])})
				}
			}
			return ids, offs
		}
	}
	syms := t.wordSymbols(e, text, start, end)
	t.merges.mergeAll(syms, &e.heap)
	cacheIt := len(word) <= maxCachedWord
	if cacheIt && len(e.ids) >= maxCachedTokens {
		clear(e.cache)
		e.ids, e.offs = e.ids[:0], e.offs[:0]
	}
	from := len(e.ids)
	for _, s := range syms {
		if s.gone {
			continue
		}
		ids = append(ids, s.id)
		if withOffsets {
			offs = append(offs, [2]int{int(s.start), int(s.end)})
		}
		if cacheIt {
			e.ids = append(e.ids, s.id)
			e.offs = append(e.offs, [2]uint16{uint16(int(s.start) - start), uint16(int(s.end) - start)})
		}
	}
	if cacheIt {
		e.cache[strings.Clone(word)] = uint64(from)<<16 | uint64(len(e.ids)-from)
	}
	return ids, offs
}

// wordSymbols builds the initial symbols of text[start:end] as Hugging
// Face's BPE does: one per character in the vocabulary; otherwise one byte
// token per UTF-8 byte (every one covering the whole character, as Hugging
// Face's offsets do); failing that, <unk>, with neighbours fused when
// fuse_unk is set.
func (t *Tokenizer) wordSymbols(e *encoder, text string, start, end int) []symbol {
	syms := e.syms[:0]
	add := func(id int32, s, en int) {
		n := int32(len(syms))
		syms = append(syms, symbol{id: id, prev: n - 1, next: n + 1, start: int32(s), end: int32(en)})
	}
	unkStart, unkEnd := -1, -1
	flushUnk := func() {
		if unkStart >= 0 {
			add(t.unkID, unkStart, unkEnd)
			unkStart = -1
		}
	}
	for i := start; i < end; {
		_, size, id := t.decodeChar(text, i)
		if id >= 0 {
			flushUnk()
			add(id, i, i+size)
			i += size
			continue
		}
		if t.byteFallback {
			ok := true
			for j := i; j < i+size; j++ {
				if t.byteIDs[text[j]] < 0 {
					ok = false
				}
			}
			if ok {
				// Hugging Face does not flush a pending <unk> here, so it
				// lands after these bytes; keep that order.
				for j := i; j < i+size; j++ {
					add(t.byteIDs[text[j]], i, i+size)
				}
				i += size
				continue
			}
		}
		if unkStart >= 0 && !t.fuseUnk {
			flushUnk()
		}
		if unkStart < 0 {
			unkStart = i
		}
		unkEnd = i + size
		i += size
	}
	flushUnk()
	if len(syms) > 0 {
		syms[len(syms)-1].next = -1
	}
	e.syms = syms
	return syms
}
