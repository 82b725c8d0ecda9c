package dataset

import (
	"bytes"
	"compress/gzip"
	"context"
	"fmt"
	"io"
	"strings"
	"unicode/utf8"

	"gemmaft/internal/lines"
)

// MaxTextFileBytes bounds a plain text file read whole (a variable for
// tests): a text longer than this is better split into files, or given as
// rows of JSON lines or Parquet.
var MaxTextFileBytes int64 = 1 << 30

// textFile is a plain text file (.txt, .text, .md, optionally .gz), read
// whole as one text: the LayoutText row of a document for continued
// pretraining.
type textFile struct {
	open openFunc
	name string
	gz   bool
	size int64
}

func openText(open openFunc, path string) (*textFile, error) {
	tf := &textFile{open: open, name: path, gz: strings.HasSuffix(strings.ToLower(path), ".gz")}
	f, err := open(path)
	if err != nil {
		return nil, fmt.Errorf("dataset: %w", err)
	}
	defer f.Close()
	if st, err := f.Stat(); err == nil {
		tf.size = st.Size()
	}
	return tf, nil
}

func (tf *textFile) path() string     { return tf.name }
func (tf *textFile) numRows() int64   { return 1 }
func (tf *textFile) textBytes() int64 { return tf.size }
func (tf *textFile) close() error     { return nil }

func (tf *textFile) scan(ctx context.Context, file int32, base int64, want func(int64) bool, yield func(record) bool) (rows int64, stopped bool, err error) {
	if err := ctx.Err(); err != nil {
		return 0, false, err
	}
	if !want(base) {
		return 1, false, nil
	}
	text, err := tf.read()
	if err != nil {
		return 0, false, err
	}
	r := record{file: file, pos: -1}
	r.v[0] = text
	return 1, !yield(r), nil
}

// read returns the file's text, checked to be UTF-8, without a leading
// byte order mark, its line endings read as "\n": a file saved on Windows
// (CRLF) or old Mac OS (CR) gives the text Hugging Face datasets' text
// loader gives, which opens files with Python's universal newlines.
func (tf *textFile) read() (string, error) {
	f, err := tf.open(tf.name)
	if err != nil {
		return "", fmt.Errorf("dataset: %w", err)
	}
	defer f.Close()
	var src io.Reader = f
	if tf.gz {
		zr, err := gzip.NewReader(f)
		if err != nil {
			return "", fmt.Errorf("dataset: %s: not a gzip file: %w", tf.name, err)
		}
		defer zr.Close()
		src = zr
	}
	data, err := io.ReadAll(io.LimitReader(src, MaxTextFileBytes+1))
	if err != nil {
		return "", fmt.Errorf("dataset: %s: %w", tf.name, err)
	}
	if int64(len(data)) > MaxTextFileBytes {
		return "", fmt.Errorf("dataset: %s: longer than %d bytes; split it into several files, or give its paragraphs as rows of JSON lines", tf.name, MaxTextFileBytes)
	}
	data = bytes.TrimPrefix(data, []byte(lines.BOM))
	if !utf8.Valid(data) {
		return "", fmt.Errorf("dataset: %s: invalid UTF-8 at byte %d", tf.name, lines.InvalidUTF8At(string(data)))
	}
	if bytes.IndexByte(data, '\r') >= 0 {
		data = bytes.ReplaceAll(bytes.ReplaceAll(data, []byte("\r\n"), []byte("\n")), []byte("\r"), []byte("\n"))
	}
	return string(data), nil
}
