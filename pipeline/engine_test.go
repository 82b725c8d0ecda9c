package pipeline

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/gofrs/flock"
	"go.uber.org/goleak"

	"gemmaft/internal/dirsum"
)

type testEnv struct {
	t     testing.TB
	dir   string
	store *Store
	reg   *Registry
}

func newTestEnv(t testing.TB) *testEnv {
	t.Helper()
	dir := t.TempDir()
	st, err := OpenStore(filepath.Join(dir, "cache"))
	if err != nil {
		t.Fatal(err)
	}
	return &testEnv{t: t, dir: dir, store: st, reg: testRegistry()}
}

func (e *testEnv) write(name, content string) string {
	e.t.Helper()
	p := filepath.Join(e.dir, name)
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		e.t.Fatal(err)
	}
	return p
}

func (e *testEnv) load(spec string) *DAG {
	e.t.Helper()
	dag, err := Load(spec, e.reg)
	if err != nil {
		e.t.Fatalf("load %s: %v", spec, err)
	}
	return dag
}

func (e *testEnv) run(spec string, opts Options) (*RunRecord, error) {
	e.t.Helper()
	eng := &Engine{Store: e.store}
	return eng.Run(context.Background(), e.load(spec), opts)
}

func (e *testEnv) mustRun(spec string, opts Options) *RunRecord {
	e.t.Helper()
	rec, err := e.run(spec, opts)
	if err != nil {
		e.t.Fatalf("run: %v", err)
	}
	return rec
}

// mustRunWithin is mustRun, failing the test (a deadlock, most likely)
// when the run takes longer than limit.
func (e *testEnv) mustRunWithin(spec string, opts Options, limit time.Duration) *RunRecord {
	e.t.Helper()
	done := make(chan struct{})
	var rec *RunRecord
	var err error
	go func() {
		defer close(done)
		rec, err = e.run(spec, opts)
	}()
	select {
	case <-done:
	case <-time.After(limit):
		e.t.Fatalf("%s did not finish within %v: deadlock", spec, limit)
	}
	if err != nil {
		e.t.Fatalf("run: %v", err)
	}
	return rec
}

func stateOfStage(rec *RunRecord, name string) string {
	for _, s := range rec.Stages {
		if s.Name == name {
			return s.State
		}
	}
	return "absent"
}

func keyOfStage(rec *RunRecord, name string) string {
	for _, s := range rec.Stages {
		if s.Name == name {
			return s.Key
		}
	}
	return ""
}

// readTable reads column i and s of a stage's cached table.
func readTable(t testing.TB, st *Store, key string) ([]int64, []string) {
	t.Helper()
	in := &Input{Name: "test", dir: st.EntryDir(key), committed: closedChan(), tracker: newTracker("t", "t")}
	var is []int64
	var ss []string
	for {
		rec, err := in.Next(context.Background())
		if err != nil {
			if err.Error() == "EOF" {
				break
			}
			t.Fatal(err)
		}
		for i := 0; i < int(rec.NumRows()); i++ {
			is = append(is, rec.Column(0).(*array.Int64).Value(i))
			ss = append(ss, rec.Column(1).(*array.String).Value(i))
		}
		rec.Release()
	}
	return is, ss
}

func closedChan() chan struct{} {
	c := make(chan struct{})
	close(c)
	return c
}

const chainSpec = `name: chain
stages:
  src:
    kind: gen
    with: {rows: 95, batch: 10, file: data.txt}
  twice:
    kind: double
    needs: [src]
  total:
    kind: count
    needs: [twice]
`

func TestRunStreamsAndCaches(t *testing.T) {
	defer goleak.VerifyNone(t)
	e := newTestEnv(t)
	e.write("data.txt", "row-")
	spec := e.write("chain.yaml", chainSpec)

	rec := e.mustRun(spec, Options{})
	for _, s := range []string{"src", "twice", "total"} {
		if got := stateOfStage(rec, s); got != "computed" {
			t.Errorf("first run: %s is %s, want computed", s, got)
		}
	}
	is, ss := readTable(t, e.store, keyOfStage(rec, "twice"))
	if len(is) != 95 || is[94] != 188 || ss[3] != "ROW-3" {
		t.Fatalf("twice table: %d rows, last %v, s[3]=%q", len(is), is[len(is)-1], ss[3])
	}
	count, err := os.ReadFile(filepath.Join(e.store.EntryDir(keyOfStage(rec, "total")), "count.txt"))
	if err != nil || strings.TrimSpace(string(count)) != "95" {
		t.Fatalf("count.txt = %q, %v", count, err)
	}

	rec2 := e.mustRun(spec, Options{})
	for _, s := range []string{"src", "twice", "total"} {
		if got := stateOfStage(rec2, s); got != "cached" {
			t.Errorf("second run: %s is %s, want cached", s, got)
		}
		if keyOfStage(rec, s) != keyOfStage(rec2, s) {
			t.Errorf("key of %s changed between identical runs", s)
		}
	}
	tmp, _ := os.ReadDir(filepath.Join(e.store.Root, "tmp"))
	if len(tmp) != 0 {
		t.Errorf("tmp/ holds %d leftovers after successful runs", len(tmp))
	}
}

func TestUntilAndOnly(t *testing.T) {
	e := newTestEnv(t)
	e.write("data.txt", "x")
	spec := e.write("chain.yaml", chainSpec)

	rec := e.mustRun(spec, Options{Until: "twice"})
	if stateOfStage(rec, "total") != "not selected" || stateOfStage(rec, "twice") != "computed" {
		t.Fatalf("--until twice: states %v", rec.Stages)
	}
	rec = e.mustRun(spec, Options{Only: "total"})
	if stateOfStage(rec, "total") != "computed" || stateOfStage(rec, "src") != "not selected" {
		t.Fatalf("--only total: states %v", rec.Stages)
	}

	fresh := newTestEnv(t)
	fresh.write("data.txt", "x")
	spec = fresh.write("chain.yaml", chainSpec)
	_, err := fresh.run(spec, Options{Only: "twice"})
	if err == nil || !IsSpecError(err) || !strings.Contains(err.Error(), "needs \"src\", which is not cached") {
		t.Fatalf("--only with an uncached input: %v", err)
	}
	// Refused before anything ran, it is not the DAG's last run.
	if runs := fresh.store.Runs(fresh.load(spec), 10); len(runs) != 0 {
		t.Errorf("the refused run was recorded: %+v", runs[0])
	}
}

// TestPlanReasonsForMissingEntries: a stage never computed says so, even
// after runs that stopped before it; an entry that existed and is gone is
// reported as removed.
func TestPlanReasonsForMissingEntries(t *testing.T) {
	e := newTestEnv(t)
	e.write("data.txt", "x")
	spec := e.write("chain.yaml", chainSpec)
	why := func(stage string) string {
		t.Helper()
		plan, err := e.store.Plan(e.load(spec), Options{})
		if err != nil {
			t.Fatal(err)
		}
		return plan.Step(stage).Reason
	}
	const never, removed = "no earlier entry", "cache entry missing (removed by gc or by hand)"

	if got := why("total"); got != never {
		t.Errorf("before any run: total %q, want %q", got, never)
	}
	e.mustRun(spec, Options{Until: "twice"})
	if got := why("total"); got != never {
		t.Errorf("after --until twice: total %q, want %q", got, never)
	}
	if got := why("twice"); got != "cached" {
		t.Errorf("after --until twice: twice %q, want cached", got)
	}

	rec := e.mustRun(spec, Options{})
	if err := e.store.Remove(keyOfStage(rec, "total")); err != nil {
		t.Fatal(err)
	}
	if got := why("total"); got != removed {
		t.Errorf("entry removed after a full run: total %q, want %q", got, removed)
	}
	// A later run that does not reach the stage does not make it new.
	e.mustRun(spec, Options{Until: "twice"})
	if got := why("total"); got != removed {
		t.Errorf("entry removed, then --until twice: total %q, want %q", got, removed)
	}
}

func TestForce(t *testing.T) {
	e := newTestEnv(t)
	e.write("data.txt", "x")
	spec := e.write("chain.yaml", chainSpec)
	e.mustRun(spec, Options{})
	rec := e.mustRun(spec, Options{Force: []string{"twice"}})
	if stateOfStage(rec, "twice") != "computed" || stateOfStage(rec, "src") != "cached" || stateOfStage(rec, "total") != "cached" {
		t.Fatalf("--force twice: %+v", rec.Stages)
	}
	rec = e.mustRun(spec, Options{Force: []string{"all"}})
	for _, s := range []string{"src", "twice", "total"} {
		if stateOfStage(rec, s) != "computed" {
			t.Errorf("--force all: %s is %s", s, stateOfStage(rec, s))
		}
	}
}

// TestCacheKeys checks hit and miss for every input of a key.
func TestCacheKeys(t *testing.T) {
	e := newTestEnv(t)
	data := e.write("data.txt", "abc-")
	spec := e.write("chain.yaml", chainSpec)
	base := e.mustRun(spec, Options{})

	expect := func(what string, want map[string]string) *RunRecord {
		t.Helper()
		rec := e.mustRun(spec, Options{})
		for s, w := range want {
			if got := stateOfStage(rec, s); got != w {
				t.Errorf("%s: %s is %s, want %s", what, s, got, w)
			}
		}
		return rec
	}
	allCached := map[string]string{"src": "cached", "twice": "cached", "total": "cached"}
	allComputed := map[string]string{"src": "computed", "twice": "computed", "total": "computed"}

	// Writing a default explicitly does not change the key.
	e.write("chain.yaml", strings.Replace(chainSpec, "needs: [src]", "needs: [src]\n    with: {factor: 2}", 1))
	expect("explicit default", allCached)

	// A parameter change misses that stage and everything downstream.
	e.write("chain.yaml", strings.Replace(chainSpec, "needs: [src]", "needs: [src]\n    with: {factor: 3}", 1))
	rec := expect("param change", map[string]string{"src": "cached", "twice": "computed", "total": "computed"})
	if r := rec.Stages[1].Reason; !strings.Contains(r, "parameters changed: factor") {
		t.Errorf("reason for a param change = %q", r)
	}
	e.write("chain.yaml", chainSpec)
	expect("param back", allCached)

	// Touching a file without changing it: hit, and no re-hash needed after the first.
	time.Sleep(2 * racyWindow)
	now := time.Now()
	if err := os.Chtimes(data, now, now); err != nil {
		t.Fatal(err)
	}
	expect("touch", allCached)

	// Changed content with the same size and mtime: miss.
	fi, _ := os.Stat(data)
	if err := os.WriteFile(data, []byte("abd-"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(data, fi.ModTime(), fi.ModTime()); err != nil {
		t.Fatal(err)
	}
	rec = expect("content change, same mtime", allComputed)
	if r := rec.Stages[0].Reason; !strings.Contains(r, "file content changed") {
		t.Errorf("reason for a content change = %q", r)
	}
	if _, ss := readTable(t, e.store, keyOfStage(rec, "src")); ss[0] != "abd-0" {
		t.Errorf("served stale data: %q", ss[0])
	}

	// Back to the old content: the old entries are still there and valid.
	if err := os.WriteFile(data, []byte("abc-"), 0o644); err != nil {
		t.Fatal(err)
	}
	rec = expect("content restored", allCached)
	if keyOfStage(rec, "total") != keyOfStage(base, "total") {
		t.Error("restored inputs did not give back the original key")
	}

	// A kind version bump misses that stage and downstream.
	e.reg.kinds["gen"].(*genKind).version = 2
	rec = expect("version bump", allComputed)
	if r := rec.Stages[0].Reason; !strings.Contains(r, "version 1 → 2") {
		t.Errorf("reason for a version bump = %q", r)
	}
}

// TestRevisionRecomputesOnlyItsSettings: a fix that changes the output of
// some settings only (a Reviser's revision) recomputes the stages with
// those settings, saying why; the others keep their entries.
func TestRevisionRecomputesOnlyItsSettings(t *testing.T) {
	e := newTestEnv(t)
	spec := e.write("two.yaml", "name: two\nstages:\n  fixed: {kind: gen, with: {tags: [affected]}}\n  other: {kind: gen, with: {tags: [unaffected]}}\n")
	before := e.mustRun(spec, Options{})
	genRevision = func(p *genParams) int {
		if slices.Contains(p.Tags, "affected") {
			return 1
		}
		return 0
	}
	defer func() { genRevision = nil }()
	after := e.mustRun(spec, Options{})
	fixed, other := after.Stages[0], after.Stages[1]
	if fixed.Name != "fixed" || fixed.State != "computed" || !strings.Contains(fixed.Reason, "kind gen version 1 → 1.1") || fixed.Key == before.Stages[0].Key {
		t.Errorf("the revised stage: %s %s, %q", fixed.Name, fixed.State, fixed.Reason)
	}
	if other.State != "cached" || other.Key != before.Stages[1].Key {
		t.Errorf("the other stage: %s, key changed %v", other.State, other.Key != before.Stages[1].Key)
	}
	if m, err := ReadManifest(e.store.EntryDir(fixed.Key)); err != nil || m.KindRevision != 1 {
		t.Errorf("manifest of the revised entry: %+v (%v)", m, err)
	}
}

// TestStatCacheAvoidsRehash checks that an unchanged input file is not read
// again to compute its digest.
func TestStatCacheAvoidsRehash(t *testing.T) {
	e := newTestEnv(t)
	data := e.write("data.txt", strings.Repeat("z", 1<<20))
	old := time.Now().Add(-time.Hour)
	os.Chtimes(data, old, old)
	spec := e.write("chain.yaml", chainSpec)
	time.Sleep(2 * racyWindow)
	e.mustRun(spec, Options{})
	e.store.Close()

	// A new process (a new Store) must trust the saved state.
	st, err := OpenStore(e.store.Root)
	if err != nil {
		t.Fatal(err)
	}
	e.store = st
	time.Sleep(2 * racyWindow)
	rec := e.mustRun(spec, Options{})
	if rec.HashedBytes != 0 {
		t.Errorf("second run hashed %d bytes; want 0", rec.HashedBytes)
	}
}

// TestFailureLeavesNoEntry: a stage that fails (or panics) writes no
// entry and no temporary folder; the input it streamed from is still
// committed whole.
func TestFailureLeavesNoEntry(t *testing.T) {
	defer goleak.VerifyNone(t)
	for _, panics := range []bool{false, true} {
		e := newTestEnv(t)
		spec := e.write("fail.yaml", `name: failing
stages:
  src: {kind: gen, with: {rows: 100000, batch: 10}}
  bad: {kind: fail, needs: [src], with: {after_batches: 3, panic: `+map[bool]string{false: "false", true: "true"}[panics]+`}}
`)
		start := time.Now()
		rec, err := e.run(spec, Options{})
		if err == nil {
			t.Fatal("run with a failing stage succeeded")
		}
		if !strings.Contains(err.Error(), "stage bad (fail)") {
			t.Errorf("error does not name the stage: %v", err)
		}
		if panics && !strings.Contains(err.Error(), "panic") {
			t.Errorf("panic not reported: %v", err)
		}
		if !panics && !errors.Is(err, errPlanned) {
			t.Errorf("cause lost: %v", err)
		}
		if time.Since(start) > 5*time.Second {
			t.Errorf("failure took %v to stop the run", time.Since(start))
		}
		if rec.OK || stateOfStage(rec, "bad") != "failed" {
			t.Errorf("record: ok=%v bad=%s", rec.OK, stateOfStage(rec, "bad"))
		}
		keys, _ := e.store.Keys()
		if len(keys) != 1 || stateOfStage(rec, "src") != "computed" {
			t.Errorf("failed run left %d entries, src %s; want src's alone", len(keys), stateOfStage(rec, "src"))
		}
		for _, k := range keys {
			if state, m, _ := e.store.Check(k, true); state != Valid || m.Stage != "src" || m.Rows != 100000 {
				t.Errorf("entry %s: %v, %+v", ShortKey(k), state, m)
			}
		}
		tmp, _ := os.ReadDir(filepath.Join(e.store.Root, "tmp"))
		if len(tmp) != 0 {
			t.Errorf("failed run left %d temporary folders", len(tmp))
		}
	}
}

// TestFullDiskSaysWhatToDo: a stage that runs out of disk space fails
// saying that the cache's disk is full and how gc frees it, the error
// still a full disk's.
func TestFullDiskSaysWhatToDo(t *testing.T) {
	e := newTestEnv(t)
	spec := e.write("full.yaml", `name: full
stages:
  src: {kind: gen, with: {rows: 20, batch: 10}}
  bad: {kind: fail, needs: [src], with: {after_batches: 1, no_space: true}}
`)
	rec, err := e.run(spec, Options{})
	if !errors.Is(err, syscall.ENOSPC) || !strings.Contains(err.Error(), "is full: `pipeline gc --dry-run`") {
		t.Fatalf("want the full disk and what to do, got %v", err)
	}
	if s := rec.Stages[1]; s.Name != "bad" || !strings.Contains(s.Error, "pipeline gc") {
		t.Errorf("the run's record of bad: %+v", s)
	}
}

// TestFailureSparesIndependentStages: a failing stage cancels the stages
// that need it, and no others: a long stage beside it (training, say) runs
// to the end and is cached, and the run fails naming the one stage.
func TestFailureSparesIndependentStages(t *testing.T) {
	defer goleak.VerifyNone(t)
	e := newTestEnv(t)
	spec := e.write("keep.yaml", `name: keep
stages:
  long: {kind: gen, with: {rows: 40, batch: 1, delay_ms: 25}}
  longer: {kind: count, needs: [long]}
  src: {kind: gen, with: {rows: 100, batch: 10, tags: [other]}}
  bad: {kind: fail, needs: [src], with: {after_batches: 1}}
  after: {kind: count, needs: [bad]}
`)
	rec, err := e.run(spec, Options{})
	if err == nil || !errors.Is(err, errPlanned) || !strings.Contains(err.Error(), "stage bad (fail)") || strings.Contains(err.Error(), "stage after") {
		t.Fatalf("want the failure of bad alone, got %v", err)
	}
	for stage, want := range map[string]string{"long": "computed", "longer": "computed", "src": "computed", "bad": "failed", "after": "canceled"} {
		if got := stateOfStage(rec, stage); got != want {
			t.Errorf("%s: %s, want %s", stage, got, want)
		}
	}
	if rec.OK {
		t.Error("the run is recorded as ok")
	}
	keys, _ := e.store.Keys()
	if len(keys) != 3 {
		t.Errorf("%d entries, want long's, longer's and src's", len(keys))
	}
	// The next run computes only what failed and what needs it.
	plan, err := e.store.Plan(e.load(spec), Options{})
	if err != nil {
		t.Fatal(err)
	}
	for _, st := range plan.Steps {
		if want := st.Node.Name == "bad" || st.Node.Name == "after"; st.Compute != want {
			t.Errorf("next run: %s compute %v", st.Node.Name, st.Compute)
		}
	}
}

func TestDiamondDoesNotDeadlock(t *testing.T) {
	defer goleak.VerifyNone(t)
	e := newTestEnv(t)
	spec := e.write("diamond.yaml", `name: diamond
stages:
  src: {kind: gen, with: {rows: 5000, batch: 7}}
  a: {kind: double, needs: [src]}
  b: {kind: double, needs: [src], with: {factor: 3}}
  both: {kind: concat, needs: [a, b]}
  after: {kind: double, needs: [both], with: {delay_ms: 1}}
`)
	rec := e.mustRunWithin(spec, Options{}, 30*time.Second)
	is, _ := readTable(t, e.store, keyOfStage(rec, "both"))
	if len(is) != 10000 || is[4999] != 9998 || is[9999] != 14997 {
		t.Fatalf("concat: %d rows", len(is))
	}
	// after streams batches that concat relayed from files it read.
	is, _ = readTable(t, e.store, keyOfStage(rec, "after"))
	if len(is) != 10000 || is[9999] != 2*14997 {
		t.Fatalf("after: %d rows", len(is))
	}
}

func TestDamagedEntryIsRecomputed(t *testing.T) {
	cases := map[string]func(dir string) error{
		"flipped byte": func(dir string) error {
			p := filepath.Join(dir, TableFile)
			b, _ := os.ReadFile(p)
			b[len(b)/2] ^= 0x40
			return os.WriteFile(p, b, 0o644)
		},
		"truncated": func(dir string) error {
			return os.Truncate(filepath.Join(dir, TableFile), 100)
		},
		"missing file": func(dir string) error {
			return os.Remove(filepath.Join(dir, TableFile))
		},
		"edited manifest": func(dir string) error {
			p := filepath.Join(dir, manifestName)
			b, _ := os.ReadFile(p)
			return os.WriteFile(p, []byte(strings.Replace(string(b), `"rows": 95`, `"rows": 96`, 1)), 0o644)
		},
		"torn manifest": func(dir string) error {
			return os.Truncate(filepath.Join(dir, manifestName), 40)
		},
	}
	for name, damage := range cases {
		t.Run(name, func(t *testing.T) {
			e := newTestEnv(t)
			e.write("data.txt", "d")
			spec := e.write("chain.yaml", chainSpec)
			rec := e.mustRun(spec, Options{})
			key := keyOfStage(rec, "twice")
			wantI, wantS := readTable(t, e.store, key)
			// Let the stat state of the outputs settle and be trusted first.
			time.Sleep(2 * racyWindow)
			e.mustRun(spec, Options{})
			if err := damage(e.store.EntryDir(key)); err != nil {
				t.Fatal(err)
			}
			bad, _, _ := e.store.Verify(nil)
			if len(bad) != 1 || bad[0].Key != key {
				t.Fatalf("verify found %v", bad)
			}
			rec = e.mustRun(spec, Options{})
			if st := stateOfStage(rec, "twice"); st != "computed" {
				t.Fatalf("damaged entry was %s, want computed", st)
			}
			if !strings.Contains(rec.Stages[1].Reason, "damaged") {
				t.Errorf("reason = %q", rec.Stages[1].Reason)
			}
			gotI, gotS := readTable(t, e.store, key)
			if len(gotI) != len(wantI) || gotS[90] != wantS[90] {
				t.Fatal("recomputed entry differs")
			}
			if bad, _, _ := e.store.Verify(nil); len(bad) != 0 {
				t.Fatalf("after recompute verify found %v", bad)
			}
		})
	}
}

func TestGC(t *testing.T) {
	e := newTestEnv(t)
	e.write("data.txt", "v1")
	spec := e.write("chain.yaml", chainSpec)
	first := e.mustRun(spec, Options{})
	e.write("data.txt", "v2")
	second := e.mustRun(spec, Options{})

	res, err := e.store.GC(context.Background(), GCOptions{KeepLast: 2})
	if err != nil || len(res.Removed) != 0 {
		t.Fatalf("gc --keep-last 2 removed %v (%v)", res.Removed, err)
	}
	res, err = e.store.GC(context.Background(), GCOptions{KeepLast: 1, OlderThan: time.Hour})
	if err != nil || len(res.Removed) != 0 {
		t.Fatalf("gc --older-than 1h removed fresh entries %v (%v)", res.Removed, err)
	}
	res, err = e.store.GC(context.Background(), GCOptions{KeepLast: 1})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Removed) != 3 {
		t.Fatalf("gc --keep-last 1 removed %d entries, want the 3 of the first run", len(res.Removed))
	}
	for _, s := range first.Stages {
		if st, _, _ := e.store.Check(s.Key, false); st != Missing {
			t.Errorf("old entry of %s still there", s.Name)
		}
	}
	for _, s := range second.Stages {
		if st, _, _ := e.store.Check(s.Key, false); st != Valid {
			t.Errorf("entry of %s from the last run was removed", s.Name)
		}
	}

	// A spec renamed or deleted keeps its entries until its last run is
	// --older-than old, not for ever.
	aged := GCOptions{KeepLast: 3, OlderThan: time.Nanosecond}
	if res, err := e.store.GC(context.Background(), aged); err != nil || len(res.Removed) != 0 {
		t.Fatalf("gc of a spec still there removed %v (%v)", res.Removed, err)
	}
	if err := os.Rename(spec, spec+".old"); err != nil {
		t.Fatal(err)
	}
	if res, err := e.store.GC(context.Background(), GCOptions{KeepLast: 3}); err != nil || len(res.Removed) != 0 {
		t.Fatalf("gc without --older-than removed %v (%v)", res.Removed, err)
	}
	if res, err := e.store.GC(context.Background(), aged); err != nil || len(res.Removed) != 3 {
		t.Fatalf("gc --older-than of a spec gone removed %v (%v), want its 3 entries", res.Removed, err)
	}
	// A spec whose folder is not here (a file system not mounted, another
	// machine sharing the cache) is not gone.
	if specGone(filepath.Join(e.dir, "not-mounted", "chain.yaml")) || !specGone(spec) {
		t.Error("specGone tells a missing folder from a missing spec wrongly")
	}
}

// lockedBuffer is a log sink the run writes to from its goroutines while
// the test reads it.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// testSignal is a signal's cancellation cause, as the CLI's is.
type testSignal struct{}

func (testSignal) Error() string        { return "interrupted by SIGTERM" }
func (testSignal) Is(target error) bool { return target == context.Canceled }

// TestWaitingForAnEntrySaysSo: a run whose stage another run is computing
// (another spec sharing it, or this spec by another path) says that it
// waits, where a wait of hours used to be silent; interrupted there, it
// says by what, and counts the stage as canceled.
func TestWaitingForAnEntrySaysSo(t *testing.T) {
	e := newTestEnv(t)
	dag := e.load(e.write("spec.yaml", "name: w\nstages:\n  src: {kind: gen, with: {rows: 3}}\n"))
	plan, err := e.store.Plan(dag, Options{})
	if err != nil {
		t.Fatal(err)
	}
	other := flock.New(filepath.Join(e.store.Root, "locks", plan.Step("src").Key+".lock"))
	if err := other.Lock(); err != nil {
		t.Fatal(err)
	}
	defer other.Unlock()
	// status says so too.
	if s, err := e.store.Status(dag); err != nil || len(s.Stages) != 1 || !strings.HasPrefix(s.Stages[0].Why, ComputingElsewhere+"; ") {
		t.Errorf("status while another run computes the entry: %+v (%v)", s, err)
	}

	var logs lockedBuffer
	ctx, cancel := context.WithCancelCause(context.Background())
	eng := &Engine{Store: e.store, Log: slog.New(slog.NewTextHandler(&logs, nil))}
	var rec *RunRecord
	done := make(chan struct{})
	go func() { rec, err = eng.Run(ctx, dag, Options{}); close(done) }()
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(logs.String(), "waiting for another run computing this stage's entry"); {
		if time.Now().After(deadline) {
			t.Fatalf("the run does not say that it waits:\n%s", logs.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	cancel(testSignal{})
	<-done
	if err == nil || !strings.Contains(err.Error(), "stage src") || !strings.Contains(err.Error(), "interrupted by SIGTERM") {
		t.Errorf("error %v", err)
	}
	if !rec.Interrupted || rec.Stages[0].State != "canceled" {
		t.Errorf("record: interrupted %v, stage %s", rec.Interrupted, rec.Stages[0].State)
	}
	// With NoWait the run does not wait: busy, as for the DAG's lock.
	eng = &Engine{Store: e.store, NoWait: true}
	ctx, stop := context.WithTimeout(context.Background(), 10*time.Second)
	defer stop()
	runs := e.store.Runs(dag, 10)
	rec, err = eng.Run(ctx, dag, Options{})
	if !IsBusy(err) || !strings.Contains(err.Error(), "stage src: another run is computing this stage's entry") {
		t.Errorf("NoWait with the entry locked: %v", err)
	}
	// Not a failed run: the stage is canceled and nothing is recorded,
	// as for a DAG whose lock is held.
	if after := e.store.Runs(dag, 10); len(after) != len(runs) || rec.Stages[0].State != "canceled" {
		t.Errorf("a run busy at an entry: %d runs recorded before, %d after; stage %s", len(runs), len(after), rec.Stages[0].State)
	}
}

// TestGCLeftovers: gc removes what killed runs left, says how much, and a
// dry run says the same and removes nothing; a training's checkpoints go
// only after a week in which nothing in them changed, however long ago
// the training began (one resumed night after night kept checkpoints
// seconds old in a folder made eight days before, and lost them).
func TestGCLeftovers(t *testing.T) {
	e := newTestEnv(t)
	root := e.store.Root
	weekAgo := time.Now().Add(-8 * 24 * time.Hour)
	write := func(p string, n int) {
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, make([]byte, n), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	resumed := filepath.Join(root, "scratch", strings.Repeat("a", 64))
	write(filepath.Join(resumed, "checkpoints", "step-25", "adapter.safetensors"), 1000)
	os.Chtimes(resumed, weekAgo, weekAgo)
	abandoned := filepath.Join(root, "scratch", strings.Repeat("b", 64))
	write(filepath.Join(abandoned, "checkpoints", "step-5", "adapter.safetensors"), 2000)
	for _, p := range []string{filepath.Join(abandoned, "checkpoints", "step-5", "adapter.safetensors"), filepath.Join(abandoned, "checkpoints", "step-5"), filepath.Join(abandoned, "checkpoints"), abandoned} {
		os.Chtimes(p, weekAgo, weekAgo)
	}
	half := filepath.Join(root, "tmp", "entry-123")
	write(filepath.Join(half, "data.arrow"), 3000)

	for _, dry := range []bool{true, false} {
		res, err := e.store.GC(context.Background(), GCOptions{KeepLast: 3, DryRun: dry})
		if err != nil {
			t.Fatal(err)
		}
		slices.Sort(res.Leftovers)
		if want := []string{abandoned, half}; !slices.Equal(res.Leftovers, want) || res.LeftoverBytes != 5000 {
			t.Errorf("dry run %v: leftovers %v (%d bytes), want %v (5000)", dry, res.Leftovers, res.LeftoverBytes, want)
		}
		for _, p := range []string{resumed, abandoned, half} {
			_, err := os.Stat(p)
			if gone := err != nil; gone != (!dry && p != resumed) {
				t.Errorf("dry run %v: %s gone %v", dry, p, gone)
			}
		}
	}
}

// TestGCKeepsWhatPartialRunsLeftOut: runs that stop before a stage
// (--until, as nightly preprocessing does) record no key for it; gc keeps
// the entry it last had, so the last training survives them.
func TestGCKeepsWhatPartialRunsLeftOut(t *testing.T) {
	e := newTestEnv(t)
	e.write("data.txt", "v1")
	spec := e.write("chain.yaml", chainSpec)
	full := e.mustRun(spec, Options{})
	e.mustRun(spec, Options{Until: "src"})
	e.mustRun(spec, Options{Until: "src"})
	res, err := e.store.GC(context.Background(), GCOptions{KeepLast: 2})
	if err != nil || len(res.Removed) != 0 {
		t.Fatalf("gc --keep-last 2 after two partial runs removed %v (%v)", res.Removed, err)
	}
	for _, s := range full.Stages {
		if st, _, _ := e.store.Check(s.Key, false); st != Valid {
			t.Errorf("entry of %s removed", s.Name)
		}
	}
}

// TestGCKeepsWhatPartialRunsLeftOutPastTheRecordsKept: the last entry of
// a stage survives more partial runs than the records kept (hourly
// --until pack against a monthly training), through the one older record
// that names it.
func TestGCKeepsWhatPartialRunsLeftOutPastTheRecordsKept(t *testing.T) {
	e := newTestEnv(t)
	e.write("data.txt", "v1")
	spec := e.write("chain.yaml", chainSpec)
	full := e.mustRun(spec, Options{})
	for range keepRecords + 3 {
		e.mustRun(spec, Options{Until: "src"})
	}
	if n := len(e.store.runRecords(dagID(e.load(spec)))); n != keepRecords+1 {
		t.Errorf("%d run records kept, want the last %d and the full run's", n, keepRecords)
	}
	res, err := e.store.GC(context.Background(), GCOptions{KeepLast: keepRecords})
	if err != nil || len(res.Removed) != 0 {
		t.Fatalf("gc after %d partial runs removed %v (%v)", keepRecords+3, res.Removed, err)
	}
	for _, s := range full.Stages {
		if st, _, _ := e.store.Check(s.Key, false); st != Valid {
			t.Errorf("entry of %s removed", s.Name)
		}
	}
}

// TestGCKeepsWhatFailedRunsLost: runs whose stages failed (or were
// canceled by a failure) recorded keys with no entries; the entries the
// last good run made for those stages stay, whatever --keep-last says.
func TestGCKeepsWhatFailedRunsLost(t *testing.T) {
	e := newTestEnv(t)
	e.write("data.txt", "v1")
	spec := e.write("chain.yaml", chainSpec)
	good := e.mustRun(spec, Options{})
	e.write("chain.yaml", strings.Replace(chainSpec, "kind: double", "kind: fail\n    with: {after_batches: 1}", 1))
	for range 2 {
		if _, err := e.run(spec, Options{}); err == nil {
			t.Fatal("the failing run succeeded")
		}
	}
	res, err := e.store.GC(context.Background(), GCOptions{KeepLast: 2})
	if err != nil || len(res.Removed) != 0 {
		t.Fatalf("gc --keep-last 2 after two failed runs removed %v (%v)", res.Removed, err)
	}
	for _, s := range good.Stages {
		if st, _, _ := e.store.Check(s.Key, false); st != Valid {
			t.Errorf("entry of %s removed", s.Name)
		}
	}
}

func TestScratchSurvivesFailedAttempts(t *testing.T) {
	e := newTestEnv(t)
	spec := e.write("resume.yaml", "name: resume\nstages:\n  train: {kind: resume}\n")
	for i := 1; i <= 2; i++ {
		if _, err := e.run(spec, Options{}); err == nil || !strings.Contains(err.Error(), "interrupted") {
			t.Fatalf("attempt %d: %v", i, err)
		}
	}
	// The plan says that the next attempt resumes.
	plan, err := e.store.Plan(e.load(spec), Options{})
	if err != nil || !strings.Contains(plan.Step("train").Reason, "it resumes an interrupted attempt (2 attempts made)") {
		t.Errorf("plan after two interrupted attempts: %q (%v)", plan.Step("train").Reason, err)
	}
	rec := e.mustRun(spec, Options{})
	got, _ := os.ReadFile(filepath.Join(e.store.EntryDir(keyOfStage(rec, "train")), "attempts.txt"))
	if string(got) != "3" {
		t.Fatalf("third attempt saw %q attempts", got)
	}
	if _, err := os.Stat(e.store.scratchDir(keyOfStage(rec, "train"))); !os.IsNotExist(err) {
		t.Errorf("scratch folder kept after commit: %v", err)
	}
}

// TestForceStartsClean: --force STAGE does not resume from what an earlier
// attempt left in the stage's scratch folder (a checkpoint of a run the
// user wants redone).
func TestForceStartsClean(t *testing.T) {
	e := newTestEnv(t)
	spec := e.write("resume.yaml", "name: resume\nstages:\n  train: {kind: resume}\n")
	for i := 1; i <= 2; i++ {
		if _, err := e.run(spec, Options{}); err == nil || !strings.Contains(err.Error(), "interrupted") {
			t.Fatalf("attempt %d: %v", i, err)
		}
	}
	if _, err := e.run(spec, Options{Force: []string{"train"}}); err == nil || !strings.Contains(err.Error(), "attempt 1 interrupted") {
		t.Fatalf("forced run resumed: %v", err)
	}
}

// TestVerifyScratch: checkpoints in the scratch area (they carry
// SHA256SUMS) are verified too; folders being written and folders set
// aside are left alone.
func TestVerifyScratch(t *testing.T) {
	e := newTestEnv(t)
	key := strings.Repeat("ab", 32)
	ck := filepath.Join(e.store.scratchDir(key), "checkpoints")
	for _, name := range []string{"step-1", "step-2", ".step-3.tmp1", "damaged-step-0"} {
		dir := filepath.Join(ck, name)
		os.MkdirAll(filepath.Join(dir, "adapter"), 0o755)
		os.WriteFile(filepath.Join(dir, "state.json"), []byte(`{"step": 1}`), 0o644)
		os.WriteFile(filepath.Join(dir, "adapter", "w.bin"), []byte("weights"), 0o644)
		if err := dirsum.Write(dir); err != nil {
			t.Fatal(err)
		}
		if name != "step-1" {
			os.WriteFile(filepath.Join(dir, "adapter", "w.bin"), []byte("weighs"), 0o644)
		}
	}
	dirsum.SetAside(filepath.Join(ck, "damaged-step-0"), "test")
	bad, checked := e.store.VerifyScratch(nil)
	if checked != 2 || len(bad) != 1 || bad[0].Key != key || bad[0].Scratch != filepath.Join(ck, "step-2") ||
		!strings.Contains(bad[0].Err.Error(), "adapter/w.bin does not match its digest") {
		t.Fatalf("checked %d, damaged %+v", checked, bad)
	}
	if bad, checked := e.store.VerifyScratch([]string{strings.Repeat("cd", 32)}); checked != 0 || len(bad) != 0 {
		t.Errorf("another key: %d %v", checked, bad)
	}
}

// TestPlanReasonsNameOnlyWhatChanged: changing one parameter blames that
// one; list parameters used to be blamed every time (the run record keeps
// them re-indented, which compared unequal).
func TestPlanReasonsNameOnlyWhatChanged(t *testing.T) {
	e := newTestEnv(t)
	spec := e.write("s.yaml", "name: s\nstages:\n  src: {kind: gen, with: {rows: 5, tags: [a, b]}}\n")
	e.mustRun(spec, Options{})
	e.write("s.yaml", "name: s\nstages:\n  src: {kind: gen, with: {rows: 6, tags: [a, b]}}\n")
	plan, err := e.store.Plan(e.load(spec), Options{})
	if err != nil {
		t.Fatal(err)
	}
	if got := plan.Step("src").Reason; got != "parameters changed: rows" {
		t.Errorf("reason %q, want only rows", got)
	}
	e.write("s.yaml", "name: s\nstages:\n  src: {kind: gen, with: {rows: 5, tags: [a, c]}}\n")
	plan, _ = e.store.Plan(e.load(spec), Options{})
	if got := plan.Step("src").Reason; got != "parameters changed: tags" {
		t.Errorf("reason %q, want only tags", got)
	}
}

// TestForceReplacesWithoutWindow: while run --force replaces an entry,
// readers always find one (the old or the new), never none. Before, the old
// entry was deleted first and then the new one renamed into place.
func TestForceReplacesWithoutWindow(t *testing.T) {
	e := newTestEnv(t)
	spec := e.write("s.yaml", "name: s\nstages:\n  src: {kind: gen, with: {rows: 5, files: 60}}\n")
	rec := e.mustRun(spec, Options{})
	key := keyOfStage(rec, "src")
	manifest := filepath.Join(e.store.EntryDir(key), manifestName)
	stop := make(chan struct{})
	missing := make(chan int, 1)
	go func() {
		n := 0
		for {
			select {
			case <-stop:
				missing <- n
				return
			default:
			}
			if _, err := os.Stat(manifest); err != nil {
				n++
			}
		}
	}()
	for i := 0; i < 4; i++ {
		if rec := e.mustRun(spec, Options{Force: []string{"src"}}); stateOfStage(rec, "src") != "computed" {
			t.Fatalf("forced run %d: %s", i, stateOfStage(rec, "src"))
		}
	}
	close(stop)
	if n := <-missing; n > 0 {
		t.Errorf("readers found the entry missing %d times during forced runs", n)
	}
	if state, _, err := e.store.Check(key, true); state != Valid {
		t.Errorf("entry after forced runs: %v %v", state, err)
	}
	if ents, _ := os.ReadDir(filepath.Join(e.store.Root, "tmp")); len(ents) != 0 {
		t.Errorf("left in tmp: %v", ents)
	}
}

// TestTwinStagesComputeOnce: two stages of one kind, parameters and inputs
// have one key; the run computes the entry once and serves both (it used
// to wait forever on the entry's lock, taken twice), streams included, and
// a failure of the one cancels what needs the other.
func TestTwinStagesComputeOnce(t *testing.T) {
	defer goleak.VerifyNone(t)
	e := newTestEnv(t)
	spec := e.write("twins.yaml", `name: twins
stages:
  src: {kind: gen, with: {rows: 500, batch: 7}}
  a: {kind: double, needs: [src]}
  b: {kind: double, needs: [src]}
  c: {kind: double, needs: [src]}
  after_b: {kind: count, needs: [b]}
`)
	plan, err := e.store.Plan(e.load(spec), Options{})
	if err != nil {
		t.Fatal(err)
	}
	for _, st := range plan.Steps {
		if (st.Node.Name == "b" || st.Node.Name == "c") && st.Reason != "the same entry as stage a, computed once" {
			t.Errorf("plan: %s %q", st.Node.Name, st.Reason)
		}
	}
	rec := e.mustRunWithin(spec, Options{}, 30*time.Second)
	computed, served := 0, 0
	for _, st := range rec.Stages {
		switch {
		case st.Name == "a" || st.Name == "b" || st.Name == "c":
			if st.State == "computed" {
				computed++
			} else if st.State == "cached" && strings.HasPrefix(st.Reason, "the same entry as stage ") && st.Rows == 500 {
				served++
			}
		case st.State != "computed":
			t.Errorf("%s: %s", st.Name, st.State)
		}
	}
	if computed != 1 || served != 2 {
		t.Errorf("a, b, c: %d computed and %d served, want 1 and 2: %+v", computed, served, rec.Stages)
	}
	if keys, _ := e.store.Keys(); len(keys) != 3 {
		t.Errorf("%d entries, want src's, the doubled rows' and after_b's", len(keys))
	}

	bad := e.write("badtwins.yaml", `name: badtwins
stages:
  src: {kind: gen, with: {rows: 100, batch: 10, tags: [twins]}}
  x: {kind: fail, needs: [src], with: {after_batches: 1}}
  y: {kind: fail, needs: [src], with: {after_batches: 1}}
  after_x: {kind: count, needs: [x]}
  after_y: {kind: count, needs: [y]}
`)
	rec, err = e.run(bad, Options{})
	if err == nil {
		t.Fatal("the failing twins succeeded")
	}
	failed, canceled := 0, 0
	for _, st := range rec.Stages {
		switch st.State {
		case "failed":
			failed++
		case "canceled":
			canceled++
		}
	}
	if failed != 1 || canceled != 3 || strings.Count(err.Error(), "stage x (fail)")+strings.Count(err.Error(), "stage y (fail)") != 1 {
		t.Errorf("%d failed, %d canceled (want 1 and 3: the twin and both counts); %v", failed, canceled, err)
	}
}

// waitSpec has a stage, both, that reads the committed entries of a slow
// stage computing beside it, and one, streamed, that is fed its stream.
const waitSpec = `name: wait
stages:
  slow: {kind: gen, with: {rows: 20, batch: 1, delay_ms: 25}}
  fast: {kind: gen, with: {rows: 5, batch: 5, tags: [fast]}}
  both: {kind: concat, needs: [slow, fast]}
  streamed: {kind: double, needs: [slow]}
`

// TestWaitSecondsApart: a stage that reads the committed entries of stages
// computing beside it records the time it waited for them apart from its
// own; one fed by a stream waits on nothing.
func TestWaitSecondsApart(t *testing.T) {
	defer goleak.VerifyNone(t)
	e := newTestEnv(t)
	spec := e.write("wait.yaml", waitSpec)
	rec := e.mustRun(spec, Options{})
	for _, st := range rec.Stages {
		switch st.Name {
		case "both":
			if st.WaitSeconds < 0.3 || st.WaitSeconds > st.Seconds {
				t.Errorf("both waited %.3fs of %.3fs, want most of slow's ~0.5s", st.WaitSeconds, st.Seconds)
			}
			// The entry's manifest keeps the wait apart too, for the
			// report of the nights it is cached.
			m, err := ReadManifest(e.store.EntryDir(st.Key))
			if err != nil || m.WaitSeconds() < 0.3 || m.WaitSeconds() > m.Seconds {
				t.Errorf("both's manifest: waited %.3fs of %.3fs (%v)", m.WaitSeconds(), m.Seconds, err)
			}
		default:
			if st.WaitSeconds != 0 {
				t.Errorf("%s waited %.3fs", st.Name, st.WaitSeconds)
			}
		}
	}
}

// TestProgressSaysWaiting: while a stage waits for another's entry, its
// progress says which, instead of the rows it has read so far as work, and
// the log (cron's) leaves it out: a line per computing stage.
func TestProgressSaysWaiting(t *testing.T) {
	defer goleak.VerifyNone(t)
	e := newTestEnv(t)
	spec := e.write("wait.yaml", waitSpec)
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	var mu sync.Mutex
	var shown []string
	display := displayFunc(func(ts []*Tracker) func() {
		stop := make(chan struct{})
		done := make(chan struct{})
		go func() {
			defer close(done)
			for {
				select {
				case <-stop:
					return
				case <-time.After(10 * time.Millisecond):
				}
				for _, tr := range ts {
					if s := tr.Snapshot(); s.Running {
						mu.Lock()
						shown = append(shown, tr.Name+": "+s.String())
						mu.Unlock()
					}
				}
			}
		}()
		return func() { close(stop); <-done }
	})
	for _, d := range []Display{LogDisplay{Log: log, Every: 20 * time.Millisecond}, display} {
		eng := &Engine{Store: e.store, Progress: d}
		if _, err := eng.Run(context.Background(), e.load(spec), Options{Force: []string{"all"}}); err != nil {
			t.Fatal(err)
		}
	}
	// both may log once it computes, after slow's entry is committed: a
	// line of both before slow's last one was logged while it waited.
	lines := strings.Split(logs.String(), "\n")
	lastSlow := -1
	for i, line := range lines {
		if strings.Contains(line, "stage=slow rows=") {
			lastSlow = i
		}
	}
	if lastSlow < 0 {
		t.Errorf("no lines of slow's rows:\n%s", logs.String())
	}
	for _, line := range lines[:max(lastSlow, 0)] {
		if strings.Contains(line, "stage=both") {
			t.Errorf("a waiting stage logged: %s", line)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if !slices.Contains(shown, "both: waiting for stage slow") {
		t.Errorf("both never shown waiting for slow: %q", shown)
	}
}

// displayFunc is a Display made of its Start.
type displayFunc func(ts []*Tracker) func()

func (f displayFunc) Start(ts []*Tracker) func() { return f(ts) }

// TestRateLeavesOutWaiting: a stage that waited two hours for training and
// then answered 10 questions in 10 s has an ETA from its 1 question a
// second, not from the two hours.
func TestRateLeavesOutWaiting(t *testing.T) {
	p := Progress{Rows: 10, Total: 20, Elapsed: 2*time.Hour + 10*time.Second, Waited: 2 * time.Hour, Running: true}
	if r := p.Rate(); r != 1 {
		t.Errorf("rate %v, want 1", r)
	}
	if eta, ok := p.ETA(); !ok || eta != 10*time.Second {
		t.Errorf("ETA %v %v, want 10s", eta, ok)
	}
}

// TestRunWaitsForGCSaying: a run finding gc at work on its cache says that
// it waits for it, and with NoWait does not wait (busy, as when another run
// holds the DAG).
func TestRunWaitsForGCSaying(t *testing.T) {
	e := newTestEnv(t)
	e.write("data.txt", "v1")
	spec := e.write("chain.yaml", chainSpec)
	gc := e.store.gcLock() // what gc holds
	if ok, err := gc.TryLock(); !ok || err != nil {
		t.Fatal(ok, err)
	}
	eng := &Engine{Store: e.store, NoWait: true}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	rec, err := eng.Run(ctx, e.load(spec), Options{})
	if !IsBusy(err) || !strings.Contains(err.Error(), "gc is cleaning this cache") {
		t.Fatalf("NoWait beside gc: %v", err)
	}
	// Its report lists no stages as a list, as other reports do.
	if b, _ := json.Marshal(rec); !strings.Contains(string(b), `"stages":[]`) {
		t.Errorf("a busy run's record: %s", b)
	}
	var logs lockedBuffer
	eng = &Engine{Store: e.store, Log: slog.New(slog.NewTextHandler(&logs, nil))}
	done := make(chan error, 1)
	go func() { _, err := eng.Run(context.Background(), e.load(spec), Options{}); done <- err }()
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(logs.String(), "waiting for gc to finish"); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the run waits without a word: %q", logs.String())
		}
	}
	gc.Unlock()
	if err := <-done; err != nil {
		t.Fatalf("the run after gc: %v", err)
	}
}

// TestGCWaitsSaying: gc waits for the runs that hold the cache and says
// so, or with NoWait does not wait; a dry run, which removes nothing, does
// not wait.
func TestGCWaitsSaying(t *testing.T) {
	e := newTestEnv(t)
	e.write("data.txt", "v1")
	e.mustRun(e.write("chain.yaml", chainSpec), Options{})
	if res, err := e.store.GC(context.Background(), GCOptions{KeepLast: 1, DryRun: true}); err != nil || res.RunsActive {
		t.Fatalf("dry run alone: %+v %v", res, err)
	}
	run := e.store.gcLock() // what a run holds
	if ok, err := run.TryRLock(); !ok || err != nil {
		t.Fatal(ok, err)
	}
	defer run.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	// It says that runs are on, and keeps what they made since the last
	// record (here one entry, made after it), as gc, waiting, would.
	keys, _ := e.store.Keys()
	later := time.Now().Add(time.Minute)
	if err := os.Chtimes(e.store.EntryDir(keys[0]), later, later); err != nil {
		t.Fatal(err)
	}
	if res, err := e.store.GC(ctx, GCOptions{KeepLast: 0, DryRun: true}); err != nil || !res.RunsActive || res.Kept != 1 || len(res.Removed) != 2 {
		t.Fatalf("dry run beside a run: %+v %v", res, err)
	}
	var logs bytes.Buffer
	ctx, cancel = context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	_, err := e.store.GC(ctx, GCOptions{KeepLast: 0, Log: slog.New(slog.NewTextHandler(&logs, nil))})
	if err == nil || !strings.Contains(err.Error(), "waiting for the runs using cache") {
		t.Errorf("gc beside a run: %v", err)
	}
	if !strings.Contains(logs.String(), "waiting for the runs using this cache to finish") {
		t.Errorf("gc waited without a word: %q", logs.String())
	}
	// With NoWait it does not wait: busy, as a run with NoWait is.
	if _, err := e.store.GC(context.Background(), GCOptions{KeepLast: 0, NoWait: true}); !IsBusy(err) || !strings.Contains(err.Error(), "runs are using this cache") {
		t.Errorf("gc with NoWait beside a run: %v", err)
	}
	if keys, _ := e.store.Keys(); len(keys) != 3 {
		t.Errorf("%d entries left, want the 3 the run made", len(keys))
	}
}

// TestLockPermissionHint: a lock the user may not open (a cache another
// user's cron job made) says whose the cache is and what to do.
func TestLockPermissionHint(t *testing.T) {
	e := newTestEnv(t)
	err := fmt.Errorf("the cache's gc lock: %w%s", &fs.PathError{Op: "open", Path: "gc.lock", Err: fs.ErrPermission},
		e.store.permissionHint(&fs.PathError{Op: "open", Path: "gc.lock", Err: fs.ErrPermission}))
	if !strings.Contains(err.Error(), "this user may not write in the cache "+e.store.Root+", another user's most likely: run as its owner, or give this one a cache of its own with --cache or $PIPELINE_CACHE") {
		t.Errorf("%v", err)
	}
	if h := e.store.permissionHint(errors.New("disk on fire")); h != "" {
		t.Errorf("a hint for another error: %q", h)
	}
}

// TestCanceledStageSaysBy: a stage stopped while computing records what
// stopped it, not "context canceled".
func TestCanceledStageSaysBy(t *testing.T) {
	e := newTestEnv(t)
	dag := e.load(e.write("c.yaml", "name: c\nstages:\n  src: {kind: gen, with: {rows: 400, batch: 20, delay_ms: 8}}\n"))
	ctx, cancel := context.WithCancelCause(context.Background())
	time.AfterFunc(100*time.Millisecond, func() { cancel(testSignal{}) })
	rec, err := (&Engine{Store: e.store}).Run(ctx, dag, Options{})
	if err == nil || rec == nil {
		t.Fatalf("run: %v", err)
	}
	if st := rec.Stages[0]; st.State != "canceled" || !strings.Contains(st.Error, "interrupted by SIGTERM") || strings.Contains(st.Error, "context canceled") {
		t.Errorf("stage %s: %q", st.State, st.Error)
	}
}
