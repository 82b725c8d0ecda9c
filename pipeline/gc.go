package pipeline

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"gemmaft/internal/dirsum"
)

// GCOptions say which entries gc keeps.
type GCOptions struct {
	// KeepLast protects the entries used by each DAG's last N runs.
	KeepLast int
	// OlderThan, when positive, removes only entries unused for at least
	// this long.
	OlderThan time.Duration
	// DryRun only says what would go; it waits for no run.
	DryRun bool
	// NoWait makes GC fail busy (IsBusy) instead of waiting for the runs
	// using the cache.
	NoWait bool
	// Log, when set, hears that gc waits for running DAGs.
	Log *slog.Logger
}

// GCResult lists what gc removed (or would remove, in a dry run).
type GCResult struct {
	Removed []string
	// RemovedWhat says, of each of Removed, which stage made the entry
	// and when ("stage tokens (tokenize), computed 2026-11-02 03:10"),
	// "" where its manifest did not say.
	RemovedWhat []string
	Freed       int64
	Kept        int
	// RunsActive says, of a dry run, that runs used the cache as it
	// looked: the entries made since the last recorded run are then kept,
	// as gc, which waits for the runs, would keep them.
	RunsActive bool
	// Leftovers is what killed runs left: unfinished outputs in tmp/ and
	// trainings' checkpoints untouched for a week; LeftoverBytes their size.
	Leftovers     []string
	LeftoverBytes int64
}

// GC removes cache entries no recent run uses. It waits until no run holds
// the cache, and runs that start while it removes wait for it, so no entry
// disappears under a run. A dry run takes the runs' shared hold instead: it
// removes nothing.
func (s *Store) GC(ctx context.Context, opts GCOptions) (*GCResult, error) {
	lock := s.gcLock()
	take, wait := lock.TryLock, lock.TryLockContext
	runsActive := false
	if opts.DryRun {
		take, wait = lock.TryRLock, lock.TryRLockContext
		if ok, err := lock.TryLock(); err == nil {
			runsActive = !ok
			if ok {
				lock.Unlock()
			}
		}
	}
	if ok, err := take(); err != nil {
		return nil, err
	} else if !ok {
		if opts.NoWait {
			return nil, fmt.Errorf("%s: %w", s.Root, errCacheInUse)
		}
		if opts.Log != nil {
			opts.Log.Info("waiting for the runs using this cache to finish", "cache", s.Root)
		}
		if _, err := wait(ctx, 100*time.Millisecond); err != nil {
			return nil, fmt.Errorf("waiting for the runs using cache %s: %w", s.Root, err)
		}
	}
	defer lock.Unlock()

	protected := map[string]bool{}
	cutoff := time.Now().Add(-opts.OlderThan)
	var lastRecorded time.Time // the newest end of a recorded run
	dags, _ := os.ReadDir(filepath.Join(s.Root, "runs"))
	for _, d := range dags {
		// Each record read once, newest first.
		var recs []*RunRecord
		files := s.runRecords(d.Name())
		for i := len(files) - 1; i >= 0; i-- {
			if r := readRunRecord(files[i]); r != nil {
				recs = append(recs, r)
			}
		}
		if len(recs) > 0 && recs[0].Finished.After(lastRecorded) {
			lastRecorded = recs[0].Finished
		}
		// A spec renamed or deleted is run no more: with --older-than, its
		// runs stop keeping entries once the last is that old, or they
		// would keep them for ever.
		if opts.OlderThan > 0 && len(recs) > 0 && recs[0].Finished.Before(cutoff) && specGone(recs[0].Spec) {
			if opts.Log != nil {
				opts.Log.Info("the spec of these runs is gone: they keep no entries", "spec", recs[0].Spec, "last run", LocalTime(recs[0].Finished))
			}
			continue
		}
		kept := recs[:min(opts.KeepLast, len(recs))]
		// Stages a kept run made no entry for: left out (--until), failed,
		// or canceled by a failure before them.
		noEntry := map[string]bool{}
		for _, r := range kept {
			for _, st := range r.Stages {
				if st.Key != "" {
					protected[st.Key] = true
				}
				if !st.hasEntry() {
					noEntry[st.Name] = true
				}
			}
		}
		// Such a stage keeps the entry it last had: the newest any run
		// recorded for it (nightly preprocessing must not cost the weekly
		// training its adapter, nor three failed nights the last good one).
		for _, r := range recs {
			if len(noEntry) == 0 {
				break
			}
			for _, st := range r.Stages {
				if noEntry[st.Name] && st.hasEntry() {
					protected[st.Key] = true
					delete(noEntry, st.Name)
				}
			}
		}
	}
	if opts.KeepLast > 0 {
		for _, k := range s.killedRunsKeys() {
			protected[k] = true
		}
	}
	keys, err := s.Keys()
	if err != nil {
		return nil, err
	}
	res := &GCResult{RunsActive: runsActive}
	for _, k := range keys {
		fi, err := os.Stat(s.EntryDir(k))
		if err != nil {
			continue
		}
		// A dry run beside runs keeps what they made since the last
		// record, as gc, which waits for them, would keep it.
		inUse := runsActive && fi.ModTime().After(lastRecorded)
		if protected[k] || inUse || (opts.OlderThan > 0 && fi.ModTime().After(cutoff)) {
			res.Kept++
			continue
		}
		size := dirSize(s.EntryDir(k))
		what := ""
		if m, err := ReadManifest(s.EntryDir(k)); err == nil {
			what = fmt.Sprintf("stage %s (%s), computed %s", m.Stage, m.Kind, m.Finished.Local().Format("2006-01-02 15:04"))
		}
		if !opts.DryRun {
			if err := s.Remove(k); err != nil {
				return res, fmt.Errorf("removing %s: %w", ShortKey(k), err)
			}
		}
		res.Removed, res.RemovedWhat = append(res.Removed, k), append(res.RemovedWhat, what)
		res.Freed += size
	}
	if !runsActive { // beside runs, tmp/ holds their outputs in progress
		res.Leftovers = s.leftovers()
		for _, p := range res.Leftovers {
			res.LeftoverBytes += dirSize(p)
		}
	}
	if !opts.DryRun {
		for _, p := range res.Leftovers {
			os.RemoveAll(p)
		}
		s.removeStaleLocks()
		if err := s.stats.Save(); err != nil {
			return res, err
		}
	}
	return res, nil
}

// specGone says whether the spec file at path no longer exists while its
// folder does: a spec on a file system not mounted here, or on another
// machine sharing the cache, is not gone.
func specGone(path string) bool {
	if _, err := os.Stat(filepath.Dir(path)); err != nil {
		return false
	}
	_, err := os.Stat(path)
	return errors.Is(err, fs.ErrNotExist)
}

// scratchWeek is how long a training's checkpoints (scratch/KEY) stay
// after they last changed: a training resumed night after night keeps them
// however long ago it began; one whose spec changed goes a week later.
const scratchWeek = 7 * 24 * time.Hour

// leftovers lists what killed runs left: every folder in tmp/ (gc holds
// the store's exclusive lock, so no writer is alive) and each scratch
// folder in which nothing changed for scratchWeek.
func (s *Store) leftovers() []string {
	var out []string
	scratch, _ := os.ReadDir(filepath.Join(s.Root, "scratch"))
	for _, e := range scratch {
		p := filepath.Join(s.Root, "scratch", e.Name())
		if time.Since(lastChange(p)) > scratchWeek {
			out = append(out, p)
		}
	}
	ents, _ := os.ReadDir(filepath.Join(s.Root, "tmp"))
	for _, e := range ents {
		out = append(out, filepath.Join(s.Root, "tmp", e.Name()))
	}
	return out
}

// lastChange is the newest modification time of anything under dir; now
// when some of it cannot be read (so that it is kept).
func lastChange(dir string) time.Time {
	var newest time.Time
	filepath.Walk(dir, func(_ string, fi os.FileInfo, err error) error {
		switch {
		case err != nil:
			newest = time.Now()
			return filepath.SkipAll
		case fi.ModTime().After(newest):
			newest = fi.ModTime()
		}
		return nil
	})
	return newest
}

// removeStaleLocks deletes the lock files of entries (gc holds the store's
// exclusive lock, so nobody holds them).
func (s *Store) removeStaleLocks() {
	locks, _ := os.ReadDir(filepath.Join(s.Root, "locks"))
	for _, l := range locks {
		if strings.HasSuffix(l.Name(), ".lock") && len(l.Name()) == 64+len(".lock") {
			os.Remove(filepath.Join(s.Root, "locks", l.Name()))
		}
	}
}

func dirSize(dir string) int64 {
	var n int64
	filepath.Walk(dir, func(_ string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() {
			n += fi.Size()
		}
		return nil
	})
	return n
}

// Damage is an entry that failed verification, or a folder of resumable
// state (a training checkpoint) in the scratch area of Key.
type Damage struct {
	Key     string
	Scratch string // the damaged folder under scratch/, for resumable state
	Err     error
}

// Verify re-hashes every output of the given entries (all when keys is
// nil) and returns the damaged ones. Entries being written are not in
// entries/ yet, so a concurrent run does not disturb it.
func (s *Store) Verify(keys []string) ([]Damage, int, error) {
	if keys == nil {
		var err error
		if keys, err = s.Keys(); err != nil {
			return nil, 0, err
		}
	}
	var bad []Damage
	checked := 0
	for _, k := range keys {
		state, _, err := s.Check(k, true)
		switch state {
		case Missing:
			continue
		case Damaged:
			bad = append(bad, Damage{Key: k, Err: err})
		}
		checked++
	}
	return bad, checked, nil
}

// VerifyScratch checks the resumable state of the given keys (all when keys
// is nil): every folder under scratch/<key>/ holding a SHA256SUMS file
// (training checkpoints write one) is re-hashed. Folders being written
// (hidden) and folders already set aside are skipped; a folder that
// disappears meanwhile (a running trainer replaced it) is no damage.
func (s *Store) VerifyScratch(keys []string) ([]Damage, int) {
	root := filepath.Join(s.Root, "scratch")
	if keys == nil {
		ents, _ := os.ReadDir(root)
		for _, e := range ents {
			if e.IsDir() {
				keys = append(keys, e.Name())
			}
		}
	}
	var bad []Damage
	checked := 0
	for _, k := range keys {
		filepath.WalkDir(filepath.Join(root, k), func(path string, d fs.DirEntry, err error) error {
			if err != nil || !d.IsDir() {
				return nil
			}
			if strings.HasPrefix(d.Name(), ".") || dirsum.IsSetAside(path) {
				return filepath.SkipDir
			}
			if _, err := os.Stat(filepath.Join(path, dirsum.File)); err != nil {
				return nil
			}
			err = dirsum.Verify(path)
			if _, gone := os.Stat(path); gone != nil {
				return filepath.SkipDir
			}
			checked++
			if err != nil {
				bad = append(bad, Damage{Key: k, Scratch: path, Err: err})
			}
			return filepath.SkipDir
		})
	}
	return bad, checked
}
