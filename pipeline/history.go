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
func IsBusy(err error) bool { return errors.Is(err, ErrBusy) }

// dagLockBase is the path, less its extension, of dag's lock (".lock") and
// of the note naming its holder (".holder").
func (s *Store) dagLockBase(dag *DAG) string {
	return filepath.Join(s.Root, "locks", "dag-"+dagID(dag))
}

// lockDAG takes the lock of dag, waiting for another run of it unless
// noWait, and notes who holds it. The returned function releases it.
func (s *Store) lockDAG(ctx context.Context, dag *DAG, noWait bool, log *slog.Logger) (func(), error) {
	base := s.dagLockBase(dag)
	l := flock.New(base + ".lock")
	ok, err := l.TryLock()
	if err != nil {
		return nil, fmt.Errorf("locking DAG %s: %w", dag.Path, err)
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
	host, _ := os.Hostname()
	_ = os.WriteFile(base+".holder", []byte(fmt.Sprintf("pid %d on %s since %s\n", os.Getpid(), host, time.Now().Format(time.RFC3339))), 0o644)
	return func() { l.Unlock() }, nil
}

// lockHolder says who runs dag now, or "" if nobody does.
func (s *Store) lockHolder(dag *DAG) string {
	base := s.dagLockBase(dag)
	l := flock.New(base + ".lock")
	if ok, err := l.TryLock(); err != nil || ok {
		if ok {
			l.Unlock()
		}
		return ""
	}
	holder, _ := os.ReadFile(base + ".holder")
	if h := strings.TrimSpace(string(holder)); h != "" {
		return h
	}
	return "another process"
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
