package pipeline

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/memory"
	"github.com/gofrs/flock"
)

// remote is a moving reference for the tests: a name and what it names now.
type remote struct {
	mu       sync.Mutex
	revision string
	note     string
	err      error
	resolved int // times resolved
}

func (r *remote) set(rev, note string) { r.mu.Lock(); r.revision, r.note = rev, note; r.mu.Unlock() }

// remoteKind is a source of one row whose text is the revision its
// reference named when the plan resolved it.
type remoteKind struct{ r *remote }

type remoteParams struct {
	Ref string `json:"ref"`
}

func (remoteKind) Version() int       { return 1 }
func (remoteKind) Inputs() (int, int) { return 0, 0 }
func (remoteKind) Params() any        { return &remoteParams{} }
func (k remoteKind) Prepare(params any, _ string) (Runner, error) {
	return &remoteStage{k: k, name: params.(*remoteParams).Ref}, nil
}

type remoteStage struct {
	k    remoteKind
	name string
	rev  string
}

func (*remoteStage) Files() []string { return nil }

func (s *remoteStage) Resolve(ctx context.Context) ([]Ref, error) {
	r := s.k.r
	r.mu.Lock()
	defer r.mu.Unlock()
	r.resolved++
	if r.err != nil {
		return nil, r.err
	}
	s.rev = r.revision
	return []Ref{{Name: s.name, Revision: r.revision, Note: r.note}}, nil
}

func (s *remoteStage) Run(ctx context.Context, t *Task) error {
	out, err := t.Output(testSchema)
	if err != nil {
		return err
	}
	b := array.NewRecordBuilder(memory.DefaultAllocator, testSchema)
	defer b.Release()
	b.Field(0).(*array.Int64Builder).Append(0)
	b.Field(1).(*array.StringBuilder).Append(s.rev)
	rec := b.NewRecordBatch()
	defer rec.Release()
	return out.Write(rec)
}

// TestRefs: what a reference names enters the key; a moved reference
// recomputes and the plan says it moved; a note is logged; the run record
// and the manifest keep what it named.
func TestRefs(t *testing.T) {
	e := newTestEnv(t)
	r := &remote{revision: strings.Repeat("a", 40)}
	e.reg.Register("remote", remoteKind{r})
	spec := e.write("spec.yaml", "name: refs\nstages:\n  src: {kind: remote, with: {ref: \"hf://org/x@main\"}}\n  dbl: {kind: double, needs: [src]}\n")

	rec := e.mustRun(spec, Options{})
	key := rec.Stages[0].Key
	if got := rec.Stages[0].Refs; len(got) != 1 || got[0].Revision != r.revision || got[0].Name != "hf://org/x@main" {
		t.Fatalf("record refs %+v", got)
	}
	if _, s := readTable(t, e.store, key); len(s) != 1 || s[0] != r.revision {
		t.Fatalf("the stage read %v", s)
	}

	// Same revision: same key, cached.
	rec = e.mustRun(spec, Options{})
	if rec.Stages[0].Key != key || rec.Stages[0].State != "cached" {
		t.Fatalf("unmoved reference: %+v", rec.Stages[0])
	}

	// The branch moves: new key, and plan says why.
	r.set(strings.Repeat("b", 40), "")
	plan, err := e.store.Plan(e.load(spec), Options{})
	if err != nil {
		t.Fatal(err)
	}
	st := plan.Step("src")
	if st.Key == key || !st.Compute || st.Reason != "hf://org/x@main moved from aaaaaaa to bbbbbbb" {
		t.Fatalf("moved reference: key same %v, compute %v, reason %q", st.Key == key, st.Compute, st.Reason)
	}
	if dbl := plan.Step("dbl"); !dbl.Compute || dbl.Reason != "input src changed" {
		t.Errorf("downstream: %v %q", dbl.Compute, dbl.Reason)
	}

	// A note (offline, say) is logged by the run, and kept in the record
	// but not in the entry.
	r.set(strings.Repeat("b", 40), "offline: taken from the cache")
	var logs bytes.Buffer
	eng := &Engine{Store: e.store, Log: slog.New(slog.NewTextHandler(&logs, nil))}
	rec, err = eng.Run(context.Background(), e.load(spec), Options{})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(logs.String(), "offline: taken from the cache") || rec.Stages[0].Refs[0].Note == "" {
		t.Errorf("note not logged or recorded: %s", logs.String())
	}
	data, err := os.ReadFile(e.store.EntryDir(rec.Stages[0].Key) + "/manifest.json")
	if err != nil {
		t.Fatal(err)
	}
	var m Manifest
	if err := json.Unmarshal(data, &m); err != nil || len(m.Refs) != 1 || m.Refs[0].Revision != strings.Repeat("b", 40) || m.Refs[0].Note != "" {
		t.Errorf("manifest refs %+v (%v)", m.Refs, err)
	}

	// Moving back finds the first entry.
	r.set(strings.Repeat("a", 40), "")
	good := e.mustRun(spec, Options{})
	if rec = good; rec.Stages[0].Key != key || rec.Stages[0].State != "cached" {
		t.Errorf("moved back: %+v", rec.Stages[0])
	}

	// A reference that cannot be resolved fails the plan, naming the stage.
	r.mu.Lock()
	r.err = errors.New("no such repository")
	r.mu.Unlock()
	if _, err := e.store.Plan(e.load(spec), Options{}); err == nil || !strings.Contains(err.Error(), "stage src") {
		t.Errorf("unresolvable: %v", err)
	}
	// A run it stops is recorded as failed (status and report show the
	// night, not the one before), and gc keeps the entries it last had.
	// What a run killed before it planned stays noted: this run never
	// came to note its own.
	killed := strings.Repeat("k", 64)
	os.WriteFile(e.store.dagLockBase(e.load(spec))+".keys", []byte(killed+"\n"), 0o644)
	rec, err = (&Engine{Store: e.store}).Run(context.Background(), e.load(spec), Options{})
	if err == nil {
		t.Fatal("a run with an unresolvable reference succeeded")
	}
	last := e.store.lastRun(e.load(spec))
	if last == nil || last.OK || !strings.Contains(last.Error, "no such repository") || len(last.Stages) != 2 || last.Stages[0].State != "canceled" || last.Stages[0].Key != "" {
		t.Errorf("the failed run's record: %+v", last)
	}
	res, err := e.store.GC(context.Background(), GCOptions{KeepLast: 1})
	if err != nil {
		t.Fatal(err)
	}
	for _, st := range good.Stages {
		if slices.Contains(res.Removed, st.Key) {
			t.Errorf("gc --keep-last 1 after the failed run removed %s's entry of the last good run", st.Name)
		}
	}
	if len(res.Removed) != 2 {
		t.Errorf("gc removed %d entries, want the 2 of the moved branch", len(res.Removed))
	}
	if k := e.store.killedRunsKeys(); !slices.Equal(k, []string{killed}) {
		t.Errorf("the killed run's keys after a run that failed to plan: %v", k)
	}
	// A run recorded after planning takes their place.
	r.mu.Lock()
	r.err = nil
	r.mu.Unlock()
	e.mustRun(spec, Options{})
	if k := e.store.killedRunsKeys(); len(k) != 0 {
		t.Errorf("planned keys left after a recorded run: %v", k)
	}

	// Nothing is recorded of a run refused while another run of the DAG
	// holds its lock: it would sort as that run's record.
	dag := e.load(spec)
	other := flock.New(e.store.dagLockBase(dag) + ".lock")
	if err := other.Lock(); err != nil {
		t.Fatal(err)
	}
	before := len(e.store.runRecords(dagID(dag)))
	if _, err := e.store.RecordUnstarted(dag, Options{}, errors.New("no data")); err != nil || len(e.store.runRecords(dagID(dag))) != before {
		t.Errorf("recorded beside a running run (%v)", err)
	}
	other.Unlock()
	if _, err := e.store.RecordUnstarted(dag, Options{}, errors.New("no data")); err != nil || len(e.store.runRecords(dagID(dag))) != before+1 {
		t.Errorf("not recorded (%v)", err)
	}
}
