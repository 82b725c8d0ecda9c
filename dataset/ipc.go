package dataset

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/ipc"
	"github.com/apache/arrow-go/v18/arrow/memory"
)

// ipcMagic opens and closes every Arrow IPC file.
var ipcMagic = []byte("ARROW1")

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
		return nil, fmt.Errorf("dataset: %s: %v", path, err)
	}
	r, err := newIPCFileReader(f)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("dataset: %s: not a readable Arrow IPC file: %v", path, err)
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
		return errors.New("too short to be an Arrow IPC file")
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

// Next returns the next record batch, checked for consistent offsets and
// lengths, or io.EOF after the last one. The caller releases it.
func (r *IPCReader) Next() (rec arrow.RecordBatch, err error) {
	if r.next >= r.r.NumRecords() {
		return nil, io.EOF
	}
	defer func() {
		if p := recover(); p != nil {
			rec, err = nil, fmt.Errorf("dataset: %s: batch %d: corrupt data: %v", r.f.Name(), r.next, p)
		}
	}()
	rec, err = r.r.RecordAt(r.next)
	if err != nil {
		return nil, fmt.Errorf("dataset: %s: batch %d: %v", r.f.Name(), r.next, err)
	}
	// Offsets and lengths are trusted by every later access; check them
	// once here so that a damaged file is an error, not a crash.
	if err := array.ValidateRecordFull(rec); err != nil {
		rec.Release()
		return nil, fmt.Errorf("dataset: %s: batch %d: corrupt data: %v", r.f.Name(), r.next, err)
	}
	r.next++
	return rec, nil
}

// Close closes the file.
func (r *IPCReader) Close() error {
	r.r.Close()
	return r.f.Close()
}
