// Package atomicfile replaces files so that a reader, or a process started
// after a crash, sees the old content or the whole new content, never a mix.
package atomicfile

import (
	"bufio"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
)

// pending holds the temporary files and folders of writes in progress, so
// that a process about to exit on a signal can remove them (RemovePending).
var pending sync.Map // path → struct{}

func track(tmp string) (untrack func()) {
	pending.Store(tmp, struct{}{})
	return func() { pending.Delete(tmp) }
}

// RemovePending removes the temporary files and folders of every write
// still in progress, for a process that is about to exit without
// finishing them (on a signal): nothing half-written is left behind.
func RemovePending() {
	pending.Range(func(k, _ any) bool {
		os.RemoveAll(k.(string))
		return true
	})
}

// A Pending is a file being written in place of another: a temporary file
// in the same folder that appears at its path only on Commit. Abort (or a
// failed Commit) removes it and leaves the path as it was.
type Pending struct {
	path    string
	f       *os.File
	w       *bufio.Writer
	done    bool
	untrack func()
	inPlace bool // f is path itself (CreateOutput of a device or FIFO)
}

// Create starts writing a file to replace path. Writes are buffered.
func Create(path string) (*Pending, error) {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return nil, namePath(path, err)
	}
	if err := tmp.Chmod(0o644); err != nil {
		tmp.Close()
		os.Remove(tmp.Name())
		return nil, err
	}
	return &Pending{path: path, f: tmp, w: bufio.NewWriterSize(tmp, 1<<20), untrack: track(tmp.Name())}, nil
}

// CreateOutput is Create for a path a user named as a command's output.
// A symbolic link is followed and its target replaced, keeping the link;
// an existing file keeps its permissions. A path that is no regular file
// (/dev/stdout, /dev/null, a FIFO) cannot be replaced without destroying
// it: it is opened and written in place, as a shell's redirection writes
// it, and Abort cannot take back what was written there.
func CreateOutput(path string) (*Pending, error) {
	if target, err := filepath.EvalSymlinks(path); err == nil {
		path = target
	}
	fi, err := os.Stat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return Create(path)
	case err != nil:
		return nil, err
	case fi.IsDir():
		return nil, &os.PathError{Op: "create", Path: path, Err: errors.New("is a folder")}
	case !fi.Mode().IsRegular():
		f, err := os.OpenFile(path, os.O_WRONLY, 0)
		if err != nil {
			return nil, err
		}
		return &Pending{path: path, f: f, w: bufio.NewWriterSize(f, 1<<20), untrack: func() {}, inPlace: true}, nil
	}
	p, err := Create(path)
	if err != nil {
		return nil, err
	}
	if err := p.f.Chmod(fi.Mode().Perm()); err != nil {
		p.Abort()
		return nil, err
	}
	return p, nil
}

// namePath has an error about a temporary file name the path it stands
// for, which is what the caller knows.
func namePath(path string, err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		err = pe.Err
	}
	return &os.PathError{Op: "create", Path: path, Err: err}
}

// Write appends to the pending file.
func (p *Pending) Write(b []byte) (int, error) { return p.w.Write(b) }

// Commit flushes and syncs the file, renames it over the path and syncs
// the folder. On error the path is left as it was.
func (p *Pending) Commit() error {
	if p.done {
		return os.ErrClosed
	}
	p.done = true
	defer p.untrack()
	err := p.w.Flush()
	if p.inPlace { // nothing to sync or rename: a device or a pipe
		if cerr := p.f.Close(); err == nil {
			err = cerr
		}
		return err
	}
	if err == nil {
		err = p.f.Sync()
	}
	if cerr := p.f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(p.f.Name(), p.path)
	}
	if err != nil {
		os.Remove(p.f.Name())
		return err
	}
	return SyncDir(filepath.Dir(p.path))
}

// Abort discards the pending file; after Commit it does nothing.
func (p *Pending) Abort() {
	if p.done {
		return
	}
	p.done = true
	p.f.Close()
	if !p.inPlace {
		os.Remove(p.f.Name())
	}
	p.untrack()
}

// Write creates or replaces path with what write produces: it writes a
// temporary file in the same folder, syncs it, renames it over path and
// syncs the folder. On error path is left as it was.
func Write(path string, write func(w io.Writer) error) error {
	p, err := Create(path)
	if err != nil {
		return err
	}
	if err := write(p); err != nil {
		p.Abort()
		return err
	}
	return p.Commit()
}

// WriteFile is Write for data already in memory.
func WriteFile(path string, data []byte) error {
	return Write(path, func(w io.Writer) error {
		_, err := w.Write(data)
		return err
	})
}

// SyncDir makes the creation, rename or removal of entries of dir durable.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// Dir creates the folder path, which must not exist, with what fill writes
// into it: fill works in a temporary folder beside path (a name of its own,
// never one a user may hold), which is synced and renamed to path only when
// fill succeeds, so path appears complete or not at all. Missing parent
// folders are created.
func Dir(path string, fill func(dir string) error) error {
	path = filepath.Clean(path) // "out/" as a shell completes it
	if _, err := os.Lstat(path); err == nil {
		return &os.PathError{Op: "create", Path: path, Err: os.ErrExist}
	}
	parent := filepath.Dir(path)
	if err := os.MkdirAll(parent, 0o755); err != nil {
		return err
	}
	tmp, err := os.MkdirTemp(parent, "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return namePath(path, err)
	}
	defer track(tmp)()
	defer os.RemoveAll(tmp) // a no-op once renamed
	if err := os.Chmod(tmp, 0o755); err != nil {
		return err
	}
	if err := fill(tmp); err != nil {
		return err
	}
	if err := SyncDir(tmp); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	return SyncDir(parent)
}
