package pipeline

import (
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
)

// A DAG's lock and run history. The store knows a DAG by dagID, a hash of the
// absolute path of its spec, and keeps for it:
//
//	locks/dag-<id>.lock     held (flock) by the run of the DAG in progress
//	locks/dag-<id>.holder   who holds it: "pid 123 on host since …"
//	locks/dag-<id>.keys     that run as planned (a RunRecord whose stages have
//	                        not run), which gc and the next run read should
//	                        the run be killed
//	runs/<id>/*.json        a RunRecord per run, newest last: the last 100,
//	                        and older ones that alone name a stage's last entry
//
// The lock makes overlapping runs of one spec (cron jobs) take turns; the
// records give plan its reasons, status the last run and gc the entries
// recent runs used.

// keepRecords is how many run records are kept per DAG.
const keepRecords = 100

// dagID names a DAG in the store by the absolute path of its spec, so the
// same file run from cron and by hand shares its lock and its history.
func dagID(dag *DAG) string {
	sum := sha256.Sum256([]byte(dag.Path))
	return hex.EncodeToString(sum[:8])
}

// ErrBusy is returned (wrapped in a *BusyError) when NoWait is set and
// another process is running the same DAG.
var ErrBusy = errors.New("another run of this DAG is in progress")

// BusyError says who holds a DAG's lock.
type BusyError struct {
	Spec   string
	Holder string // "pid 123 since 02:00:01", as the holder wrote it
}

func (e *BusyError) Error() string {
	msg := fmt.Sprintf("%s: %s", e.Spec, ErrBusy)
	if e.Holder != "" {
		msg += " (" + e.Holder + ")"
	}
	return msg
}

func (e *BusyError) Unwrap() error { return ErrBusy }

// IsBusy reports whether err means another run holds the DAG's lock.
func IsBusy(err error) bool {
	return errors.Is(err, ErrBusy) || errors.Is(err, errGCBusy) || errors.Is(err, errEntryBusy) || errors.Is(err, errCacheInUse)
}

// errGCBusy: gc holds the cache (with NoWait, the run does not wait).
var errGCBusy = errors.New("gc is cleaning this cache; run again once it is done")

// errCacheInUse: runs use the cache gc would clean (with NoWait, gc does
// not wait for them).
var errCacheInUse = errors.New("runs are using this cache; gc again once they are done")

// errEntryBusy: another run (of another spec sharing the stage) computes
// an entry this run needs (with NoWait, the run does not wait for it).
var errEntryBusy = errors.New("another run is computing this stage's entry; run again once it is done")

// dagLockBase is the path, less its extension, of dag's lock (".lock") and
// of the note naming its holder (".holder").
func (s *Store) dagLockBase(dag *DAG) string {
	return filepath.Join(s.Root, "locks", "dag-"+dagID(dag))
}

// lockDAG takes the lock of dag, waiting for another run of it unless
// noWait, and notes who holds it. The returned function releases it, and
// removes the note unless keepNote (the run could not be recorded).
func (s *Store) lockDAG(ctx context.Context, dag *DAG, noWait bool, log *slog.Logger) (func(keepNote bool), error) {
	base := s.dagLockBase(dag)
	l := flock.New(base + ".lock")
	ok, err := l.TryLock()
	if err != nil {
		return nil, fmt.Errorf("locking DAG %s: %w%s", dag.Path, err, s.permissionHint(err))
	}
	if !ok {
		holder, _ := os.ReadFile(base + ".holder")
		if noWait {
			return nil, &BusyError{Spec: dag.Path, Holder: strings.TrimSpace(string(holder))}
		}
		log.Info("waiting for another run of this DAG to finish", "spec", dag.Path, "holder", strings.TrimSpace(string(holder)))
		if _, err := l.TryLockContext(ctx, 200*time.Millisecond); err != nil {
			return nil, fmt.Errorf("waiting for the lock of DAG %s: %w", dag.Path, err)
		}
	}
	// The note stays only while the run lives: a run that ends, however it
	// fails, removes it before it lets go of the lock, so a note without a
	// lock holder is a run that was killed (SIGKILL, the OOM killer), whose
	// machine stopped, or whose record could not be written.
	if old, err := os.ReadFile(base + ".holder"); err == nil && !s.recorded(dag, string(old)) {
		log.Warn("the previous run of this DAG did not finish: "+UnfinishedCauses, "spec", dag.Path, "run", strings.TrimSpace(string(old)))
		if err := s.recordUnfinished(dag, string(old)); err != nil {
			log.Warn("could not record the run that did not finish", "err", err)
		}
	}
	host, _ := os.Hostname()
	if err := atomicfile.WriteFile(base+".holder", []byte(fmt.Sprintf("pid %d on %s since %s\n", os.Getpid(), host, time.Now().Format(time.RFC3339)))); err != nil {
		log.Warn("cannot write to the cache: this run may go unrecorded, and status then shows the run before it as the last", "cache", s.Root, "err", err)
	}
	return func(keepNote bool) {
		if !keepNote {
			os.Remove(base + ".holder")
		}
		l.Unlock()
	}, nil
}

// notePlannedRun writes, beside the holder note, the run of dag as
// planned (rec, whose stages have not run; plan says which are selected).
// A run killed before it is recorded (SIGKILL, the OOM killer) leaves it
// behind: gc keeps the entries it names, which the next night would
// otherwise compute again, and the next run of dag records the killed one
// from it (recordUnfinished), so the history has the night, not a gap.
func (s *Store) notePlannedRun(dag *DAG, plan *Plan, rec *RunRecord) {
	planned := *rec
	planned.Stages = append([]StageRecord(nil), rec.Stages...)
	for i, st := range plan.Steps {
		if st.Selected {
			planned.Stages[i].State = "canceled" // until its entry says otherwise
			planned.Stages[i].Reason = st.Reason
		}
	}
	data, err := json.Marshal(&planned)
	if err == nil {
		_ = atomicfile.WriteFile(s.dagLockBase(dag)+".keys", data)
	}
}

// forgetPlannedRun removes what notePlannedRun wrote, once the run that
// wrote it is recorded; a run that did not write it leaves that of a
// killed one before it.
func (s *Store) forgetPlannedRun(dag *DAG) {
	os.Remove(s.dagLockBase(dag) + ".keys")
}

// plannedRun reads the run notePlannedRun noted for the lock at base, nil
// when there is none. An older version noted the keys alone, a line each:
// they come back as selected stages with a key and nothing else.
func plannedRun(base string) *RunRecord {
	data, err := os.ReadFile(base + ".keys")
	if err != nil {
		return nil
	}
	rec := &RunRecord{}
	if json.Unmarshal(data, rec) != nil {
		rec = &RunRecord{}
		for _, k := range strings.Fields(string(data)) {
			rec.Stages = append(rec.Stages, StageRecord{Key: k, State: "canceled"})
		}
	}
	return rec
}

// killedRunsKeys are the keys that runs killed before they were recorded
// planned (see notePlannedRun). gc calls it once no run is alive.
func (s *Store) killedRunsKeys() []string {
	var keys []string
	files, _ := filepath.Glob(filepath.Join(s.Root, "locks", "dag-*.keys"))
	for _, f := range files {
		if rec := plannedRun(strings.TrimSuffix(f, ".keys")); rec != nil {
			for _, st := range rec.Stages {
				if st.Key != "" {
					keys = append(keys, st.Key)
				}
			}
		}
	}
	return keys
}

// recordUnfinished records the run of dag that a holder note outlived
// (note: "pid 123 on host since …"; see lockDAG) as the run that did not
// finish, from the plan it noted: each selected stage whose entry it wrote
// is computed, one whose entry was there before is cached, and the rest
// are canceled. Its end is the last it wrote (an entry, or a file in a
// stage's scratch folder), or when it took the lock.
func (s *Store) recordUnfinished(dag *DAG, note string) error {
	pid, since, ok := parseHolderNote(note)
	if !ok {
		return nil
	}
	base := s.dagLockBase(dag)
	rec := plannedRun(base)
	if rec == nil || rec.Started.IsZero() || rec.Started.After(since.Add(time.Second)) {
		// No plan noted, or another run's: the night as the note has it.
		rec = &RunRecord{Started: since}
	}
	rec.DAG, rec.Spec, rec.Cache = dag.Name, dag.Path, s.Root
	rec.OK, rec.Interrupted = false, false
	rec.Error = "did not finish: it was " + UnfinishedCauses
	// The note's time has whole seconds, the plan's start finer ones.
	rec.Finished = later(since, rec.Started)
	for i := range rec.Stages {
		st := &rec.Stages[i]
		if st.State != "canceled" || st.Key == "" {
			continue
		}
		m, err := ReadManifest(s.EntryDir(st.Key))
		switch {
		case err != nil:
			st.Error = "the run ended before this stage finished"
			rec.Finished = later(rec.Finished, s.lastWorkOn(st.Key))
		case m.Started.Before(rec.Started) && st.Reason == "forced":
			st.Error = "the run ended before this stage finished (forced; the entry before it stays)"
			rec.Finished = later(rec.Finished, s.lastWorkOn(st.Key))
		case m.Started.Before(rec.Started):
			st.State = "cached"
		default:
			st.State, st.Seconds, st.Rows, st.Stats = "computed", m.Seconds, m.Rows, m.Stats
			for _, o := range m.Outputs {
				st.Bytes += o.Size
			}
			if m.Finished.After(rec.Finished) {
				rec.Finished = m.Finished
			}
		}
	}
	rec.Seconds = rec.Finished.Sub(rec.Started).Seconds()
	if err := s.writeRunRecord(dag, rec, pid); err != nil {
		return err
	}
	s.forgetPlannedRun(dag) // the record names its keys now, for gc too
	return nil
}

// lastWorkOn is when a run last wrote for key's entry: the output it was
// writing, a training's checkpoints and metrics; zero when it wrote nothing.
func (s *Store) lastWorkOn(key string) time.Time {
	dirs, _ := filepath.Glob(filepath.Join(s.Root, "tmp", key+"-*"))
	var last time.Time
	for _, dir := range append(dirs, s.scratchDir(key)) {
		last = later(last, lastWritten(dir))
	}
	return last
}

func later(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

// lastWritten is when a file under dir was last written, zero when none
// was.
func lastWritten(dir string) time.Time {
	var last time.Time
	filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			if fi, err := d.Info(); err == nil && fi.ModTime().After(last) {
				last = fi.ModTime()
			}
		}
		return nil
	})
	return last
}

// parseHolderNote reads a lock's holder note ("pid 123 on host since
// 2006-01-02T15:04:05Z").
func parseHolderNote(note string) (pid int, since time.Time, ok bool) {
	var host, at string
	if _, err := fmt.Sscanf(strings.TrimSpace(note), "pid %d on %s since %s", &pid, &host, &at); err != nil {
		return 0, time.Time{}, false
	}
	since, err := time.Parse(time.RFC3339, at)
	return pid, since, err == nil
}

// lockHolder says who runs dag now (running), or, when nobody does, which
// run of it did not finish (unfinished: its holder note outlived it).
func (s *Store) lockHolder(dag *DAG) (running, unfinished string) {
	base := s.dagLockBase(dag)
	l := flock.New(base + ".lock")
	holder, _ := os.ReadFile(base + ".holder")
	h := strings.TrimSpace(string(holder))
	ok, err := l.TryLock()
	if err != nil {
		return "", ""
	}
	if ok {
		// Read again under the lock: a run that just ended removed it.
		holder, _ = os.ReadFile(base + ".holder")
		l.Unlock()
		if s.recorded(dag, string(holder)) {
			return "", ""
		}
		return "", strings.TrimSpace(string(holder))
	}
	if h == "" {
		h = "another process"
	}
	return h, ""
}

// recordRun keeps the run's record under runs/<dag-id>/, pruning old ones.
func (s *Store) recordRun(dag *DAG, rec *RunRecord) error {
	return s.writeRunRecord(dag, rec, os.Getpid())
}

// writeRunRecord keeps the record of a run by process pid.
func (s *Store) writeRunRecord(dag *DAG, rec *RunRecord, pid int) error {
	dir := filepath.Join(s.Root, "runs", dagID(dag))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	data, err := json.MarshalIndent(rec, "", "  ")
	if err != nil {
		return err
	}
	name := fmt.Sprintf("%020d-%d.json", rec.Started.UnixNano(), pid)
	if err := atomicfile.WriteFile(filepath.Join(dir, name), data); err != nil {
		return err
	}
	s.pruneRunRecords(dagID(dag))
	return nil
}

// pruneRunRecords keeps a DAG's last keepRecords run records, and older
// ones only where such a record is the newest to name the entry of a
// stage the kept ones made none for: gc keeps a stage's last entry by the
// records, and a hundred nights of --until pack must not cost the monthly
// training its adapter.
func (s *Store) pruneRunRecords(id string) {
	recs := s.runRecords(id)
	if len(recs) <= keepRecords {
		return
	}
	old, kept := recs[:len(recs)-keepRecords], recs[len(recs)-keepRecords:]
	covered := map[string]bool{} // stages with an entry in a kept record
	for _, f := range kept {
		if r := readRunRecord(f); r != nil {
			for _, st := range r.Stages {
				covered[st.Name] = covered[st.Name] || st.hasEntry()
			}
		}
	}
	for i := len(old) - 1; i >= 0; i-- {
		r, needed := readRunRecord(old[i]), false
		if r != nil {
			for _, st := range r.Stages {
				if st.hasEntry() && !covered[st.Name] {
					covered[st.Name], needed = true, true
				}
			}
		}
		if !needed {
			os.Remove(old[i])
		}
	}
}

// runRecords lists the run record files of one DAG, oldest first.
func (s *Store) runRecords(id string) []string {
	files, _ := filepath.Glob(filepath.Join(s.Root, "runs", id, "*.json"))
	sort.Strings(files) // names start with a fixed-width timestamp
	return files
}

// readRunRecord reads one record file; a damaged one reads as nil, since a
// record only informs plan's reasons and gc.
func readRunRecord(path string) *RunRecord {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	r := &RunRecord{}
	if json.Unmarshal(data, r) != nil {
		return nil
	}
	return r
}

// lastRun returns the newest run record of dag, or nil.
func (s *Store) lastRun(dag *DAG) *RunRecord {
	recs := s.runRecords(dagID(dag))
	if len(recs) == 0 {
		return nil
	}
	return readRunRecord(recs[len(recs)-1])
}

// runHistory reads the kept run records of dag, newest first.
func (s *Store) runHistory(dag *DAG) []*RunRecord {
	files := s.runRecords(dagID(dag))
	out := make([]*RunRecord, 0, len(files))
	for i := len(files) - 1; i >= 0; i-- {
		if r := readRunRecord(files[i]); r != nil {
			out = append(out, r)
		}
	}
	return out
}

// recorded reports whether the run a lock's note names ("pid 123 on host
// since 2006-01-02T15:04:05Z") ended and was recorded, or whether there is
// no note at all. Notes of versions that did not remove them outlive runs
// that ended well; their run records tell them apart.
func (s *Store) recorded(dag *DAG, note string) bool {
	note = strings.TrimSpace(note)
	if note == "" {
		return true
	}
	pid, started, ok := parseHolderNote(note)
	if !ok {
		return false
	}
	// The run that wrote the note is the newest recorded one if any: same
	// process, started before it took the lock (long before, when it
	// waited), finished after. The note's time has whole seconds.
	recs := s.runRecords(dagID(dag))
	if len(recs) == 0 {
		return false
	}
	var ns int64
	var rpid int
	if _, err := fmt.Sscanf(filepath.Base(recs[len(recs)-1]), "%d-%d.json", &ns, &rpid); err != nil || rpid != pid {
		return false
	}
	r := readRunRecord(recs[len(recs)-1])
	return r != nil && !r.Started.After(started.Add(time.Second)) && !r.Finished.Before(started.Add(-time.Second))
}
