package pipeline

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sync"
)

// A stage's key holds the digests its input files had when the run was
// planned, but the stage reads them later: an rsync or a download may
// replace or edit a file in between, or while it is read. The engine
// therefore checks that what a stage read is what its key says before it
// commits the entry, and fails the stage, naming the file, otherwise.
//
// A stage reads its keyed files through Task.Open, which hashes what is read
// as it is read: a file read from start to end must give the digest in the
// key. A file read in another order (Parquet) or not to its end is checked
// through the descriptor it was read from: unchanged since it was hashed
// (its size, times and inode, as the stat cache trusts them) and not written
// while open, or else hashed again through that descriptor. A file a
// library reads by its path (a model checkpoint) is checked by
// Task.CheckFiles once it has been read, and every keyed file not checked
// otherwise is checked when the stage ends.

// keyedFile is one input file as the plan hashed it.
type keyedFile struct {
	path    string
	sha     string
	state   fileState // the state the digest belongs to
	trusted bool      // state vouches for the content (not racily clean)
}

// An InputChangedError says that an input file of a stage is not, or was
// not while the stage read it, the file its key was computed from.
type InputChangedError struct {
	Path string
	Why  string
}

func (e *InputChangedError) Error() string {
	return fmt.Sprintf("input file %s changed after it was hashed for this stage's key (%s); nothing was cached: run again once the file is complete", e.Path, e.Why)
}

// inputCheck is what a task knows about one of its keyed files.
type inputCheck struct {
	kf *keyedFile

	mu       sync.Mutex
	opened   int // opens through Task.Open
	verified int // of which closed and verified
	settled  bool
	failed   error
	open     map[*File]bool
}

func (c *inputCheck) fail(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.failed == nil {
		c.failed = err
	}
}

// Open opens one of the stage's input files (a path its Runner's Files
// returned) for reading and checks, as it is read and when it is closed,
// that its content is what the stage's key holds. A read that reaches the
// end of a changed file, or Close, returns an *InputChangedError; the
// engine also refuses to commit the stage's entry then, whatever the stage
// does with the error. Other paths open without a check.
func (t *Task) Open(path string) (*File, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	c := t.inputs[path]
	file := &File{f: f, check: c}
	if c == nil {
		return file, nil
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	file.st0 = stateOf(fi)
	file.h = sha256.New()
	file.seq = true
	c.mu.Lock()
	c.opened++
	if c.open == nil {
		c.open = map[*File]bool{}
	}
	c.open[file] = true
	c.mu.Unlock()
	return file, nil
}

// CheckFiles checks now that input files the stage has read by their path
// (through a library that opens them itself) have not changed since they
// were hashed for the key, so that a change after this point, while the
// stage goes on with what it read, does not fail it.
func (t *Task) CheckFiles(paths ...string) error {
	for _, p := range paths {
		c := t.inputs[p]
		if c == nil {
			continue
		}
		if err := c.fence(); err != nil {
			c.fail(err)
			return err
		}
		c.mu.Lock()
		c.settled = true
		c.mu.Unlock()
	}
	return nil
}

// FileDigest is the SHA-256 digest of a file the stage checks without
// reading it for its key (another stage's checkpoint, to see that it is
// the one that stage read), through the store's record of file states: a
// checkpoint of tens of gigabytes unchanged since it was last hashed is
// not read again.
func (t *Task) FileDigest(path string) (string, error) {
	if t.plan == nil {
		abs, err := filepath.Abs(path)
		if err != nil {
			return "", err
		}
		sum, _, err := hashFile(abs)
		return sum, err
	}
	return t.plan.store.FileDigest(path)
}

// FilesWithDigest lists the input files of this run's plan, of any stage it
// keys (those it runs and what they read), whose content has the SHA-256
// digest sum now, in the plan's order. It
// serves a stage that needs a file an upstream manifest names: the manifest
// holds the path of the run that computed the entry, perhaps in another
// checkout sharing the cache and since removed, while keys hold digests
// only, so the same content is to be found among this run's files.
func (t *Task) FilesWithDigest(sum string) []string {
	if t.plan == nil {
		return nil
	}
	var out []string
	for _, st := range t.plan.Steps {
		for _, kf := range st.keyed {
			if kf.sha != sum || slices.Contains(out, kf.path) {
				continue
			}
			// The plan's digest may be stale by now; the stat cache
			// says cheaply whether it still holds.
			if now, _, _, err := t.plan.store.stats.digestState(kf.path); err == nil && now == sum {
				out = append(out, kf.path)
			}
		}
	}
	return out
}

// fence checks that the file at the check's path is still in the state it
// was hashed in: then no write and no replacement happened since, and
// whatever was read in between was the keyed content. A state that cannot
// vouch (racily clean when hashed) is backed by hashing the file again.
func (c *inputCheck) fence() error {
	kf := c.kf
	st, err := statFile(kf.path)
	if err != nil {
		return &InputChangedError{Path: kf.path, Why: "it cannot be read now: " + err.Error()}
	}
	if st != kf.state {
		return &InputChangedError{Path: kf.path, Why: "it was modified or replaced since (" + stateChange(kf.state, st) + ")"}
	}
	if kf.trusted {
		return nil
	}
	sum, _, err := hashFile(kf.path)
	if err != nil {
		return &InputChangedError{Path: kf.path, Why: "it cannot be read now: " + err.Error()}
	}
	if after, err := statFile(kf.path); err != nil || after != st {
		return &InputChangedError{Path: kf.path, Why: "it is being modified"}
	}
	if sum != kf.sha {
		return &InputChangedError{Path: kf.path, Why: fmt.Sprintf("its digest is %s now, the key holds %s", ShortKey(sum), ShortKey(kf.sha))}
	}
	return nil
}

// stateChange says how two states of a file differ, for messages.
func stateChange(was, now fileState) string {
	switch {
	case was.Ino != now.Ino || was.Dev != now.Dev:
		return "another file is in its place"
	case was.Size != now.Size:
		return fmt.Sprintf("%d bytes then, %d now", was.Size, now.Size)
	case was.MtimeNs != now.MtimeNs:
		return "its modification time changed"
	}
	return "its status change time moved: it was written or its metadata changed"
}

// verifyInputs is the engine's check before it commits a stage's entry:
// every keyed file was read as the key says, or (with unread) has not
// changed since it was hashed.
func (t *Task) verifyInputs(unread bool) error {
	var errs []error
	for _, kf := range t.keyed {
		c := t.inputs[kf.path]
		c.mu.Lock()
		var left []*File
		for f := range c.open {
			left = append(left, f)
		}
		c.mu.Unlock()
		for _, f := range left {
			f.Close() // a file the stage did not close is checked now
		}
		c.mu.Lock()
		failed, settled, opened := c.failed, c.settled, c.opened
		c.mu.Unlock()
		switch {
		case failed != nil:
			errs = append(errs, failed)
		case settled || opened > 0 || !unread:
		default:
			if err := c.fence(); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// A File is an input file opened by Task.Open.
type File struct {
	f     *os.File
	check *inputCheck // nil: not a keyed file

	st0    fileState // of the descriptor when opened
	h      hash.Hash // of the bytes read in order from the start
	hashed int64
	seq    bool // every read so far continued the last from offset 0
	done   bool
	closed bool
	err    error
}

// Read reads like os.File.Read; at the end of a keyed file whose content
// is not the keyed one it returns an *InputChangedError instead of io.EOF.
func (f *File) Read(p []byte) (int, error) {
	n, err := f.f.Read(p)
	if f.check == nil || f.done {
		return n, err
	}
	if f.seq {
		f.h.Write(p[:n])
		f.hashed += int64(n)
	}
	if err == io.EOF && f.seq {
		if verr := f.finishSequential(); verr != nil {
			return n, verr
		}
	}
	return n, err
}

// ReadAt reads like os.File.ReadAt; the file is then checked on Close.
func (f *File) ReadAt(p []byte, off int64) (int, error) {
	if f.check != nil && !f.done {
		f.seq = false
	}
	return f.f.ReadAt(p, off)
}

// Seek seeks like os.File.Seek.
func (f *File) Seek(offset int64, whence int) (int64, error) {
	pos, err := f.f.Seek(offset, whence)
	if f.check != nil && !f.done && pos != f.hashed {
		f.seq = false
	}
	return pos, err
}

// Stat returns the file's information.
func (f *File) Stat() (fs.FileInfo, error) { return f.f.Stat() }

// Name is the path the file was opened with.
func (f *File) Name() string { return f.f.Name() }

// Close closes the file and, for a keyed file not read to its end in
// order, checks it (see Task.Open).
func (f *File) Close() error {
	if f.closed {
		return f.err
	}
	f.closed = true
	if f.check != nil && !f.done {
		f.err = f.finishOnClose()
	}
	cerr := f.f.Close()
	if f.check != nil {
		c := f.check
		c.mu.Lock()
		delete(c.open, f)
		if f.err == nil {
			c.verified++
		}
		c.mu.Unlock()
		if f.err != nil {
			c.fail(f.err)
		}
	}
	if f.err != nil {
		return f.err
	}
	return cerr
}

// finishSequential compares the digest of a file read in order to its end.
func (f *File) finishSequential() error {
	f.done = true
	kf := f.check.kf
	sum := hex.EncodeToString(f.h.Sum(nil))
	if sum == kf.sha {
		return nil
	}
	f.err = &InputChangedError{Path: kf.path, Why: fmt.Sprintf("what was read has digest %s, the key holds %s", ShortKey(sum), ShortKey(kf.sha))}
	f.check.fail(f.err)
	return f.err
}

// finishOnClose checks a keyed file that was not read to its end in order.
func (f *File) finishOnClose() error {
	f.done = true
	kf := f.check.kf
	fi, err := f.f.Stat()
	if err != nil {
		return &InputChangedError{Path: kf.path, Why: err.Error()}
	}
	st1 := stateOf(fi)
	if st1 != f.st0 {
		return &InputChangedError{Path: kf.path, Why: "it was modified while being read (" + stateChange(f.st0, st1) + ")"}
	}
	if kf.trusted && f.st0 == kf.state {
		return nil // the very file that was hashed, not written since
	}
	// Another file, or one whose state cannot vouch for it: hash it
	// through the descriptor that was read (the rest of it, when it was
	// read in order so far).
	h, from := f.h, f.hashed
	if !f.seq {
		h, from = sha256.New(), 0
	}
	if _, err := io.Copy(h, io.NewSectionReader(f.f, from, st1.Size-from)); err != nil {
		return &InputChangedError{Path: kf.path, Why: "it cannot be read again: " + err.Error()}
	}
	if fi, err := f.f.Stat(); err != nil || stateOf(fi) != f.st0 {
		return &InputChangedError{Path: kf.path, Why: "it was modified while being read"}
	}
	if sum := hex.EncodeToString(h.Sum(nil)); sum != kf.sha {
		return &InputChangedError{Path: kf.path, Why: fmt.Sprintf("its content has digest %s, the key holds %s", ShortKey(sum), ShortKey(kf.sha))}
	}
	return nil
}
