package dataset

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/ipc"
	"github.com/apache/arrow-go/v18/arrow/memory"
)

// ipcMagic opens and closes every Arrow IPC file.
var ipcMagic = []byte("ARROW1")

// IsIPCFile reports whether the file at path starts as an Arrow IPC file
// does (OpenIPC checks the rest).
func IsIPCFile(path string) (bool, error) {
	f, err := os.Open(path)
	if err != nil {
		return false, fmt.Errorf("dataset: %w", err)
	}
	defer f.Close()
	head := make([]byte, len(ipcMagic))
	n, _ := io.ReadFull(f, head)
	return bytes.Equal(head[:n], ipcMagic), nil
}

// IPCReader reads an Arrow IPC file one record batch at a time.
type IPCReader struct {
	f    *os.File
	r    *ipc.FileReader
	next int
}

// OpenIPC opens an Arrow IPC file, checking the magic bytes at both ends
// first so that a truncated file is reported as such.
func OpenIPC(path string) (*IPCReader, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("dataset: %w", err)
	}
	if err := checkIPCMagic(f); err != nil {
		f.Close()
		return nil, fmt.Errorf("dataset: %s: %w", path, err)
	}
	r, err := newIPCFileReader(f)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("dataset: %s: not a readable Arrow IPC file: %w", path, err)
	}
	return &IPCReader{f: f, r: r}, nil
}

// newIPCFileReader opens the reader; flatbuffers decoding of a corrupt
// footer can panic, which becomes an error.
func newIPCFileReader(f *os.File) (r *ipc.FileReader, err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("corrupt footer: %v", p)
		}
	}()
	return ipc.NewFileReader(f, ipc.WithAllocator(memory.DefaultAllocator))
}

func checkIPCMagic(f *os.File) error {
	st, err := f.Stat()
	if err != nil {
		return err
	}
	n := int64(len(ipcMagic))
	if st.Size() < 2*n+4 {
		return errors.New("not an Arrow IPC file (too short)")
	}
	head := make([]byte, n)
	tail := make([]byte, n)
	if _, err := f.ReadAt(head, 0); err != nil {
		return err
	}
	if _, err := f.ReadAt(tail, st.Size()-n); err != nil {
		return err
	}
	if !bytes.Equal(head, ipcMagic) {
		return errors.New("not an Arrow IPC file (no ARROW1 magic at the start)")
	}
	if !bytes.Equal(tail, ipcMagic) {
		return errors.New("Arrow IPC file without footer (truncated or still being written)")
	}
	return nil
}

// Schema returns the file's schema.
func (r *IPCReader) Schema() *arrow.Schema { return r.r.Schema() }

// NumBatches returns the number of record batches in the file.
func (r *IPCReader) NumBatches() int { return r.r.NumRecords() }

// Next returns the next record batch, checked as Batch checks it, or io.EOF
// after the last one. The caller releases it.
func (r *IPCReader) Next() (arrow.RecordBatch, error) {
	if r.next >= r.r.NumRecords() {
		return nil, io.EOF
	}
	rec, err := r.Batch(r.next)
	if err != nil {
		return nil, err
	}
	r.next++
	return rec, nil
}

// Batch returns record batch i (0 ≤ i < NumBatches), checked for consistent
// offsets and lengths, for readers that go through a file in an order of
// their own. The caller releases it. It does not move Next.
func (r *IPCReader) Batch(i int) (rec arrow.RecordBatch, err error) {
	if i < 0 || i >= r.r.NumRecords() {
		return nil, fmt.Errorf("dataset: %s: batch %d out of range [0, %d)", r.f.Name(), i, r.r.NumRecords())
	}
	defer func() {
		if p := recover(); p != nil {
			rec, err = nil, fmt.Errorf("dataset: %s: batch %d: corrupt data: %v", r.f.Name(), i, p)
		}
	}()
	rec, err = r.r.RecordAt(i)
	if err != nil {
		return nil, fmt.Errorf("dataset: %s: batch %d: %w", r.f.Name(), i, err)
	}
	// Offsets and lengths are trusted by every later access; check them
	// once here so that a damaged file is an error, not a crash.
	if err := array.ValidateRecordFull(rec); err != nil {
		rec.Release()
		return nil, fmt.Errorf("dataset: %s: batch %d: corrupt data: %w", r.f.Name(), i, err)
	}
	return rec, nil
}

// Close closes the file.
func (r *IPCReader) Close() error {
	r.r.Close()
	return r.f.Close()
}

// Int32Row copies row i of a list<int32> column: an example's token ids,
// labels or a packed row's example lengths.
func Int32Row(l *array.List, i int) []int32 {
	a, z := l.ValueOffsets(i)
	return slices.Clone(l.ListValues().(*array.Int32).Int32Values()[a:z])
}
