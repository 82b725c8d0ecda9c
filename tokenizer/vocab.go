package tokenizer

import "math"

// The vocabulary as other runtimes describe it. llama.cpp's GGUF files, for
// one, store a SentencePiece-style vocabulary: each token's kind and a score
// that orders merges (the pair whose merged token scores highest merges
// first).

// Kind is what a token is to a runtime.
type Kind int

const (
	Normal      Kind = iota // a vocabulary piece
	Unknown                 // the unk token
	Control                 // an added token marked special (<bos>, <start_of_turn>)
	UserDefined             // any other added token, matched whole in text (Gemma 3 has thousands)
	Byte                    // a byte-fallback piece <0xNN>
)

// Kind returns id's kind.
func (t *Tokenizer) Kind(id int32) Kind {
	switch {
	case id == t.unkID:
		return Unknown
	case t.special[id]:
		return Control
	case t.isAdded[id]:
		return UserDefined
	}
	if b, ok := byteToken(t.tokens[id]); ok && t.byteIDs[b] == id {
		return Byte
	}
	return Normal
}

// MergeScores returns a score for every token id such that merging, at each
// step, the adjacent pair whose merged token scores highest reproduces the
// BPE merges' order: a token's score is minus the rank of the first merge
// that produces it. Tokens no merge produces (single characters, bytes,
// added tokens) score below every merge, so that a runtime which merges any
// adjacent pair forming a vocabulary entry (as SentencePiece does) forms
// them last, if at all.
func (t *Tokenizer) MergeScores() []float32 {
	first := make([]uint32, len(t.tokens))
	for i := range first {
		first[i] = math.MaxUint32
	}
	for _, v := range t.merges {
		rank, merged := uint32(v>>32), int32(uint32(v))
		if rank < first[merged] {
			first[merged] = rank
		}
	}
	scores := make([]float32, len(t.tokens))
	for id, r := range first {
		scores[id] = -1e9
		if r != math.MaxUint32 {
			scores[id] = -float32(r)
		}
	}
	return scores
}
