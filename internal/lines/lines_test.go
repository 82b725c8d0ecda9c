package lines

import (
	"errors"
	"io"
	"strings"
	"testing"
)

// endless is a reader that never sends a newline.
type endless struct{ n int64 }

func (e *endless) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = 'x'
	}
	e.n += int64(len(p))
	return len(p), nil
}

func TestLines(t *testing.T) {
	r := NewReader(strings.NewReader("a\n\nbcd\nend"), 3)
	var got []string
	for {
		l, err := r.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, string(l))
	}
	if strings.Join(got, "|") != "a||bcd|end" || r.Line() != 4 {
		t.Fatalf("%q, line %d", got, r.Line())
	}
	r = NewReader(strings.NewReader("ab\nabcd\n"), 3)
	r.Next()
	var tl *TooLongError
	if _, err := r.Next(); !errors.As(err, &tl) || tl.Line != 2 || !strings.Contains(err.Error(), "line 2 is longer than 3 bytes") {
		t.Fatalf("long line: %v", err)
	}
}

// TestByteOrderMark: a byte order mark before the first line is not part
// of it; one further on is the line's.
func TestByteOrderMark(t *testing.T) {
	r := NewReader(strings.NewReader(BOM+"{}\n"+BOM+"x\n"), 0)
	first, _ := r.Next()
	if string(first) != "{}" {
		t.Errorf("first line %q", first)
	}
	second, _ := r.Next()
	if string(second) != BOM+"x" {
		t.Errorf("second line %q", second)
	}
}

// TestEndlessLineIsBounded: a stream without newlines stops at the bound
// (it used to be read into memory without end).
func TestEndlessLineIsBounded(t *testing.T) {
	src := &endless{}
	_, err := NewReader(src, 4<<20).Next()
	var tl *TooLongError
	if !errors.As(err, &tl) || !strings.Contains(err.Error(), "longer than 4 MiB") {
		t.Fatalf("%v", err)
	}
	if src.n > 6<<20 {
		t.Errorf("read %d bytes for a 4 MiB bound", src.n)
	}
}
