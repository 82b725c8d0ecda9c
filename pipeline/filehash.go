package pipeline

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gofrs/flock"

	"gemmaft/internal/atomicfile"
)

// fileState is what stat says about a file. Two equal states of one path
// mean the content did not change: any write moves ctime, which (unlike
// mtime) no user can set back.
type fileState struct {
	Size    int64  `json:"size"`
	MtimeNs int64  `json:"mtime_ns"`
	CtimeNs int64  `json:"ctime_ns"`
	Ino     uint64 `json:"ino"`
	Dev     uint64 `json:"dev"`
}

func statFile(path string) (fileState, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return fileState{}, err
	}
	if !fi.Mode().IsRegular() {
		return fileState{}, fmt.Errorf("%s is not a regular file", path)
	}
	return stateOf(fi), nil
}

// racyWindow: a file changed this recently may change again within the same
// timestamp tick without its state changing, so its digest is not trusted
// from stat alone (git calls these entries racily clean). coarseRacyWindow
// is the window where the file system stamps whole seconds (ext3, HFS+,
// some NFS servers) or two (FAT): a write in the same second as the
// hashing leaves every field of the state as it was.
const (
	racyWindow       = 50 * time.Millisecond
	coarseRacyWindow = 2 * time.Second
)

func (s fileState) racy(now time.Time) bool {
	window := racyWindow
	if s.MtimeNs%int64(time.Second) == 0 && s.CtimeNs%int64(time.Second) == 0 {
		window = coarseRacyWindow
	}
	limit := now.Add(-window).UnixNano()
	return s.MtimeNs >= limit || s.CtimeNs >= limit
}

type statEntry struct {
	fileState
	SHA256 string `json:"sha256"`
}

// A statCache remembers the digest of each file together with the state it
// had when hashed, so that unchanged big files (datasets, weights, cached
// outputs) are not read again on every run. It is shared by all processes
// using one store and saved by merging, so concurrent runs lose nothing
// worse than a re-hash.
type statCache struct {
	file string

	mu      sync.Mutex
	entries map[string]statEntry
	changed map[string]statEntry

	hashedFiles atomic.Int64 // files read to hash them, for reports and tests
	hashedBytes atomic.Int64
}

// openStatCache reads the stat cache kept in file; "" keeps it in memory.
func openStatCache(file string) *statCache {
	c := &statCache{file: file, entries: map[string]statEntry{}, changed: map[string]statEntry{}}
	if data, err := os.ReadFile(file); err == nil {
		// A damaged cache only costs re-hashing; ignore it.
		_ = json.Unmarshal(data, &c.entries)
	}
	return c
}

// Digest returns the sha256 of the file at path (absolute), from the cache
// when the file's state is unchanged since it was hashed.
func (c *statCache) Digest(path string) (string, int64, error) {
	sum, st, _, err := c.digestState(path)
	return sum, st.Size, err
}

// digestState is Digest that also returns the state of the file the digest
// belongs to, and whether that state vouches for the content later on: a
// state that was racily clean when hashed does not, since a write in the
// same timestamp tick would leave it unchanged.
func (c *statCache) digestState(path string) (sum string, st fileState, trusted bool, err error) {
	st, err = statFile(path)
	if err != nil {
		return "", st, false, err
	}
	c.mu.Lock()
	e, ok := c.entries[path]
	c.mu.Unlock()
	if ok && e.fileState == st {
		return e.SHA256, st, true, nil
	}
	start := time.Now()
	sum, n, err := hashFile(path)
	if err != nil {
		return "", st, false, err
	}
	c.hashedFiles.Add(1)
	c.hashedBytes.Add(n)
	after, err := statFile(path)
	if err != nil {
		return "", st, false, err
	}
	if after != st || n != st.Size {
		return "", st, false, fmt.Errorf("%s changed while being read; try again once it is finished", path)
	}
	trusted = !st.racy(start)
	if trusted {
		c.put(path, statEntry{st, sum})
	}
	return sum, st, trusted, nil
}

// Check reports whether the file at path still has the digest want. It
// trusts a recorded state and re-hashes otherwise.
func (c *statCache) Check(path, want string) (bool, error) {
	got, _, err := c.Digest(path)
	if err != nil {
		return false, err
	}
	return got == want, nil
}

// Remember records the digest of a file this process just wrote and knows
// the digest of, so the next run need not re-hash it. The racy rule of
// Digest does not apply: the file was private to this process until its
// entry was renamed into place, so no other write can hide in its last
// timestamp tick.
func (c *statCache) Remember(path, sum string) {
	st, err := statFile(path)
	if err != nil {
		return
	}
	c.put(path, statEntry{st, sum})
}

// Forget drops paths under dir (a deleted entry).
func (c *statCache) Forget(dir string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	prefix := dir + string(filepath.Separator)
	for p := range c.entries {
		if len(p) > len(prefix) && p[:len(prefix)] == prefix {
			delete(c.entries, p)
			c.changed[p] = statEntry{} // a zero entry deletes on save
		}
	}
}

func (c *statCache) put(path string, e statEntry) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.entries[path] = e
	c.changed[path] = e
}

// Save merges this process's changes into the file on disk.
func (c *statCache) Save() error {
	c.mu.Lock()
	changed := c.changed
	c.changed = map[string]statEntry{}
	c.mu.Unlock()
	if len(changed) == 0 || c.file == "" { // "": a store that only looks
		return nil
	}
	lock := flock.New(c.file + ".lock")
	if err := lock.Lock(); err != nil {
		return err
	}
	defer lock.Unlock()
	merged := map[string]statEntry{}
	if data, err := os.ReadFile(c.file); err == nil {
		_ = json.Unmarshal(data, &merged)
	}
	for p, e := range changed {
		if e.SHA256 == "" {
			delete(merged, p)
		} else {
			merged[p] = e
		}
	}
	// Drop entries of files that are gone, so the cache does not grow forever.
	for p := range merged {
		if _, err := os.Lstat(p); errors.Is(err, fs.ErrNotExist) {
			delete(merged, p)
		}
	}
	data, err := json.Marshal(merged)
	if err != nil {
		return err
	}
	return atomicfile.WriteFile(c.file, data)
}

func hashFile(path string) (string, int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", 0, err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return "", 0, fmt.Errorf("reading %s: %w", path, err)
	}
	return hex.EncodeToString(h.Sum(nil)), n, nil
}
