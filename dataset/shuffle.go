package dataset

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
)

// A shuffle delivers P passes, each a seeded permutation of the rows
// passOf assigns to it (see Open). Two ways give the same rows in the same
// order:
//
//   - rereading: pass p reads every file and keeps its own rows. P reads
//     of the input, which is quadratic in its size (P grows with it): right
//     only where a Limit is met within the first pass.
//   - spilling: one read of the input writes each row to a spill file,
//     in chunks of its pass; pass p then reads its chunks back. The input
//     is read once, and its text written and read once more, on the disk
//     of SpillDir.

// shufflePasses returns how many passes keep one pass's text near maxBytes.
func shufflePasses(textBytes, maxBytes, rows int64) int64 {
	p := (textBytes + maxBytes - 1) / maxBytes
	return max(1, min(p, rows))
}

// passOf assigns row i to a pass with a seeded splitmix64 hash, so that the
// assignment needs no memory and is independent of everything but the seed.
func passOf(seed uint64, i int64, passes int64) int64 {
	if passes == 1 {
		return 0
	}
	z := seed + uint64(i)*0x9e3779b97f4a7c15 + 0x9e3779b97f4a7c15
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	z ^= z >> 31
	return int64(z % uint64(passes))
}

// rereadShuffles makes every shuffle read its files again each pass, for
// tests that compare the two ways.
var rereadShuffles = false

// shuffle delivers every row of a shuffle through emit until it returns
// false; the error is a read's or the spill's.
func (s *Source) shuffle(emit func(record) bool) error {
	passes := shufflePasses(s.textBytes, s.opts.ShuffleMemory, s.total)
	// A limit within about half the first pass's rows is met there.
	if passes == 1 || rereadShuffles || (s.opts.Limit > 0 && s.opts.Limit <= s.total/passes/2) {
		return s.shuffleRereading(passes, emit)
	}
	return s.shuffleSpilled(passes, emit)
}

func (s *Source) shuffleRereading(passes int64, emit func(record) bool) error {
	for p := range passes {
		want := func(i int64) bool { return passOf(s.opts.Seed, i, passes) == p }
		var buf []record
		keep := func(r record) bool { buf = append(buf, r); return true }
		if _, _, err := s.scanFiles(want, keep); err != nil {
			return err
		}
		if !s.emitPass(p, buf, emit) {
			return nil
		}
	}
	return nil
}

func (s *Source) shuffleSpilled(passes int64, emit func(record) bool) error {
	sp, err := newSpill(s.opts.SpillDir, passes)
	if err != nil {
		return err
	}
	defer sp.close()
	var pass int64 // of the row scan yields next: want(i) comes just before it
	want := func(i int64) bool { pass = passOf(s.opts.Seed, i, passes); return true }
	var putErr error
	put := func(r record) bool { putErr = sp.put(pass, r); return putErr == nil }
	if _, _, err := s.scanFiles(want, put); err != nil {
		return err
	}
	if putErr != nil {
		return putErr
	}
	if err := sp.flush(); err != nil {
		return err
	}
	for p := range passes {
		buf, err := sp.pass(s.ctx, p)
		if err != nil {
			return err
		}
		if !s.emitPass(p, buf, emit) {
			return nil
		}
	}
	return nil
}

// emitPass permutes pass p's rows and delivers them; false when emit
// stopped.
func (s *Source) emitPass(p int64, buf []record, emit func(record) bool) bool {
	rng := rand.New(rand.NewPCG(s.opts.Seed, uint64(p)))
	rng.Shuffle(len(buf), func(i, j int) { buf[i], buf[j] = buf[j], buf[i] })
	for i := range buf {
		if !emit(buf[i]) {
			return false
		}
		buf[i] = record{} // let the text go as soon as it is delivered
	}
	return true
}

// spill holds a shuffle's rows between the read of the input and the
// passes, in one file. Each pass gathers its rows (a length, then the fields) in a
// buffer of its own, written out as a chunk once it holds spillChunk
// bytes, so that a pass reads back its chunks alone.
type spill struct {
	f      *os.File
	end    int64
	bufs   [][]byte
	chunks [][]chunk
	body   []byte
}

type chunk struct{ off, n int64 }

const spillChunk = 64 << 10

func newSpill(dir string, passes int64) (*spill, error) {
	f, err := os.CreateTemp(dir, "shuffle-*.rows")
	if err != nil {
		return nil, fmt.Errorf("dataset: the shuffle's spill file: %w", err)
	}
	// Unlinked at once where the system allows it, so that a crash leaves
	// nothing behind; close removes it otherwise (Windows), before the
	// entry folder it may be in is committed.
	os.Remove(f.Name())
	return &spill{f: f, bufs: make([][]byte, passes), chunks: make([][]chunk, passes)}, nil
}

func (sp *spill) close() {
	sp.f.Close()
	os.Remove(sp.f.Name())
}

func (sp *spill) put(pass int64, r record) error {
	sp.body = appendRecord(sp.body[:0], r)
	b := binary.AppendUvarint(sp.bufs[pass], uint64(len(sp.body)))
	sp.bufs[pass] = append(b, sp.body...)
	if len(sp.bufs[pass]) >= spillChunk {
		return sp.write(pass)
	}
	return nil
}

// write appends pass's buffer to the file as its next chunk.
func (sp *spill) write(pass int64) error {
	b := sp.bufs[pass]
	if _, err := sp.f.Write(b); err != nil {
		return fmt.Errorf("dataset: writing the shuffle's spill file: %w", err)
	}
	sp.chunks[pass] = append(sp.chunks[pass], chunk{sp.end, int64(len(b))})
	sp.end += int64(len(b))
	sp.bufs[pass] = b[:0]
	return nil
}

// flush ends the writing: every row is in the file.
func (sp *spill) flush() error {
	for p, b := range sp.bufs {
		if len(b) > 0 {
			if err := sp.write(int64(p)); err != nil {
				return err
			}
		}
		sp.bufs[p] = nil
	}
	return nil
}

// pass reads pass p's rows back, in the order they were put.
func (sp *spill) pass(ctx context.Context, p int64) ([]record, error) {
	var out []record
	for _, c := range sp.chunks[p] {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		if int64(cap(sp.body)) < c.n {
			sp.body = make([]byte, c.n)
		}
		b := sp.body[:c.n]
		if _, err := sp.f.ReadAt(b, c.off); err != nil {
			return nil, fmt.Errorf("dataset: reading the shuffle's spill file: %w", err)
		}
		for len(b) > 0 {
			n, k := binary.Uvarint(b)
			if k <= 0 || n > uint64(len(b)-k) {
				return nil, errors.New("dataset: reading the shuffle's spill file: a row cut short")
			}
			r, err := readRecord(b[k : k+int(n)])
			if err != nil {
				return nil, fmt.Errorf("dataset: reading the shuffle's spill file: %w", err)
			}
			out = append(out, r)
			b = b[k+int(n):]
		}
	}
	sp.chunks[p] = nil
	return out, nil
}

// appendRecord appends what a record holds as scanned (not conv, which
// emit makes) to b.
func appendRecord(b []byte, r record) []byte {
	for _, v := range r.v {
		b = appendString(b, v)
	}
	b = append(b, r.null)
	b = binary.AppendUvarint(b, uint64(r.file))
	b = binary.AppendUvarint(b, uint64(r.pos+1)) // -1 for a whole text file
	b = appendCount(b, len(r.msgs), r.msgs == nil)
	for _, m := range r.msgs {
		b = appendString(b, m.role)
		b = appendString(b, m.content)
		b = append(b, boolByte(m.null))
		b = appendCount(b, len(m.parts), m.parts == nil)
		for _, p := range m.parts {
			b = appendString(b, p)
		}
	}
	b = append(b, boolByte(r.flaw != nil))
	if r.flaw != nil {
		b = appendString(b, r.flaw.Error())
	}
	return b
}

// appendCount appends a list's length, 0 for none at all: a content given
// as an empty list of parts is not a content without parts.
func appendCount(b []byte, n int, none bool) []byte {
	if none {
		return append(b, 0)
	}
	return binary.AppendUvarint(b, uint64(n)+1)
}

func appendString(b []byte, s string) []byte {
	return append(binary.AppendUvarint(b, uint64(len(s))), s...)
}

func boolByte(v bool) byte {
	if v {
		return 1
	}
	return 0
}

// readRecord is appendRecord's inverse.
func readRecord(b []byte) (record, error) {
	d := decoder{b: b}
	var r record
	for i := range r.v {
		r.v[i] = d.string()
	}
	r.null = d.byte()
	r.file = int32(d.uvarint())
	r.pos = int64(d.uvarint()) - 1
	if n := d.uvarint(); n > 0 && d.err == nil {
		r.msgs = make([]rawMessage, min(n-1, uint64(len(b))))
		for i := range r.msgs {
			m := &r.msgs[i]
			m.role, m.content, m.null = d.string(), d.string(), d.byte() == 1
			if k := d.uvarint(); k > 0 && d.err == nil {
				m.parts = make([]string, min(k-1, uint64(len(b))))
				for j := range m.parts {
					m.parts[j] = d.string()
				}
			}
		}
	}
	if d.byte() == 1 {
		r.flaw = flawError{errors.New(d.string())}
	}
	if d.err == nil && len(d.b) != 0 {
		d.err = errors.New("trailing bytes")
	}
	return r, d.err
}

// decoder reads appendRecord's fields; the first short read sets err and
// every later read gives zero.
type decoder struct {
	b   []byte
	err error
}

func (d *decoder) fail() {
	if d.err == nil {
		d.err = io.ErrUnexpectedEOF
	}
	d.b = nil
}

func (d *decoder) uvarint() uint64 {
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.fail()
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) byte() byte {
	if len(d.b) == 0 {
		d.fail()
		return 0
	}
	v := d.b[0]
	d.b = d.b[1:]
	return v
}

func (d *decoder) string() string {
	n := d.uvarint()
	if n > uint64(len(d.b)) {
		d.fail()
		return ""
	}
	s := string(d.b[:n])
	d.b = d.b[n:]
	return s
}
