package pipeline

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Tests in this file run DAGs in child processes (this test binary, started
// again with PIPELINE_TEST_CHILD set), to kill them or run them side by side.

func TestMain(m *testing.M) {
	if spec := os.Getenv("PIPELINE_TEST_CHILD"); spec != "" {
		os.Exit(childRun(spec))
	}
	os.Exit(m.Run())
}

// childRun runs spec against PIPELINE_TEST_CACHE and writes the run record
// to PIPELINE_TEST_REPORT.
func childRun(spec string) int {
	st, err := OpenStore(os.Getenv("PIPELINE_TEST_CACHE"))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	dag, err := Load(spec, testRegistry())
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	eng := &Engine{Store: st, NoWait: os.Getenv("PIPELINE_TEST_NOWAIT") != ""}
	rec, err := eng.Run(context.Background(), dag, Options{})
	if p := os.Getenv("PIPELINE_TEST_REPORT"); p != "" {
		data, _ := json.Marshal(rec)
		os.WriteFile(p, data, 0o644)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		if IsBusy(err) {
			return 75
		}
		return 1
	}
	return 0
}

func childCmd(t *testing.T, spec, cache, report string, extraEnv ...string) *exec.Cmd {
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "PIPELINE_TEST_CHILD="+spec, "PIPELINE_TEST_CACHE="+cache, "PIPELINE_TEST_REPORT="+report)
	cmd.Env = append(cmd.Env, extraEnv...)
	return cmd
}

// slowSpec takes a few hundred milliseconds, with batches written all the
// way through, so kills land in every phase: hashing, writing, committing.
const slowSpec = `name: slow
stages:
  src: {kind: gen, with: {rows: 400, batch: 20, delay_ms: 8, file: data.txt}}
  twice: {kind: double, needs: [src], with: {delay_ms: 3}}
  thrice: {kind: double, needs: [src], with: {factor: 3}}
  both: {kind: concat, needs: [twice, thrice]}
  total: {kind: count, needs: [both]}
`

// outputDigests maps each stage of a finished run to its outputs' digests.
func outputDigests(t *testing.T, st *Store, dag *DAG) map[string]string {
	t.Helper()
	plan, err := st.Plan(dag, Options{})
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, s := range plan.Steps {
		state, m, err := st.Check(s.Key, true)
		if state != Valid {
			t.Fatalf("stage %s: entry %v (%v)", s.Node.Name, state, err)
		}
		var sums []string
		for _, o := range m.Outputs {
			sums = append(sums, o.Path+"="+o.SHA256)
		}
		sort.Strings(sums)
		out[s.Node.Name] = strings.Join(sums, ",")
	}
	return out
}

func TestCrashSafety(t *testing.T) {
	if testing.Short() {
		t.Skip("kills child processes many times")
	}
	e := newTestEnv(t)
	e.write("data.txt", "crash-")
	spec := e.write("slow.yaml", slowSpec)
	dag := e.load(spec)

	// The reference: one uninterrupted run in its own store.
	refCache := filepath.Join(e.dir, "ref-cache")
	if out, err := childCmd(t, spec, refCache, "").CombinedOutput(); err != nil {
		t.Fatalf("uninterrupted run: %v\n%s", err, out)
	}
	ref, _ := OpenStore(refCache)
	want := outputDigests(t, ref, dag)

	cache := filepath.Join(e.dir, "crash-cache")
	rng := rand.New(rand.NewPCG(1, 2))
	midRun := 0 // kills that found the run unfinished
	for i := 0; i < 25; i++ {
		cmd := childCmd(t, spec, cache, "")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Duration(rng.IntN(400)) * time.Millisecond)
		cmd.Process.Signal(syscall.SIGKILL)
		cmd.Wait()

		// Whatever was committed must be whole: verify re-hashes all.
		st, err := OpenStore(cache)
		if err != nil {
			t.Fatal(err)
		}
		bad, n, err := st.Verify(nil)
		if err != nil || len(bad) > 0 {
			t.Fatalf("after kill %d: damaged entries %v (%v)", i, bad, err)
		}
		if n < len(dag.Nodes) {
			midRun++
		} else {
			// Finished before the kill: start over, so the next kill
			// lands in a run again.
			os.RemoveAll(cache)
		}
	}
	if out, err := childCmd(t, spec, cache, "").CombinedOutput(); err != nil {
		t.Fatalf("run after kills: %v\n%s", err, out)
	}
	st, _ := OpenStore(cache)
	got := outputDigests(t, st, dag)
	for name, w := range want {
		if got[name] != w {
			t.Errorf("stage %s: outputs after kills differ from an uninterrupted run", name)
		}
	}
	if midRun == 0 {
		t.Error("no kill landed before the run finished; the test proves nothing")
	}
	t.Logf("%d of 25 kills landed mid-run", midRun)
}

func TestConcurrentRunsComputeOnce(t *testing.T) {
	e := newTestEnv(t)
	e.write("data.txt", "conc-")
	spec := e.write("slow.yaml", slowSpec)
	// A second DAG file sharing the src and twice stages: its own lock, so
	// only the per-entry locks keep the shared stages from being computed twice.
	other := e.write("other.yaml", strings.Replace(slowSpec, "name: slow", "name: other", 1)+
		"  extra: {kind: double, needs: [both]}\n")
	cache := filepath.Join(e.dir, "cache2")

	var cmds []*exec.Cmd
	var reports []string
	for i, s := range []string{spec, spec, other} {
		rep := filepath.Join(e.dir, fmt.Sprintf("report%d.json", i))
		cmd := childCmd(t, s, cache, rep)
		var out strings.Builder
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		cmds = append(cmds, cmd)
		reports = append(reports, rep)
	}
	for i, c := range cmds {
		if err := c.Wait(); err != nil {
			t.Fatalf("run %d failed: %v\n%s", i, err, c.Stdout)
		}
	}
	computed := map[string]int{}
	for _, rep := range reports {
		data, err := os.ReadFile(rep)
		if err != nil {
			t.Fatal(err)
		}
		var rec RunRecord
		if err := json.Unmarshal(data, &rec); err != nil {
			t.Fatal(err)
		}
		for _, s := range rec.Stages {
			if s.State == "computed" {
				computed[s.Key]++
			}
			if s.State != "computed" && s.State != "cached" {
				t.Errorf("stage %s ended %s", s.Name, s.State)
			}
		}
	}
	for k, n := range computed {
		if n != 1 {
			t.Errorf("entry %s computed %d times", ShortKey(k), n)
		}
	}
	if len(computed) != 6 {
		t.Errorf("%d entries computed, want 6 (5 shared + extra)", len(computed))
	}
	st, _ := OpenStore(cache)
	if bad, n, _ := st.Verify(nil); len(bad) > 0 || n != 6 {
		t.Fatalf("verify: %d entries, damaged %v", n, bad)
	}
}

func TestNoWaitWhenBusy(t *testing.T) {
	e := newTestEnv(t)
	e.write("data.txt", "busy-")
	spec := e.write("slow.yaml", slowSpec)
	cache := filepath.Join(e.dir, "cache3")
	first := childCmd(t, spec, cache, "")
	if err := first.Start(); err != nil {
		t.Fatal(err)
	}
	defer first.Wait()
	// Wait until the first run holds the DAG lock.
	holder := filepath.Join(cache, "locks", "dag-"+dagID(e.load(spec))+".holder")
	for i := 0; i < 200; i++ {
		if _, err := os.Stat(holder); err == nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	second := childCmd(t, spec, cache, "", "PIPELINE_TEST_NOWAIT=1")
	out, err := second.CombinedOutput()
	ee, ok := err.(*exec.ExitError)
	if !ok || ee.ExitCode() != 75 {
		t.Fatalf("second run with NoWait: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "another run of this DAG is in progress") || !strings.Contains(string(out), "pid") {
		t.Errorf("message: %s", out)
	}
}

// TestStatusAfterKill: a run killed with SIGKILL (or by the OOM killer)
// leaves no record; status says that it did not finish, naming it, instead
// of showing the run before it as the last one. A run that ends, well or
// not, is not reported so.
func TestStatusAfterKill(t *testing.T) {
	e := newTestEnv(t)
	e.write("data.txt", "kill-")
	spec := e.write("slow.yaml", slowSpec)
	dag := e.load(spec)
	cache := filepath.Join(e.dir, "cache")
	if out, err := childCmd(t, spec, cache, "").CombinedOutput(); err != nil {
		t.Fatalf("first run: %v\n%s", err, out)
	}
	st, _ := OpenStore(cache)
	if s, err := st.Status(dag); err != nil || s.Unfinished != "" || s.Last == nil || !s.Last.OK {
		t.Fatalf("after a run that finished: %+v %v", s, err)
	}

	e.write("data.txt", "kill-again-") // something to compute
	cmd := childCmd(t, spec, cache, "")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// Kill it once it holds the lock and computes.
	deadline := time.Now().Add(10 * time.Second)
	for {
		if running, _ := st.lockHolder(dag); running != "" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the child never took the lock")
		}
		time.Sleep(5 * time.Millisecond)
	}
	// ... and has committed an entry of its own.
	before, _ := st.Keys()
	for keys, _ := st.Keys(); len(keys) == len(before); keys, _ = st.Keys() {
		if time.Now().After(deadline) {
			t.Fatal("the child committed no entry")
		}
		time.Sleep(5 * time.Millisecond)
	}
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
	// gc keeps what the killed run made (its run is in no record), which
	// the next run would otherwise compute again.
	if res, err := st.GC(context.Background(), GCOptions{KeepLast: 1}); err != nil || len(res.Removed) != 0 {
		t.Errorf("gc after the kill removed %v (%v)", res.Removed, err)
	}
	s, err := st.Status(dag)
	if err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf("pid %d on ", cmd.Process.Pid); s.RunningBy != "" || !strings.HasPrefix(s.Unfinished, want) {
		t.Fatalf("after SIGKILL: running %q, unfinished %q, want %q...", s.RunningBy, s.Unfinished, want)
	}
	if s.Last == nil || !s.Last.OK {
		t.Errorf("the last finished run should be the first: %+v", s.Last)
	}

	// The next run says so in its log, finishes, and clears it.
	if out, err := childCmd(t, spec, cache, "").CombinedOutput(); err != nil {
		t.Fatalf("run after the kill: %v\n%s", err, out)
	}
	if s, _ := st.Status(dag); s.Unfinished != "" {
		t.Errorf("after a run that finished: unfinished %q", s.Unfinished)
	}
	if k := st.killedRunsKeys(); len(k) != 0 {
		t.Errorf("a run that finished left its planned keys: %v", k)
	}
	// ... and records the killed run as the night it was: what it computed
	// before the kill, and the rest not done.
	runs := st.Runs(dag, 0)
	if len(runs) != 3 || !runs[0].OK || runs[2] == nil || !runs[2].OK {
		t.Fatalf("%d runs recorded, want the first, the killed one and the last", len(runs))
	}
	killed, computed := runs[1], 0
	if killed.OK || !strings.Contains(killed.Error, "did not finish: it was killed") || killed.Finished.Before(killed.Started) ||
		!killed.Started.After(runs[2].Finished) || !killed.Finished.Before(runs[0].Started) {
		t.Errorf("the killed run's record: ok %v, %q, %v to %v", killed.OK, killed.Error, killed.Started, killed.Finished)
	}
	for _, s := range killed.Stages {
		_, err := ReadManifest(st.EntryDir(s.Key))
		switch {
		case s.State == "computed" && err == nil:
			computed++
		case s.State == "canceled" && s.Error != "":
		default:
			t.Errorf("killed run's stage %s: %s (%v)", s.Name, s.State, err)
		}
	}
	if computed == 0 || len(killed.Stages) != 5 {
		t.Errorf("the killed run computed %d of %d stages, want the entry it committed", computed, len(killed.Stages))
	}
	// A failed run is recorded, not unfinished.
	e.write("data.txt", "x")
	os.WriteFile(spec, []byte("name: slow\nstages:\n  src: {kind: gen, with: {rows: 3, file: data.txt}}\n  f: {kind: fail, needs: [src]}\n"), 0o644)
	childCmd(t, spec, cache, "").Run()
	if s, _ := st.Status(e.load(spec)); s.Unfinished != "" || s.Last == nil || s.Last.OK {
		t.Errorf("after a failed run: unfinished %q, last %+v", s.Unfinished, s.Last)
	}
}

// TestStatusAfterLostRecord: a run whose record cannot be written (a full
// disk) is reported by status as not finished, not hidden behind the run
// before it, and the next run that is recorded clears that.
func TestStatusAfterLostRecord(t *testing.T) {
	e := newTestEnv(t)
	e.write("data.txt", "a-")
	spec := e.write("two.yaml", "name: two\nstages:\n  src: {kind: gen, with: {rows: 3, file: data.txt}}\n")
	dag := e.load(spec)
	e.mustRun(spec, Options{})

	// The records' folder made a file: the record cannot be written.
	runs := filepath.Join(e.store.Root, "runs", dagID(dag))
	if err := os.RemoveAll(runs); err != nil {
		t.Fatal(err)
	}
	e.write("runs-blocker", "")
	if err := os.Rename(filepath.Join(e.dir, "runs-blocker"), runs); err != nil {
		t.Fatal(err)
	}
	e.write("data.txt", "b-")
	e.mustRun(spec, Options{})
	s, err := e.store.Status(dag)
	if err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf("pid %d on ", os.Getpid()); !strings.HasPrefix(s.Unfinished, want) {
		t.Fatalf("after a run whose record was lost: unfinished %q, want %q...", s.Unfinished, want)
	}

	// Nor can the holder note be written (a disk full before the run
	// began): the warnings say so, not that status will show the run.
	holder := e.store.dagLockBase(dag) + ".holder"
	os.Remove(holder)
	if err := os.MkdirAll(filepath.Join(holder, "blocker"), 0o755); err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	e.write("data.txt", "c-")
	eng := &Engine{Store: e.store, Log: slog.New(slog.NewTextHandler(&logs, nil))}
	if _, err := eng.Run(context.Background(), e.load(spec), Options{}); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(logs.String(), "cannot write to the cache") || !strings.Contains(logs.String(), "could not record the run, nor note it: status shows the run before it") ||
		strings.Contains(logs.String(), "status will say that it did not finish") {
		t.Errorf("a run neither noted nor recorded:\n%s", logs.String())
	}
	os.RemoveAll(holder)

	if err := os.Remove(runs); err != nil {
		t.Fatal(err)
	}
	e.mustRun(spec, Options{})
	if s, _ := e.store.Status(dag); s.Unfinished != "" || s.Last == nil || !s.Last.OK {
		t.Errorf("after a run that was recorded: unfinished %q, last %+v", s.Unfinished, s.Last)
	}
}

// TestUnfinishedRunBeforeItsFirstEntry: a run killed before it committed
// anything is recorded as lasting until the last file it was writing, not
// for a negative time (its holder note has whole seconds, its plan finer).
func TestUnfinishedRunBeforeItsFirstEntry(t *testing.T) {
	e := newTestEnv(t)
	e.write("data.txt", "x")
	dag := e.load(e.write("s.yaml", slowSpec))
	since := time.Now().Add(-time.Minute).Truncate(time.Second)
	started := since.Add(700 * time.Millisecond)
	planned, _ := json.Marshal(&RunRecord{Started: started, Stages: []StageRecord{{Name: "slow", Key: "k1", State: "canceled"}}})
	if err := os.WriteFile(e.store.dagLockBase(dag)+".keys", planned, 0o644); err != nil {
		t.Fatal(err)
	}
	wrote := started.Add(3 * time.Second)
	killedWhileWriting(t, e, dag, "k1", since, wrote)
	runs := e.store.Runs(dag, 0)
	if len(runs) != 1 || !runs[0].Started.Equal(started) || !runs[0].Finished.Equal(wrote) || runs[0].Seconds != 3 {
		t.Fatalf("recorded %+v, want a run from %v to %v", runs, started, wrote)
	}
}

// TestUnfinishedForcedRun: a killed run that was computing a stage again
// (--force) is not recorded as having found it cached.
func TestUnfinishedForcedRun(t *testing.T) {
	e := newTestEnv(t)
	spec := e.write("f.yaml", "name: f\nstages:\n  a: {kind: gen}\n  b: {kind: double, needs: [a]}\n")
	if _, err := e.run(spec, Options{}); err != nil {
		t.Fatal(err)
	}
	dag := e.load(spec)
	plan, err := e.store.Plan(dag, Options{Force: []string{"b"}})
	if err != nil {
		t.Fatal(err)
	}
	since := time.Now().Add(time.Second).Truncate(time.Second)
	rec := &RunRecord{Started: since}
	for _, st := range plan.Steps {
		rec.Stages = append(rec.Stages, StageRecord{Name: st.Node.Name, Key: st.Key})
	}
	e.store.notePlannedRun(dag, plan, rec)
	killedWhileWriting(t, e, dag, plan.Step("b").Key, since, since.Add(2*time.Second))
	runs := e.store.Runs(dag, 1)
	if len(runs) != 1 || runs[0].Seconds != 2 {
		t.Fatalf("%d runs (%+v), want one of 2 s", len(runs), runs)
	}
	for _, st := range runs[0].Stages {
		switch st.Name {
		case "a":
			if st.State != "cached" {
				t.Errorf("stage a: %s, want cached", st.State)
			}
		case "b":
			if st.State != "canceled" || !strings.Contains(st.Error, "forced") {
				t.Errorf("stage b, forced: %s (%s), want canceled", st.State, st.Error)
			}
		}
	}
}

// killedWhileWriting records the run of dag that took its lock at since as
// killed while it wrote key's output, last at wrote.
func killedWhileWriting(t *testing.T, e *testEnv, dag *DAG, key string, since, wrote time.Time) {
	t.Helper()
	half := filepath.Join(e.store.Root, "tmp", key+"-1")
	if err := os.MkdirAll(half, 0o755); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(half, "data.arrow")
	if err := os.WriteFile(out, []byte("part"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(out, wrote, wrote); err != nil {
		t.Fatal(err)
	}
	if err := e.store.recordUnfinished(dag, "pid 1 on host since "+since.UTC().Format(time.RFC3339)); err != nil {
		t.Fatal(err)
	}
}
