package tokenizer

import (
	"encoding/json"
	"fmt"
	"strconv"
	"unicode/utf16"
	"unicode/utf8"
)

// scanner walks a JSON document without building a tree. encoding/json
// needs well over a second for the 33 MB Gemma 3 tokenizer.json, almost all
// of it in the vocabulary object and the merges array, so those two are read
// with this scanner; the small parts go through encoding/json.
type scanner struct {
	data []byte
	pos  int
}

func (s *scanner) errorf(format string, args ...any) error {
	return fmt.Errorf("byte %d: %s", s.pos, fmt.Sprintf(format, args...))
}

func (s *scanner) skipSpace() {
	for s.pos < len(s.data) {
		switch s.data[s.pos] {
		case ' ', '\t', '\n', '\r':
			s.pos++
		default:
			return
		}
	}
}

// peek returns the next non-space byte, or 0 at the end of input.
func (s *scanner) peek() byte {
	s.skipSpace()
	if s.pos >= len(s.data) {
		return 0
	}
	return s.data[s.pos]
}

func (s *scanner) expect(c byte) error {
	if s.peek() != c {
		if s.pos >= len(s.data) {
			return s.errorf("unexpected end of JSON, want %q", c)
		}
		return s.errorf("want %q, found %q", c, s.data[s.pos])
	}
	s.pos++
	return nil
}

// str reads a JSON string and appends its decoded bytes to buf.
func (s *scanner) str(buf []byte) ([]byte, error) {
	if err := s.expect('"'); err != nil {
		return buf, err
	}
	for {
		start := s.pos
		for s.pos < len(s.data) && s.data[s.pos] != '"' && s.data[s.pos] != '\\' {
			if s.data[s.pos] < 0x20 {
				return buf, s.errorf("control character in string")
			}
			s.pos++
		}
		buf = append(buf, s.data[start:s.pos]...)
		if s.pos >= len(s.data) {
			return buf, s.errorf("unterminated string")
		}
		if s.data[s.pos] == '"' {
			s.pos++
			return buf, nil
		}
		// Backslash escape.
		if s.pos+1 >= len(s.data) {
			return buf, s.errorf("unterminated escape")
		}
		c := s.data[s.pos+1]
		s.pos += 2
		switch c {
		case '"', '\\', '/':
			buf = append(buf, c)
		case 'b':
			buf = append(buf, '\b')
		case 'f':
			buf = append(buf, '\f')
		case 'n':
			buf = append(buf, '\n')
		case 'r':
			buf = append(buf, '\r')
		case 't':
			buf = append(buf, '\t')
		case 'u':
			r, err := s.hex4()
			if err != nil {
				return buf, err
			}
			if utf16.IsSurrogate(r) {
				// A high surrogate must be followed by \u and a low one;
				// anything else decodes to U+FFFD, as encoding/json does.
				r2 := rune(-1)
				if s.pos+1 < len(s.data) && s.data[s.pos] == '\\' && s.data[s.pos+1] == 'u' {
					save := s.pos
					s.pos += 2
					if r2, err = s.hex4(); err != nil {
						return buf, err
					}
					if utf16.DecodeRune(r, r2) == utf8.RuneError {
						s.pos = save
						r2 = -1
					}
				}
				if r2 < 0 {
					r = utf8.RuneError
				} else {
					r = utf16.DecodeRune(r, r2)
				}
			}
			buf = utf8.AppendRune(buf, r)
		default:
			return buf, s.errorf("invalid escape \\%c", c)
		}
	}
}

func (s *scanner) hex4() (rune, error) {
	if s.pos+4 > len(s.data) {
		return 0, s.errorf("short \\u escape")
	}
	v, err := strconv.ParseUint(string(s.data[s.pos:s.pos+4]), 16, 32)
	if err != nil {
		return 0, s.errorf("bad \\u escape %q", s.data[s.pos:s.pos+4])
	}
	s.pos += 4
	return rune(v), nil
}

// integer reads a JSON number that must be an integer.
func (s *scanner) integer() (int64, error) {
	s.skipSpace()
	start := s.pos
	for s.pos < len(s.data) {
		c := s.data[s.pos]
		if (c >= '0' && c <= '9') || c == '-' {
			s.pos++
			continue
		}
		break
	}
	v, err := strconv.ParseInt(string(s.data[start:s.pos]), 10, 64)
	if err != nil {
		return 0, s.errorf("want an integer: %v", err)
	}
	return v, nil
}

// skip moves past one JSON value of any kind and returns its raw bytes.
func (s *scanner) skip() ([]byte, error) {
	c := s.peek()
	start := s.pos
	switch {
	case c == '"':
		if _, err := s.str(nil); err != nil {
			return nil, err
		}
	case c == '{' || c == '[':
		depth := 0
	walk:
		for s.pos < len(s.data) {
			switch s.data[s.pos] {
			case '"':
				if _, err := s.str(nil); err != nil {
					return nil, err
				}
				continue
			case '{', '[':
				depth++
			case '}', ']':
				depth--
			}
			s.pos++
			if depth == 0 {
				break walk
			}
		}
		if depth != 0 {
			return nil, s.errorf("unterminated %c", c)
		}
	case c == 0:
		return nil, s.errorf("unexpected end of JSON")
	default:
		for s.pos < len(s.data) {
			switch s.data[s.pos] {
			case ',', '}', ']', ' ', '\t', '\n', '\r':
				goto done
			}
			s.pos++
		}
	done:
		if s.pos == start {
			return nil, s.errorf("want a value")
		}
	}
	raw := s.data[start:s.pos]
	if !json.Valid(raw) {
		return nil, s.errorf("invalid JSON value %.40q", raw)
	}
	return raw, nil
}

// object calls field for every key of a JSON object, with the scanner
// positioned at the key's value; field must consume that value.
func (s *scanner) object(field func(key []byte) error) error {
	if err := s.expect('{'); err != nil {
		return err
	}
	if s.peek() == '}' {
		s.pos++
		return nil
	}
	var key []byte
	for {
		var err error
		if key, err = s.str(key[:0]); err != nil {
			return err
		}
		if err := s.expect(':'); err != nil {
			return err
		}
		if err := field(key); err != nil {
			return err
		}
		switch s.peek() {
		case ',':
			s.pos++
		case '}':
			s.pos++
			return nil
		default:
			return s.errorf("want ',' or '}' in object")
		}
	}
}

// array calls elem for every element of a JSON array; elem must consume it.
func (s *scanner) array(elem func() error) error {
	if err := s.expect('['); err != nil {
		return err
	}
	if s.peek() == ']' {
		s.pos++
		return nil
	}
	for {
		if err := elem(); err != nil {
			return err
		}
		switch s.peek() {
		case ',':
			s.pos++
		case ']':
			s.pos++
			return nil
		default:
			return s.errorf("want ',' or ']' in array")
		}
	}
}

// end checks that nothing but white space follows the document.
func (s *scanner) end() error {
	if s.peek() != 0 {
		return s.errorf("trailing data after JSON document")
	}
	return nil
}
