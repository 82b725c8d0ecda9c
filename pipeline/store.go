package pipeline

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/gofrs/flock"

	"gemmaft/internal/atomicfile"
	"gemmaft/internal/diskfull"
	"gemmaft/internal/userdir"
)

// A Store is the content-addressed cache: one folder per stage output,
// named by its key, that appears only complete.
//
// Layout under Root:
//
//	entries/ab/abcdef…/   manifest.json and the output files of key abcdef…
//	tmp/                  entries being written (renamed into entries/ when done)
//	locks/                per-entry and per-DAG lock files (flock; released by the OS if a process dies)
//	scratch/<key>/        resumable state of an interrupted stage (e.g. training checkpoints)
//	runs/<dag-id>/        one record per run of a DAG: the keys it used, for plan's reasons and gc
//	statcache.json        file digests by path and stat state
type Store struct {
	Root  string
	stats *statCache
}

// CacheEnv is the environment variable that names the cache folder.
const CacheEnv = "PIPELINE_CACHE"

// CacheRoot picks the cache folder: flag (a --cache option; "" when not
// given), then $PIPELINE_CACHE, then the spec's `cache:` (dag may be nil),
// then pipeline/ in the user's cache folder (~/.cache/pipeline on Linux).
// It fails only when none is given and the user has no home folder: a
// cache in a temporary folder would vanish, and commands run by hand would
// not find it.
func CacheRoot(flag string, dag *DAG) (string, error) {
	// A ~ reaches here unexpanded from --cache=~/x and from crontab
	// variables; an unknown ~user is left for OpenStore to report.
	switch {
	case flag != "":
		p, _ := ExpandHome(flag)
		return p, nil
	case os.Getenv(CacheEnv) != "":
		p, _ := ExpandHome(os.Getenv(CacheEnv))
		return p, nil
	case dag != nil && dag.Cache != "":
		return dag.Cache, nil
	}
	d, err := userdir.Cache()
	if err != nil {
		return "", fmt.Errorf("no cache folder: %w; give --cache, $%s or the spec's cache:", err, CacheEnv)
	}
	return filepath.Join(d, "pipeline"), nil
}

// OpenStore opens (creating if needed) the store at root.
func OpenStore(root string) (*Store, error) {
	root, err := filepath.Abs(root)
	if err != nil {
		return nil, err
	}
	for _, d := range []string{"entries", "tmp", "locks", "runs"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			return nil, fmt.Errorf("cache %s: %w", root, err)
		}
	}
	return &Store{Root: root, stats: openStatCache(filepath.Join(root, "statcache.json"))}, nil
}

// OpenExistingStore opens the store at root without creating it: for
// commands that only look at a cache (verify, gc), where a mistyped path
// must not become a new, empty cache. A missing folder, or one that is
// not a cache, is an error.
func OpenExistingStore(root string) (*Store, error) {
	abs, err := filepath.Abs(root)
	if err != nil {
		return nil, err
	}
	fi, err := os.Stat(abs)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil, fmt.Errorf("cache %s does not exist: check --cache, $%s or the spec's cache: (nothing has run with it yet?)", abs, CacheEnv)
	case err != nil:
		return nil, fmt.Errorf("cache %s: %w", abs, err)
	case !fi.IsDir():
		return nil, fmt.Errorf("cache %s is a file, not a cache folder", abs)
	}
	if fi, err := os.Stat(filepath.Join(abs, "entries")); err != nil || !fi.IsDir() {
		return nil, fmt.Errorf("%s is not a pipeline cache (it has no entries/ folder): check --cache, $%s or the spec's cache:", abs, CacheEnv)
	}
	return OpenStore(abs)
}

// LookAtStore opens the store at root for a command that only looks at it
// (plan, status, report): an existing cache as OpenExistingStore opens it;
// a missing or empty folder (a volume mounted for a cache nothing has used
// yet) as an empty store that creates and saves nothing, so that looking
// through a mistyped --cache leaves no new cache behind. exists says which.
func LookAtStore(root string) (st *Store, exists bool, err error) {
	abs, err := filepath.Abs(root)
	if err != nil {
		return nil, false, err
	}
	if des, err := os.ReadDir(abs); errors.Is(err, fs.ErrNotExist) || err == nil && len(des) == 0 {
		return &Store{Root: abs, stats: openStatCache("")}, false, nil
	}
	st, err = OpenExistingStore(abs)
	return st, err == nil, err
}

// Close saves what the store learned about file digests.
func (s *Store) Close() error { return s.stats.Save() }

// FileDigest is the SHA-256 digest of the file at path, through the
// store's record of file states (see Task.FileDigest): a checkpoint
// unchanged since it was last hashed is not read again. Close keeps what
// it learned.
func (s *Store) FileDigest(path string) (string, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return "", err
	}
	sum, _, err := s.stats.Digest(abs)
	return sum, err
}

// scratchDir is the resumable-state folder of key's stage.
func (s *Store) scratchDir(key string) string {
	return filepath.Join(s.Root, "scratch", key)
}

// EntryDir is where the entry of key lives once committed.
func (s *Store) EntryDir(key string) string {
	return filepath.Join(s.Root, "entries", key[:2], key)
}

// HashedBytes is how many bytes this process read to compute digests.
func (s *Store) HashedBytes() int64 { return s.stats.hashedBytes.Load() }

// A Manifest describes one entry: what made it and what it holds.
type Manifest struct {
	Key          string          `json:"key"`
	Stage        string          `json:"stage"`
	Kind         string          `json:"kind"`
	KindVersion  int             `json:"kind_version"`
	KindRevision int             `json:"kind_revision,omitempty"`
	Params       json.RawMessage `json:"params"`
	Inputs       []InputRef      `json:"inputs"`
	Files        []FileRef       `json:"files"`
	Refs         []Ref           `json:"refs,omitempty"`
	Outputs      []FileRef       `json:"outputs"`
	Rows         int64           `json:"rows"`
	Stats        map[string]any  `json:"stats,omitempty"`
	Started      time.Time       `json:"started"`
	Finished     time.Time       `json:"finished"`
	Seconds      float64         `json:"seconds"`
	Program      string          `json:"program"`
	// Checksum is the sha256 of this manifest's compact JSON with Checksum
	// empty, so an edited or torn manifest is caught like any output file.
	Checksum string `json:"checksum"`
}

// WaitSecondsStat is the statistic of a computed entry's manifest holding
// the part of its Seconds spent waiting for inputs other stages of the run
// computed (absent when it waited for none): the stage's own time is the
// difference.
const WaitSecondsStat = "wait_seconds"

// WaitSeconds is m's WaitSecondsStat, 0 when it has none.
func (m *Manifest) WaitSeconds() float64 {
	switch v := m.Stats[WaitSecondsStat].(type) {
	case float64:
		return v
	case json.Number: // as ReadManifest decodes numbers
		f, _ := v.Float64()
		return f
	}
	return 0
}

// InputRef names an upstream stage and the key of its output.
type InputRef struct {
	Stage string `json:"stage"`
	Key   string `json:"key"`
}

// FileRef is a file with its size and digest. For inputs Path is as the
// stage resolved it; for outputs it is relative to the entry.
type FileRef struct {
	Path   string `json:"path"`
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256"`
}

const manifestName = "manifest.json"

// IsEntryFile says whether name, at the top of an entry, is the cache's own
// record rather than what the stage wrote (an export leaves it out).
func IsEntryFile(name string) bool { return name == manifestName }

func (m *Manifest) checksum() (string, error) {
	c := *m
	c.Checksum = ""
	data, err := json.Marshal(&c)
	if err != nil {
		return "", err
	}
	// A name that is not UTF-8 (a file saved under a legacy code page) is
	// written with its bad bytes as the escape \ufffd, and reads back as
	// U+FFFD, which encodes raw: both sides sum the raw form.
	data = bytes.ReplaceAll(data, []byte(`\ufffd`), []byte("\ufffd"))
	sum := sha256.Sum256(data)
	return hex.EncodeToString(sum[:]), nil
}

func (m *Manifest) encode() ([]byte, error) {
	sum, err := m.checksum()
	if err != nil {
		return nil, err
	}
	m.Checksum = sum
	return json.MarshalIndent(m, "", "  ")
}

// ReadManifest reads and checks the manifest of the entry in dir.
func ReadManifest(dir string) (*Manifest, error) {
	data, err := os.ReadFile(filepath.Join(dir, manifestName))
	if err != nil {
		return nil, err
	}
	m := &Manifest{}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	if err := dec.Decode(m); err != nil {
		return nil, fmt.Errorf("manifest is not valid JSON: %w", err)
	}
	// Numbers were kept as json.Number so re-encoding is byte-stable.
	want, err := m.checksum()
	if err != nil {
		return nil, err
	}
	if want != m.Checksum {
		return nil, errors.New("manifest checksum mismatch (edited or torn)")
	}
	return m, nil
}

// EntryState is what a check of an entry found.
type EntryState int

const (
	Missing EntryState = iota
	Valid
	Damaged
)

// Check looks at the entry of key. With deep, every output is re-hashed;
// otherwise a file whose stat state is unchanged since it was hashed is
// trusted. A Damaged result comes with the reason.
func (s *Store) Check(key string, deep bool) (EntryState, *Manifest, error) {
	dir := s.EntryDir(key)
	if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
		return Missing, nil, nil
	}
	m, err := ReadManifest(dir)
	if err != nil {
		return Damaged, nil, err
	}
	if m.Key != key {
		return Damaged, m, fmt.Errorf("manifest is for key %s", ShortKey(m.Key))
	}
	for _, o := range m.Outputs {
		p := filepath.Join(dir, filepath.FromSlash(o.Path))
		st, err := statFile(p)
		if err != nil {
			var pe *fs.PathError
			if errors.As(err, &pe) {
				err = pe.Err // the output's name says where
			}
			return Damaged, m, fmt.Errorf("output %s: %w", o.Path, err)
		}
		if st.Size != o.Size {
			return Damaged, m, fmt.Errorf("output %s has %d bytes, manifest says %d", o.Path, st.Size, o.Size)
		}
		var sum string
		if deep {
			sum, _, err = hashFile(p)
		} else {
			sum, _, err = s.stats.Digest(p)
		}
		if err != nil {
			return Damaged, m, err
		}
		if sum != o.SHA256 {
			return Damaged, m, fmt.Errorf("output %s does not match its digest (edited or corrupted)", o.Path)
		}
	}
	return Valid, m, nil
}

// touch marks an entry as used now, for gc --older-than.
func (s *Store) touch(key string) {
	now := time.Now()
	_ = os.Chtimes(s.EntryDir(key), now, now)
}

// Remove deletes the entry of key.
func (s *Store) Remove(key string) error {
	dir := s.EntryDir(key)
	// Rename first so that a half-deleted entry never looks like an entry.
	trash := filepath.Join(s.Root, "tmp", "rm-"+key+"-"+fmt.Sprint(time.Now().UnixNano()))
	if err := os.Rename(dir, trash); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return err
	}
	s.stats.Forget(dir)
	return os.RemoveAll(trash)
}

// Keys lists the keys of all entries in the store.
func (s *Store) Keys() ([]string, error) {
	var keys []string
	shards, err := os.ReadDir(filepath.Join(s.Root, "entries"))
	if err != nil {
		return nil, err
	}
	for _, sh := range shards {
		ents, err := os.ReadDir(filepath.Join(s.Root, "entries", sh.Name()))
		if err != nil {
			continue
		}
		for _, e := range ents {
			if e.IsDir() && strings.HasPrefix(e.Name(), sh.Name()) {
				keys = append(keys, e.Name())
			}
		}
	}
	sort.Strings(keys)
	return keys, nil
}

// A pending entry is being written in tmp/ by the process holding its lock.
type pending struct {
	store *Store
	key   string
	dir   string
}

// begin creates the temporary folder for key's entry. With locked, the
// caller holds the entry's lock, so leftovers of a crashed writer of the
// same key are stale and go; a follower of a collective stage, which holds
// no lock, leaves the writer's folder alone.
func (s *Store) begin(key string, locked bool) (*pending, error) {
	if locked {
		stale, _ := filepath.Glob(filepath.Join(s.Root, "tmp", key+"-*"))
		for _, d := range stale {
			os.RemoveAll(d)
		}
	}
	dir, err := os.MkdirTemp(filepath.Join(s.Root, "tmp"), key+"-")
	if err != nil {
		return nil, fmt.Errorf("%w%s", err, s.permissionHint(err))
	}
	// Entries are readable like the files in them (MkdirTemp makes 0700).
	if err := os.Chmod(dir, 0o755); err != nil {
		return nil, err
	}
	return &pending{store: s, key: key, dir: dir}, nil
}

// commit fsyncs every file of the pending entry, writes its manifest and
// renames the folder into place: the entry appears whole or not at all.
// known holds digests already computed while writing.
func (p *pending) commit(m *Manifest, known map[string]string) error {
	m.Outputs = m.Outputs[:0]
	err := filepath.WalkDir(p.dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			return nil
		}
		if !d.Type().IsRegular() {
			return fmt.Errorf("output %s is not a regular file", path)
		}
		rel, _ := filepath.Rel(p.dir, path)
		rel = filepath.ToSlash(rel)
		if rel == manifestName {
			return fmt.Errorf("a stage may not write %s itself", manifestName)
		}
		f, err := os.Open(path)
		if err != nil {
			return err
		}
		err = f.Sync()
		f.Close()
		if err != nil {
			return err
		}
		sum, ok := known[rel]
		var size int64
		if ok {
			fi, err := os.Stat(path)
			if err != nil {
				return err
			}
			size = fi.Size()
		} else if sum, size, err = hashFile(path); err != nil {
			return err
		}
		m.Outputs = append(m.Outputs, FileRef{Path: rel, Size: size, SHA256: sum})
		return nil
	})
	if err != nil {
		return err
	}
	data, err := m.encode()
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(p.dir, manifestName), data, 0o644); err != nil {
		return err
	}
	for _, d := range dirsUnder(p.dir) {
		if err := atomicfile.SyncDir(d); err != nil {
			return err
		}
	}
	final := p.store.EntryDir(p.key)
	if err := os.MkdirAll(filepath.Dir(final), 0o755); err != nil {
		return err
	}
	// An entry of the same key may sit there (damaged, or replaced by
	// --force); we hold the lock. Swap the two in one step where the file
	// system can, so that a concurrent reader (another DAG sharing the
	// stage, inspect, export) never finds the entry missing.
	replaced := false
	if _, err := os.Stat(final); err == nil {
		swapped, err := exchangeDirs(p.dir, final)
		if err != nil {
			return err
		}
		if swapped {
			replaced = true
			p.store.stats.Forget(final)
			os.RemoveAll(p.dir) // the old entry now
		} else if err := p.store.Remove(p.key); err != nil {
			return err
		}
	}
	if !replaced {
		if err := os.Rename(p.dir, final); err != nil {
			return err
		}
	}
	if err := atomicfile.SyncDir(filepath.Dir(final)); err != nil {
		return err
	}
	for _, o := range m.Outputs {
		p.store.stats.Remember(filepath.Join(final, filepath.FromSlash(o.Path)), o.SHA256)
	}
	return nil
}

// abort removes the pending entry.
func (p *pending) abort() { os.RemoveAll(p.dir) }

func dirsUnder(root string) []string {
	var out []string
	filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			out = append(out, path)
		}
		return nil
	})
	return out
}

// EntryBusy says whether another process holds the lock of key's entry
// now: a run computes it. It creates no lock file.
func (s *Store) EntryBusy(key string) bool {
	path := filepath.Join(s.Root, "locks", key+".lock")
	if _, err := os.Stat(path); err != nil {
		return false
	}
	l := flock.New(path)
	ok, err := l.TryLock()
	if err != nil {
		return false
	}
	if ok {
		l.Unlock()
	}
	return !ok
}

// ComputingElsewhere is the reason of a stage whose entry another run is
// computing now.
const ComputingElsewhere = "another run is computing it now"

// lockEntry takes the exclusive lock of key's entry, waiting while another
// process holds it, or failing busy if noWait.
func (s *Store) lockEntry(ctx context.Context, key, stage string, noWait bool, log *slog.Logger) (*flock.Flock, error) {
	l := flock.New(filepath.Join(s.Root, "locks", key+".lock"))
	ok, err := l.TryLock()
	if err == nil && !ok && noWait {
		return nil, fmt.Errorf("stage %s: %w", stage, errEntryBusy)
	}
	if err == nil && !ok {
		// Another run (of another spec, or of this one by another path)
		// computes the same entry: say so, or a wait of hours is silent.
		log.Info("waiting for another run computing this stage's entry", "stage", stage, "entry", ShortKey(key))
		_, err = l.TryLockContext(ctx, 50*time.Millisecond)
		if err != nil && ctx.Err() != nil {
			err = context.Cause(ctx) // "interrupted by SIGTERM"
		}
	}
	if err != nil {
		return nil, fmt.Errorf("stage %s: locking cache entry %s: %w%s", stage, ShortKey(key), err, s.permissionHint(err))
	}
	return l, nil
}

// permissionHint says, of an error opening a lock in the cache, what to do
// when this user may not write there: most often the cache is another
// user's (a cron job's).
func (s *Store) permissionHint(err error) string {
	if !errors.Is(err, fs.ErrPermission) {
		return ""
	}
	return fmt.Sprintf(" (this user may not write in the cache %s, another user's most likely: run as its owner, or give this one a cache of its own with --cache or $%s)", s.Root, CacheEnv)
}

// spaceHint says, of an error that ran out of disk space, what to do: a
// nightly run fills the cache's disk over the weeks unless gc runs.
func (s *Store) spaceHint(err error) string {
	if !diskfull.Is(err) {
		return ""
	}
	return fmt.Sprintf(" (the disk of the cache %s is full: `pipeline gc --dry-run` says what gc would remove, the entries no recent run used and the leftovers of killed runs; or give the run a cache on a larger disk with --cache)", s.Root)
}

// gcLock is held shared by every run and exclusively by gc, so gc never
// deletes an entry a run is about to read.
func (s *Store) gcLock() *flock.Flock {
	return flock.New(filepath.Join(s.Root, "locks", "gc.lock"))
}

// ShortKey is the first 12 hex digits of a key or digest, as shown to people.
func ShortKey(key string) string {
	if len(key) > 12 {
		return key[:12]
	}
	return key
}
