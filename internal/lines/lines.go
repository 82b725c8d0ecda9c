// Package lines reads newline-terminated lines with a bound on their
// length, so that input without newlines (a binary file, an endless
// stream) fails with a clear error instead of filling memory.
package lines

import (
	"bufio"
	"fmt"
	"io"
	"unicode/utf8"
)

// BOM is the byte order mark editors on Windows start UTF-8 files with.
const BOM = "\xef\xbb\xbf"

// SkipBOM reads past a byte order mark at r's start.
func SkipBOM(r *bufio.Reader) {
	if b, _ := r.Peek(len(BOM)); string(b) == BOM {
		r.Discard(len(BOM))
	}
}

// DefaultMax is the longest line readers accept unless told otherwise:
// far beyond any record of instruction data or packed row, far below what
// would hurt the machine.
const DefaultMax = 64 << 20

// A TooLongError is a line longer than the reader's bound.
type TooLongError struct {
	Line int64 // 1-based
	Max  int
}

func (e *TooLongError) Error() string {
	return fmt.Sprintf("line %d is longer than %s without a newline: not JSON lines, or one huge record", e.Line, human(e.Max))
}

func human(n int) string {
	switch {
	case n >= 1<<30 && n%(1<<30) == 0:
		return fmt.Sprintf("%d GiB", n>>30)
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%d MiB", n>>20)
	case n >= 1<<10 && n%(1<<10) == 0:
		return fmt.Sprintf("%d KiB", n>>10)
	}
	return fmt.Sprintf("%d bytes", n)
}

// A Reader reads lines of at most Max bytes.
type Reader struct {
	r    *bufio.Reader
	max  int
	buf  []byte
	line int64
}

// NewReader reads lines of at most max bytes (DefaultMax when max <= 0)
// from r.
func NewReader(r io.Reader, max int) *Reader {
	if max <= 0 {
		max = DefaultMax
	}
	return &Reader{r: bufio.NewReaderSize(r, min(1<<20, max+1)), max: max}
}

// Next returns the next line without its newline, valid until the next
// call, or io.EOF after the last. A last line without a newline is a line.
// A line longer than the bound is a *TooLongError. A byte order mark
// before the first line is not part of it.
func (r *Reader) Next() ([]byte, error) {
	if r.line == 0 {
		SkipBOM(r.r)
	}
	r.buf = r.buf[:0]
	for {
		chunk, err := r.r.ReadSlice('\n')
		r.buf = append(r.buf, chunk...)
		n := len(r.buf)
		if err == nil {
			n-- // the newline
		}
		if n > r.max {
			return nil, &TooLongError{Line: r.line + 1, Max: r.max}
		}
		switch err {
		case nil:
			r.line++
			return r.buf[:len(r.buf)-1], nil
		case bufio.ErrBufferFull:
			continue
		case io.EOF:
			if len(r.buf) == 0 {
				return nil, io.EOF
			}
			r.line++
			return r.buf, nil
		default:
			return nil, err
		}
	}
}

// Line is the number of the line Next returned last.
func (r *Reader) Line() int64 { return r.line }

// InvalidUTF8At is the byte offset of s's first byte that is not UTF-8, or
// -1 when s is valid.
func InvalidUTF8At(s string) int {
	for i, r := range s {
		if r == utf8.RuneError {
			if _, size := utf8.DecodeRuneInString(s[i:]); size == 1 {
				return i
			}
		}
	}
	return -1
}
