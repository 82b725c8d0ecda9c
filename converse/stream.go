package converse

import (
	"unicode/utf8"

	"gemmaft/tokenizer"
)

// Streamer turns tokens into text as they come. Decoding is not token by
// token: a character outside the vocabulary arrives as byte tokens (the
// Turkish "ğ" may be <0xC4><0x9F>), and decoding each alone would show
// replacement characters. Streamer holds back the bytes of an unfinished
// character until the tokens that complete it arrive.
type Streamer struct {
	tok     *tokenizer.Tokenizer
	pending []int32
}

// NewStreamer returns a Streamer for tok's tokens.
func NewStreamer(tok *tokenizer.Tokenizer) *Streamer { return &Streamer{tok: tok} }

// Add takes the next token and returns the text it completes: "" while a
// character is unfinished. Special tokens give no text.
func (s *Streamer) Add(id int32) string {
	s.pending = append(s.pending, id)
	if s.unfinished() {
		return ""
	}
	return s.Flush()
}

// Flush returns the text held back, an unfinished character as the
// replacement characters a final decode gives.
func (s *Streamer) Flush() string {
	text, _ := decodeText(s.tok, s.pending)
	s.pending = s.pending[:0]
	return text
}

// unfinished says whether the pending tokens end with the first bytes of
// a UTF-8 character whose other bytes may still come.
func (s *Streamer) unfinished() bool {
	var b []byte
	for i := len(s.pending) - 1; i >= 0 && len(b) < utf8.UTFMax; i-- {
		v, ok := s.byteOf(s.pending[i])
		if !ok {
			break
		}
		b = append([]byte{v}, b...)
	}
	if len(b) == 0 {
		return false
	}
	start := len(b) - 1
	for start > 0 && !utf8.RuneStart(b[start]) {
		start--
	}
	return utf8.RuneStart(b[start]) && !utf8.FullRune(b[start:])
}

// byteOf returns the byte of a byte-fallback token (<0xNN>).
func (s *Streamer) byteOf(id int32) (byte, bool) {
	if id < 0 || int(id) >= s.tok.VocabSize() || s.tok.Kind(id) != tokenizer.Byte {
		return 0, false
	}
	tok, _ := s.tok.Token(id)
	var v byte
	for _, c := range []byte(tok[3:5]) {
		switch {
		case c >= '0' && c <= '9':
			v = v<<4 | (c - '0')
		case c >= 'a' && c <= 'f':
			v = v<<4 | (c - 'a' + 10)
		case c >= 'A' && c <= 'F':
			v = v<<4 | (c - 'A' + 10)
		}
	}
	return v, true
}
