package pipeline

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"os"
	"runtime/debug"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/gofrs/flock"
)

// An Engine runs plans against a store.
type Engine struct {
	Store    *Store
	Log      *slog.Logger
	Progress Display // nil: no progress display
	// NoWait makes Run fail with a busy error (IsBusy) instead of waiting
	// when another run of the same DAG holds its lock, gc the cache, or
	// another run computes an entry this one needs.
	NoWait bool
	// Ranked says this run is one of several ranks of one training: an
	// entry another rank computes is this run's own, waited for even with
	// NoWait.
	Ranked bool
	// Collective, when set, makes this run a follower of another process
	// running the same DAG over the same cache, the one that holds the
	// DAG's lock and records the run: rank 0 of a training on several
	// GPUs. A follower takes no DAG lock and records nothing; it computes,
	// or waits for and finds cached, what it needs under the entries'
	// locks, and runs the stage named here, the one the ranks train
	// together and rank 0 writes, without that entry's lock.
	Collective string
}

// A RunRecord is what one run did; it is written as the run report and kept
// in the store for plan's reasons and for gc.
type RunRecord struct {
	DAG         string        `json:"dag"`
	Spec        string        `json:"spec"`
	Started     time.Time     `json:"started"`
	Finished    time.Time     `json:"finished"`
	Seconds     float64       `json:"seconds"`
	OK          bool          `json:"ok"`
	Interrupted bool          `json:"interrupted,omitempty"` // stopped by a signal or a canceled context
	Error       string        `json:"error,omitempty"`
	Program     string        `json:"program"`
	Cache       string        `json:"cache"`
	HashedBytes int64         `json:"hashed_bytes"`
	Stages      []StageRecord `json:"stages"`
}

// ErrWrittenElsewhere, returned by a Runner, says that the stage did its
// part and another process writes the entry: a rank other than 0 of a
// training run on several GPUs. The engine commits nothing and records the
// stage as "elsewhere"; nothing after it may run in this process.
var ErrWrittenElsewhere = errors.New("the entry is written by another process")

// A StageRecord is one stage's part in a run.
type StageRecord struct {
	Name        string `json:"name"`
	Kind        string `json:"kind"`
	KindVersion int    `json:"kind_version"`
	// KindRevision is the revision its parameters name (see Reviser).
	KindRevision int             `json:"kind_revision,omitempty"`
	Key          string          `json:"key"`
	State        string          `json:"state"` // cached, computed, elsewhere, failed, canceled, not selected
	Reason       string          `json:"reason,omitempty"`
	Params       json.RawMessage `json:"params"`
	Inputs       []InputRef      `json:"inputs"`
	Files        []FileRef       `json:"files"`
	Refs         []Ref           `json:"refs,omitempty"`
	Entry        string          `json:"entry,omitempty"`
	Rows         int64           `json:"rows"`
	Bytes        int64           `json:"bytes"`
	Seconds      float64         `json:"seconds"`
	// WaitSeconds is the part of Seconds the stage spent waiting for
	// inputs that other stages of the run were computing.
	WaitSeconds float64        `json:"wait_seconds,omitempty"`
	Stats       map[string]any `json:"stats,omitempty"`
	Error       string         `json:"error,omitempty"`
}

// hasEntry says whether the run left the stage an entry under its key: one
// it found cached or computed, or another process wrote.
func (r StageRecord) hasEntry() bool {
	return r.Key != "" && (r.State == "cached" || r.State == "computed" || r.State == "elsewhere")
}

// withoutNotes drops what a run said about how it resolved refs, which is
// no part of an entry.
func withoutNotes(refs []Ref) []Ref {
	var out []Ref
	for _, r := range refs {
		out = append(out, Ref{Name: r.Name, Revision: r.Revision})
	}
	return out
}

// Version is the program version written into manifests and reports.
func Version() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	var rev, dirty string
	for _, s := range bi.Settings {
		switch {
		case s.Key == "vcs.revision" && len(s.Value) >= 12:
			rev = "+" + s.Value[:12]
		case s.Key == "vcs.modified" && s.Value == "true":
			dirty = "-dirty" // built from a checkout with changes not committed
		}
	}
	if rev == "" {
		dirty = ""
	}
	return bi.Main.Version + rev + dirty
}

// Run runs dag: it takes the DAG's lock, plans, computes what is not cached
// and records the run. The returned record is filled in even on failure.
func (e *Engine) Run(ctx context.Context, dag *DAG, opts Options) (*RunRecord, error) {
	rec := &RunRecord{DAG: dag.Name, Spec: dag.Path, Started: time.Now().UTC(), Program: Version(), Cache: e.Store.Root}
	// The DAG's lock is let go only after the run is recorded, so that a
	// run is either recorded or, killed, still named by its lock's note.
	var unlock func(keepNote bool)
	unrecorded := false // the run's record could not be written
	defer func() {
		if unlock != nil {
			// A run whose record is lost (a full disk) keeps its holder
			// note, so that status says it did not finish instead of
			// showing the run before it.
			unlock(unrecorded)
		}
	}()
	noted := false // this run wrote its planned keys
	err := e.run(ctx, dag, opts, rec, &unlock, &noted)
	if rec.Stages == nil {
		rec.Stages = []StageRecord{} // a busy run's report: "stages": [], as every other one
	}
	rec.Finished = time.Now().UTC()
	rec.Seconds = rec.Finished.Sub(rec.Started).Seconds()
	rec.OK = err == nil
	if err != nil {
		rec.Error = err.Error()
		rec.Interrupted = errors.Is(err, context.Canceled)
	}
	rec.HashedBytes = e.Store.HashedBytes()
	// A run that was planned is worth keeping for plan's reasons and gc;
	// one refused as a usage error before anything ran is not a run, nor
	// one that found an entry it needs busy (NoWait), as one that finds
	// the DAG's lock held is not.
	if IsBusy(err) && noted {
		e.Store.forgetPlannedRun(dag)
	}
	if len(rec.Stages) > 0 && e.Collective == "" && recordable(err) && !IsBusy(err) {
		if recErr := e.Store.recordRun(dag, rec); recErr != nil {
			if fi, err := os.Stat(e.Store.dagLockBase(dag) + ".holder"); err == nil && fi.Mode().IsRegular() {
				e.log().Warn("could not record the run; status will say that it did not finish", "err", recErr)
			} else {
				e.log().Warn("could not record the run, nor note it: status shows the run before it as the last", "err", recErr)
			}
			unrecorded = true
		} else if noted {
			e.Store.forgetPlannedRun(dag)
		}
	}
	if saveErr := e.Store.stats.Save(); saveErr != nil && err == nil {
		e.log().Warn("could not save the file digest cache", "err", saveErr)
	}
	return rec, err
}

// recordable says whether a run that ended with err is kept in the
// history: one refused as a usage or spec error before anything ran is
// not a run, unless what the spec names was not found (a night whose
// input is gone failed).
func recordable(err error) bool { return !IsSpecError(err) || isUnresolved(err) }

// RecordUnstarted records a run of dag that the stages it selects, or
// those they read, stopped before it began (cause: a data file gone, a
// model folder missing), so that status and report say that the run failed
// instead of showing the one before it, and returns the record (for
// --report). Its stages have no keys: gc keeps, for each, the entry it last
// had. While another run of dag holds its lock, nothing is recorded:
// records sort by their start, and this one would pass for that run's.
func (s *Store) RecordUnstarted(dag *DAG, opts Options, cause error) (*RunRecord, error) {
	rec := UnstartedRecord(dag, opts, cause, s.Root)
	l := flock.New(s.dagLockBase(dag) + ".lock")
	if ok, err := l.TryLock(); err != nil || !ok {
		return rec, err
	}
	defer l.Unlock()
	return rec, s.recordRun(dag, rec)
}

// UnstartedRecord is the record of a run of dag that did not begin, over
// the cache at root.
func UnstartedRecord(dag *DAG, opts Options, cause error, root string) *RunRecord {
	now := time.Now().UTC()
	return &RunRecord{DAG: dag.Name, Spec: dag.Path, Started: now, Finished: now, Error: cause.Error(),
		Program: Version(), Cache: root, Stages: unstarted(dag, opts)}
}

// unstarted are the stage records of a run that did not begin: the stages
// it selects canceled, those their kind could not prepare failed.
func unstarted(dag *DAG, opts Options) []StageRecord {
	selected, keyed := map[*Node]bool{}, map[*Node]bool{}
	for _, n := range dag.Selected(opts) {
		selected[n] = true
	}
	for _, n := range dag.keyed(opts) {
		keyed[n] = true
	}
	out := make([]StageRecord, 0, len(dag.Nodes))
	for _, n := range dag.Nodes {
		r := StageRecord{Name: n.Name, Kind: n.KindName, KindVersion: n.Kind.Version(), KindRevision: n.revision(), Params: n.Canon, State: "not selected"}
		switch {
		case keyed[n] && n.Unprepared != nil:
			r.State, r.Error = "failed", n.Unprepared.Msg
		case selected[n]:
			r.State = "canceled"
		}
		out = append(out, r)
	}
	return out
}

func (e *Engine) log() *slog.Logger {
	if e.Log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return e.Log
}

func (e *Engine) run(ctx context.Context, dag *DAG, opts Options, rec *RunRecord, unlockDAG *func(keepNote bool), noted *bool) error {
	gc := e.Store.gcLock()
	ok, err := gc.TryRLock()
	if err != nil {
		return fmt.Errorf("the cache's gc lock: %w%s", err, e.Store.permissionHint(err))
	}
	if !ok {
		if e.NoWait {
			return fmt.Errorf("%s: %w", e.Store.Root, errGCBusy)
		}
		e.log().Info("waiting for gc to finish cleaning the cache", "cache", e.Store.Root)
		if _, err := gc.TryRLockContext(ctx, 100*time.Millisecond); err != nil {
			return fmt.Errorf("waiting for gc to finish: %w", err)
		}
	}
	defer gc.Unlock()

	if e.Collective == "" {
		unlock, err := e.Store.lockDAG(ctx, dag, e.NoWait, e.log())
		if err != nil {
			return err
		}
		*unlockDAG = unlock
	}

	plan, err := e.Store.PlanContext(ctx, dag, opts)
	if err == nil {
		err = plan.CheckInputs()
	}
	if err != nil {
		if recordable(err) && ctx.Err() == nil {
			rec.Stages = unstarted(dag, opts) // recorded: the night failed
		}
		return err
	}
	for _, st := range plan.Steps {
		for _, r := range st.Refs {
			if r.Note != "" && st.Selected {
				e.log().Warn(r.Note, "stage", st.Node.Name)
			}
		}
	}
	x := &execution{e: e, plan: plan, opts: opts, rec: rec, records: map[*Step]*StageRecord{}}
	for _, st := range plan.Steps {
		rec.Stages = append(rec.Stages, StageRecord{
			Name: st.Node.Name, Kind: st.Node.KindName, KindVersion: st.Node.Kind.Version(), KindRevision: st.Node.revision(),
			Key: st.Key, Params: st.Node.Canon, Inputs: st.Inputs, Files: st.Files, Refs: st.Refs, State: "not selected",
		})
	}
	for i, st := range plan.Steps {
		x.records[st] = &rec.Stages[i]
	}
	if e.Collective == "" {
		e.Store.notePlannedRun(dag, plan, rec)
		*noted = true
	}
	return x.execute(ctx)
}

// execution is one run of a plan.
type execution struct {
	e       *Engine
	plan    *Plan
	opts    Options
	rec     *RunRecord
	records map[*Step]*StageRecord
	mu      sync.Mutex // guards records during execution
	locks   map[*Step]*flock.Flock
}

// follows says whether this run takes part in st as a follower: the
// collective stage, whose entry another process locks and writes.
func (x *execution) follows(st *Step) bool { return st.Node.Name == x.e.Collective }

func (x *execution) execute(ctx context.Context) error {
	var compute []*Step
	for _, st := range x.plan.Steps {
		if st.Selected && !st.Compute {
			x.records[st].State = "cached"
			x.records[st].Reason = st.Reason
			x.fillFromManifest(st)
		}
		if st.Compute {
			compute = append(compute, st)
		}
	}
	if len(compute) == 0 {
		for _, st := range x.plan.Steps {
			if st.Selected {
				x.e.Store.touch(st.Key)
			}
		}
		return nil
	}
	// Take the entry locks in key order (so two DAGs sharing stages cannot
	// deadlock), then look again: another process may have computed some.
	// Each lock goes once its entry is committed (or has failed), so that
	// another run waiting for an entry goes on while this one computes the
	// rest: a follower waits so for the data its training needs.
	// (A twin comes after the step it waits for: the sort is stable.)
	sort.SliceStable(compute, func(i, j int) bool { return compute[i].Key < compute[j].Key })
	x.locks = map[*Step]*flock.Flock{}
	defer func() {
		for _, l := range x.locks {
			l.Unlock()
		}
	}()
	var todo []*Step
	for _, st := range compute {
		if first := st.Twin; first != nil {
			if !first.Compute { // another run computed it
				st.Compute, st.State, st.Manifest, st.Reason = false, Valid, first.Manifest, first.Reason
				x.records[st].State, x.records[st].Reason = "cached", st.Reason
				x.fillFromManifest(st)
				continue
			}
			todo = append(todo, st)
			continue
		}
		if x.follows(st) {
			todo = append(todo, st) // its entry is rank 0's to lock and write
			continue
		}
		l, err := x.e.Store.lockEntry(ctx, st.Key, st.Node.Name, x.e.NoWait && !x.e.Ranked, x.e.log())
		if err != nil {
			switch {
			case IsBusy(err): // NoWait: not a failure, a run not made
				x.records[st].State, x.records[st].Error = "canceled", err.Error()
			case ctx.Err() == nil: // the lock itself failed, not a signal
				x.records[st].State, x.records[st].Error = "failed", err.Error()
			}
			for _, c := range compute {
				if r := x.records[c]; r.State == "not selected" {
					r.State = "canceled"
				}
			}
			return err
		}
		if st.Reason != "forced" {
			if state, m, _ := x.e.Store.Check(st.Key, false); state == Valid {
				l.Unlock()
				st.Compute, st.State, st.Manifest, st.Reason = false, Valid, m, "cached (computed by another run)"
				x.records[st].State, x.records[st].Reason = "cached", st.Reason
				x.fillFromManifest(st)
				continue
			}
		}
		x.locks[st] = l
		todo = append(todo, st)
	}
	for _, st := range x.plan.Steps {
		if st.Selected && !st.Compute {
			x.e.Store.touch(st.Key)
		}
	}
	if len(todo) == 0 {
		return nil
	}
	return x.compute(ctx, todo)
}

func (x *execution) fillFromManifest(st *Step) {
	r := x.records[st]
	r.Entry = x.e.Store.EntryDir(st.Key)
	if st.Manifest != nil {
		r.Rows = st.Manifest.Rows
		r.Stats = st.Manifest.Stats
		for _, o := range st.Manifest.Outputs {
			r.Bytes += o.Size
		}
	}
}

// compute runs the steps in todo concurrently. A step with a single input
// computed in this run reads it from a bounded channel as it is produced;
// every other input is read from its committed entry, which breaks the
// deadlock a diamond of bounded channels would allow.
//
// A step that fails cancels the steps that depend on it and no others, as
// make -k does: hours of training beside it still reach the cache when a
// question file is malformed. The run then fails with every such error. A
// signal (ctx) still stops every step.
func (x *execution) compute(ctx context.Context, todo []*Step) error {
	computing := map[*Step]bool{}
	for _, st := range todo {
		computing[st] = true
	}
	committed := map[*Step]chan struct{}{}
	for _, st := range x.plan.Steps {
		committed[st] = make(chan struct{})
		if !computing[st] {
			close(committed[st]) // cached: its entry is there already
		}
	}
	trackers := map[*Step]*Tracker{}
	var order []*Step
	for _, st := range x.plan.Steps { // topological order, for display
		if computing[st] {
			order = append(order, st)
			trackers[st] = newTracker(st.Node.Name, st.Node.KindName)
		}
	}
	stepCtx := map[*Step]context.Context{}
	cancel := map[*Step]context.CancelCauseFunc{}
	finished := map[*Step]chan struct{}{} // closed when the step's goroutine ends
	for _, st := range order {
		stepCtx[st], cancel[st] = context.WithCancelCause(ctx)
		finished[st] = make(chan struct{})
	}
	streams := map[*Step][]stream{}
	tasks := map[*Step]*Task{}
	for _, st := range order {
		sctx := stepCtx[st]
		scratch := x.e.Store.scratchDir(st.Key)
		if x.follows(st) {
			// Rank 0 keeps the stage's resumable state in the entry's
			// scratch folder; a follower's is its own, removed after.
			scratch = fmt.Sprintf("%s.follower-%d", scratch, os.Getpid())
		}
		t := &Task{Name: st.Node.Name, Key: st.Key, Log: x.e.log().With("stage", st.Node.Name),
			scratch: scratch, plan: x.plan,
			tracker: trackers[st], stats: map[string]any{}, ctx: sctx,
			keyed: st.keyed, inputs: map[string]*inputCheck{}}
		for _, kf := range st.keyed {
			t.inputs[kf.path] = &inputCheck{kf: kf}
		}
		for _, d := range st.Node.Needs {
			up := x.plan.Step(d.Name)
			in := &Input{Name: d.Name, Kind: d.KindName, store: x.e.Store, dir: x.e.Store.EntryDir(up.Key), committed: committed[up], tracker: t.tracker, ctx: sctx}
			if computing[up] && up.Twin == nil && st.Twin == nil && len(st.Node.Needs) == 1 {
				in.ch = make(chan arrow.RecordBatch, 4)
				streams[up] = append(streams[up], stream{ch: in.ch, gone: finished[st]})
			}
			if computing[up] {
				in.upstream = trackers[up]
			} else if up.Manifest != nil {
				in.knownRows = up.Manifest.Rows
			}
			t.Inputs = append(t.Inputs, in)
		}
		t.tracker.inputs = t.Inputs
		tasks[st] = t
	}
	if x.e.Progress != nil {
		var ts []*Tracker
		for _, st := range order {
			ts = append(ts, trackers[st])
		}
		stop := x.e.Progress.Start(ts)
		defer stop()
	}
	var (
		wg     sync.WaitGroup
		mu     sync.Mutex
		failed []error // the steps' own failures, in the order they came
	)
	for _, st := range order {
		st, t := st, tasks[st]
		t.outs = streams[st]
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer close(finished[st])
			defer cancel[st](nil)
			if first := st.Twin; first != nil {
				if err := x.awaitTwin(stepCtx[st], st, first, t, finished[first], committed[st]); err != nil && stepCtx[st].Err() == nil {
					for _, d := range x.dependents(st) {
						if c := cancel[d]; c != nil {
							c(&upstreamFailed{stage: first.Node.Name})
						}
					}
				}
				return
			}
			err := x.computeStep(stepCtx[st], st, t, committed[st])
			if l := x.locks[st]; l != nil {
				l.Unlock()
			}
			if err == nil {
				t.tracker.finish(true)
				return
			}
			t.tracker.finish(false)
			if stepCtx[st].Err() != nil {
				return // stopped by a signal or by a failure it depends on
			}
			var stopped []string
			for _, d := range x.dependents(st) {
				if c := cancel[d]; c != nil {
					c(&upstreamFailed{stage: st.Node.Name})
					stopped = append(stopped, d.Node.Name)
				}
			}
			// Said now: the run goes on with the other stages, maybe for hours.
			attrs := []any{"stage", st.Node.Name, "err", err}
			if len(stopped) > 0 {
				attrs = append(attrs, "canceled", strings.Join(stopped, ","))
			}
			x.e.log().Error("failed", attrs...)
			mu.Lock()
			failed = append(failed, stageErr(st.Node, err))
			mu.Unlock()
		}()
	}
	wg.Wait()
	for _, st := range order {
		r := x.records[st]
		if r.State == "not selected" {
			r.State = "canceled"
		}
	}
	if ctx.Err() != nil {
		return errors.Join(append([]error{fmt.Errorf("run interrupted: %w", context.Cause(ctx))}, failed...)...)
	}
	return errors.Join(failed...)
}

// upstreamFailed is the cause with which a step is canceled when a step it
// depends on failed. It is a cancellation, so the step is recorded as
// canceled, not failed.
type upstreamFailed struct{ stage string }

func (e *upstreamFailed) Error() string { return "stage " + e.stage + " failed" }
func (e *upstreamFailed) Unwrap() error { return context.Canceled }

// stream is one streaming consumer of a step's rows; gone is closed when
// the consumer has stopped, after which its batches are dropped rather
// than block the producer.
type stream struct {
	ch   chan arrow.RecordBatch
	gone <-chan struct{}
}

// dependents returns every step that needs st, directly or through others.
func (x *execution) dependents(st *Step) []*Step {
	var out []*Step
	seen := map[*Step]bool{st: true}
	for changed := true; changed; {
		changed = false
		for _, s := range x.plan.Steps {
			if seen[s] {
				continue
			}
			for _, d := range s.Node.Needs {
				if seen[x.plan.Step(d.Name)] {
					seen[s], changed = true, true
					out = append(out, s)
					break
				}
			}
		}
	}
	return out
}

// awaitTwin stands for st, whose entry first computes in this run (see
// Step.Twin): once first is done, st is served its entry, or is
// canceled with first's failure.
func (x *execution) awaitTwin(ctx context.Context, st, first *Step, t *Task, done <-chan struct{}, committed chan struct{}) error {
	t.tracker.start()
	r := x.records[st]
	select {
	case <-done:
	case <-ctx.Done():
		t.tracker.finish(false)
		x.mu.Lock()
		r.State = "canceled"
		x.mu.Unlock()
		return context.Cause(ctx)
	}
	x.mu.Lock()
	fr := x.records[first]
	ok := fr.State == "computed"
	if ok {
		r.State, r.Reason, r.Entry, r.Rows, r.Stats, r.Bytes = "cached", "the same entry as stage "+first.Node.Name, fr.Entry, fr.Rows, fr.Stats, fr.Bytes
	} else {
		r.State, r.Error = "canceled", "stage "+first.Node.Name+", which computes the same entry, did not"
	}
	x.mu.Unlock()
	t.tracker.finish(ok)
	if !ok {
		return &upstreamFailed{stage: first.Node.Name}
	}
	close(committed)
	return nil
}

// computeStep runs one stage into a pending entry and commits it.
func (x *execution) computeStep(ctx context.Context, st *Step, t *Task, committed chan struct{}) (err error) {
	r := x.records[st]
	started := time.Now()
	t.tracker.start()
	defer func() {
		x.mu.Lock()
		r.Seconds = time.Since(started).Seconds()
		for _, in := range t.Inputs {
			r.WaitSeconds += time.Duration(in.waited.Load()).Seconds()
		}
		if err != nil {
			err = fmt.Errorf("%w%s", err, x.e.Store.spaceHint(err))
			r.State, r.Error = "failed", err.Error()
			if errors.Is(err, context.Canceled) {
				r.State = "canceled"
				// What stopped it ("interrupted by SIGINT"), not
				// "context canceled".
				if cause := context.Cause(ctx); cause != nil && cause != context.Canceled {
					r.Error = strings.Replace(r.Error, context.Canceled.Error(), cause.Error(), 1)
				}
			}
		}
		x.mu.Unlock()
	}()
	if x.follows(st) {
		defer os.RemoveAll(t.scratch) // a follower's, of no use after
	}
	p, err := x.e.Store.begin(st.Key, !x.follows(st))
	if err != nil {
		return err
	}
	t.Dir = p.dir
	defer func() {
		if err != nil {
			if t.out != nil {
				t.out.abort()
			}
			p.abort()
		}
	}()
	x.e.log().Debug("computing", "stage", st.Node.Name, "key", ShortKey(st.Key), "why", st.Reason)
	if st.Reason == "forced" {
		// --force starts clean: no resumable state of an earlier attempt.
		if err := os.RemoveAll(t.scratch); err != nil {
			return fmt.Errorf("clearing the stage's resumable state: %w", err)
		}
	}
	if err := runStage(ctx, st.Node.Runner, t); errors.Is(err, ErrWrittenElsewhere) {
		// Its part done, the stage leaves the entry to another process.
		p.abort()
		close(committed)
		for _, o := range t.outs {
			close(o.ch)
		}
		x.mu.Lock()
		r.State, r.Reason, r.Stats = "elsewhere", st.Reason, t.stats
		x.mu.Unlock()
		x.e.log().Info("done here; another process writes the entry", "stage", st.Node.Name, "key", ShortKey(st.Key))
		return nil
	} else if err != nil {
		// A file that changed under the stage is the cause to report, even
		// when the stage tripped over it first (say, a half-written line).
		if ctx.Err() != nil {
			return err
		}
		if changed := t.verifyInputs(false); changed != nil {
			if errors.As(err, new(*InputChangedError)) {
				return err // what the stage failed with says it already
			}
			return fmt.Errorf("%w\n\t(the stage failed with: %v)", changed, err)
		}
		return err
	}
	// Whatever the stage left unread must still reach EOF, so that the
	// producer upstream can finish and commit.
	for _, in := range t.Inputs {
		if err := in.drain(ctx); err != nil {
			return err
		}
	}
	// Nothing enters the cache under a key its inputs do not match.
	if err := t.verifyInputs(true); err != nil {
		return err
	}
	known := map[string]string{}
	if t.out != nil {
		sum, err := t.out.close()
		if err != nil {
			return fmt.Errorf("writing %s: %w", TableFile, err)
		}
		known[TableFile] = sum
	}
	// The time it waited for inputs other stages computed, apart, for the
	// report of the nights it is cached: a statistic, which a manifest's
	// older readers keep as they found it.
	waited := 0.0
	for _, in := range t.Inputs {
		waited += time.Duration(in.waited.Load()).Seconds()
	}
	if waited >= 0.01 {
		t.SetStat(WaitSecondsStat, math.Floor(waited*100)/100)
	}
	m := &Manifest{
		Key: st.Key, Stage: st.Node.Name, Kind: st.Node.KindName, KindVersion: st.Node.Kind.Version(), KindRevision: st.Node.revision(),
		// Empty lists, not nulls, for those who read manifests as JSON.
		Params: st.Node.Canon, Inputs: nonNil(st.Inputs), Files: nonNil(st.Files), Refs: withoutNotes(st.Refs), Stats: t.stats,
		Started: started.UTC(), Finished: time.Now().UTC(), Program: Version(),
	}
	m.Seconds = m.Finished.Sub(m.Started).Seconds()
	if t.out != nil {
		m.Rows = t.out.rows
	}
	if err := p.commit(m, known); err != nil {
		return fmt.Errorf("committing cache entry: %w", err)
	}
	os.RemoveAll(t.scratch)
	close(committed)
	for _, o := range t.outs {
		close(o.ch)
	}
	x.mu.Lock()
	r.State, r.Reason, r.Entry, r.Rows, r.Stats = "computed", st.Reason, x.e.Store.EntryDir(st.Key), m.Rows, m.Stats
	for _, o := range m.Outputs {
		r.Bytes += o.Size
	}
	x.mu.Unlock()
	x.e.log().Info("computed", "stage", st.Node.Name, "rows", m.Rows, "seconds", strconv.FormatFloat(m.Seconds, 'f', 2, 64), "key", ShortKey(st.Key))
	return nil
}

// runStage calls the stage's Runner, turning a panic into an error so that a
// bug in one kind fails its stage cleanly instead of tearing the process down.
func runStage(ctx context.Context, r Runner, t *Task) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("panic: %v\n%s", p, debug.Stack())
		}
	}()
	return r.Run(ctx, t)
}

// nonNil is s, or an empty slice in place of nil (which JSON writes null).
func nonNil[T any](s []T) []T {
	if s == nil {
		return []T{}
	}
	return s
}
