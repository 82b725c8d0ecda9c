package tokenizer

import (
	"slices"
	"unicode/utf8"
)

// wordRules says where a stretch of text may be cut into words that are
// merged separately without changing the result.
//
// Every symbol BPE builds spells the concatenation of the initial symbols
// it covers. So a merge can join the symbol ending just before a boundary
// with the one starting just after it only if some merge (l, r) has l
// ending in the character before the boundary and r starting with the one
// after it. If no merge in the file has that (last rune of l, first rune
// of r), no merge ever crosses the boundary; the merges on each side then
// happen in the same relative order as in the whole stretch (the queue is
// ordered by rank and then position, and positions keep their order), so
// the ids are identical.
//
// Characters that are not in the vocabulary become <0xNN> byte tokens.
// When no merge involves a byte token (checked, true for Gemma 3) such
// characters never merge, so both sides of them are boundaries. Otherwise,
// and whenever unknown characters can arise (fuse_unk joins neighbouring
// ones), they are treated as never separable.
//
// To keep the check cheap, only characters with few possible left
// partners are used as word starts: for such a character d, cut before d
// unless the previous character is one of its blockers.
type wordRules struct {
	// kind[r] for runes below 0x10000: 0 = never cut before r, 1 = always,
	// k >= 2 = cut unless the previous rune is in blockers[k].
	kind     []uint16
	astral   map[rune]uint16
	blockers [][]rune
	// byteSafe: characters outside the vocabulary can be cut around.
	byteSafe bool
}

const maxBlockers = 8

func deriveWordRules(t *Tokenizer) wordRules {
	w := wordRules{
		kind:     make([]uint16, 0x10000),
		astral:   map[rune]uint16{},
		blockers: [][]rune{nil, nil},
		byteSafe: t.byteFallback,
	}
	isByte := make([]bool, len(t.tokens))
	for _, id := range t.byteIDs {
		if id < 0 {
			w.byteSafe = false // some character could end as <unk>
			continue
		}
		isByte[id] = true
	}
	// (first rune of r, last rune of l) for every merge (l, r), sorted and
	// deduplicated, so the left partners of each rune are one run.
	joins := make([]uint64, 0, len(t.mergeList))
	for _, m := range t.mergeList {
		if isByte[m[0]] || isByte[m[1]] || m[0] == t.unkID || m[1] == t.unkID {
			w.byteSafe = false
		}
		last, _ := utf8.DecodeLastRuneInString(t.tokens[m[0]])
		first, _ := utf8.DecodeRuneInString(t.tokens[m[1]])
		joins = append(joins, uint64(uint32(first))<<32|uint64(uint32(last)))
	}
	slices.Sort(joins)
	joins = slices.Compact(joins)
	lefts := map[rune][]rune{}
	for _, j := range joins {
		first := rune(j >> 32)
		lefts[first] = append(lefts[first], rune(uint32(j)))
	}
	setKind := func(r rune, k uint16) {
		if r >= 0 && r < rune(len(w.kind)) {
			w.kind[r] = k
		} else {
			w.astral[r] = k
		}
	}
	// Every single-character token with no left partner at all is always
	// a word start; those with a few partners get a blocker list.
	for r := range w.kind {
		if t.runeIDs[r] >= 0 && lefts[rune(r)] == nil {
			w.kind[r] = 1
		}
	}
	for r, id := range t.astralIDs {
		if id >= 0 && lefts[r] == nil {
			w.astral[r] = 1
		}
	}
	for first, list := range lefts {
		if t.runeID(first) < 0 || len(list) > maxBlockers {
			continue
		}
		w.blockers = append(w.blockers, list)
		setKind(first, uint16(len(w.blockers)-1))
	}
	return w
}

// cutBefore reports whether a word may start at a character whose
// normalized rune is cur (with token curID, -1 if none) after one whose
// normalized rune is prev (token prevID).
func (w *wordRules) cutBefore(prev rune, prevID int32, cur rune, curID int32) bool {
	if curID < 0 || prevID < 0 {
		return w.byteSafe
	}
	var k uint16
	if cur < rune(len(w.kind)) {
		k = w.kind[cur]
	} else {
		k = w.astral[cur]
	}
	switch k {
	case 0:
		return false
	case 1:
		return true
	}
	for _, b := range w.blockers[k] {
		if b == prev {
			return false
		}
	}
	return true
}
