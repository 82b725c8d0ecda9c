package pipeline

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
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
//	locks/dag-<id>.keys     the keys of the entries that run planned, a line
//	                        each, which gc keeps should the run be killed
//	runs/<id>/*.json        a RunRecord per run, newest last, the last 100 kept
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

// notePlannedKeys writes, beside the holder note, the keys of the entries
// the run of dag planned: a run killed before it is recorded (SIGKILL, the
// OOM killer) names no entry in the history, and gc would remove what it
// computed, costing the next night all of it again.
func (s *Store) notePlannedKeys(dag *DAG, plan *Plan) {
	var b strings.Builder
	for _, st := range plan.Steps {
		if st.Key != "" {
			b.WriteString(st.Key + "\n")
		}
	}
	_ = atomicfile.WriteFile(s.dagLockBase(dag)+".keys", []byte(b.String()))
}

// forgetPlannedKeys removes the keys notePlannedKeys wrote, once the run
// that wrote them is recorded (the record names them); a run that did not
// write them leaves those of a killed one before it.
func (s *Store) forgetPlannedKeys(dag *DAG) {
	os.Remove(s.dagLockBase(dag) + ".keys")
}

// killedRunsKeys are the keys that runs killed before they were recorded
// planned (see notePlannedKeys). gc calls it once no run is alive.
func (s *Store) killedRunsKeys() []string {
	var keys []string
	files, _ := filepath.Glob(filepath.Join(s.Root, "locks", "dag-*.keys"))
	for _, f := range files {
		data, _ := os.ReadFile(f)
		keys = append(keys, strings.Fields(string(data))...)
	}
	return keys
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
	dir := filepath.Join(s.Root, "runs", dagID(dag))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	data, err := json.MarshalIndent(rec, "", "  ")
	if err != nil {
		return err
	}
	name := fmt.Sprintf("%020d-%d.json", rec.Started.UnixNano(), os.Getpid())
	if err := atomicfile.WriteFile(filepath.Join(dir, name), data); err != nil {
		return err
	}
	if recs := s.runRecords(dagID(dag)); len(recs) > keepRecords {
		for _, f := range recs[:len(recs)-keepRecords] {
			os.Remove(f)
		}
	}
	return nil
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
	var pid int
	var host, since string
	if _, err := fmt.Sscanf(note, "pid %d on %s since %s", &pid, &host, &since); err != nil {
		return false
	}
	started, err := time.Parse(time.RFC3339, since)
	if err != nil {
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
