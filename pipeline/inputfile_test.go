package pipeline

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"
)

// hookDisplay runs a function when the engine starts computing: after the
// plan hashed the input files, before any stage reads them.
type hookDisplay func()

func (h hookDisplay) Start([]*Tracker) func() { h(); return func() {} }

// replaceFile puts content at path the way rsync and downloads finish: a
// new file renamed over the old one.
func replaceFile(t testing.TB, path, content string) {
	t.Helper()
	tmp := path + ".partial"
	if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// editInPlace overwrites path's bytes from off, keeping the file (inode).
func editInPlace(t testing.TB, path string, off int64, content string) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte(content), off); err != nil {
		t.Fatal(err)
	}
	f.Close()
}

func (e *testEnv) runWith(spec string, display Display) (*RunRecord, error) {
	e.t.Helper()
	eng := &Engine{Store: e.store, Progress: display}
	return eng.Run(context.Background(), e.load(spec), Options{})
}

// wantChanged checks that err is an InputChangedError naming path, and that
// no entry was committed.
func (e *testEnv) wantChanged(err error, path string) {
	e.t.Helper()
	var ce *InputChangedError
	if !errors.As(err, &ce) || ce.Path != path {
		e.t.Fatalf("want the stage failed on %s changing, got %v", path, err)
	}
	if n := strings.Count(err.Error(), "changed after it was hashed"); n != 1 {
		e.t.Errorf("the change is told %d times: %v", n, err)
	}
	if keys, _ := e.store.Keys(); len(keys) != 0 {
		e.t.Fatalf("entries committed: %v", keys)
	}
}

// TestInputReplacedAfterPlanIsNotCached: a file replaced between the plan
// (which hashed it for the key) and the stage's reading it fails the stage,
// naming the file, and leaves no entry; once the original is back, the
// stage computes from it. Before, the replaced content was cached under the
// original's key and then served as "cached".
func TestInputReplacedAfterPlanIsNotCached(t *testing.T) {
	// Files written just now are "racily clean": their stat state cannot
	// vouch for them and the checks hash; settled ones are trusted by state.
	for _, kind := range []string{"gen", "chunks", "chunks-random", "gen-settled", "chunks-settled", "chunks-random-settled"} {
		t.Run(kind, func(t *testing.T) {
			e := newTestEnv(t)
			data := e.write("data.txt", "row-")
			spec := e.write("s.yaml", "name: s\nstages:\n  src: {kind: gen, with: {rows: 3, file: data.txt}}\n")
			if strings.HasPrefix(kind, "chunks") {
				spec = e.write("s.yaml", "name: s\nstages:\n  src: {kind: chunks, with: {file: data.txt, random: "+
					fmt.Sprint(strings.Contains(kind, "random"))+"}}\n")
			}
			if strings.HasSuffix(kind, "settled") {
				time.Sleep(2 * racyWindow)
			}
			_, err := e.runWith(spec, hookDisplay(func() { replaceFile(t, data, "new-") }))
			e.wantChanged(err, data)
			replaceFile(t, data, "row-")
			rec := e.mustRun(spec, Options{})
			if got := stateOfStage(rec, "src"); got != "computed" {
				t.Fatalf("after the original came back: %s", got)
			}
			_, ss := readTable(t, e.store, keyOfStage(rec, "src"))
			if !strings.HasPrefix(ss[0], "row") {
				t.Errorf("rows from the wrong file: %q", ss)
			}
		})
	}
}

// TestInputEditedMidReadIsNotCached: a file edited in place while a stage
// reads it, even when the edit is undone before the read ends, fails the
// stage: read in order (hashed as read), at random (its descriptor watched),
// or by path (checked after the read).
func TestInputEditedMidReadIsNotCached(t *testing.T) {
	const content = "aaaabbbbccccdddd"
	for _, mode := range []string{"", "random: true", "by_path: true", "settled", "random: true, settled"} {
		t.Run(mode, func(t *testing.T) {
			e := newTestEnv(t)
			data := e.write("data.txt", content)
			spec := e.write("s.yaml", "name: s\nstages:\n  src: {kind: chunks, with: {file: data.txt, "+strings.TrimSuffix(strings.TrimSuffix(mode, "settled"), ", ")+"}}\n")
			if strings.HasSuffix(mode, "settled") {
				time.Sleep(2 * racyWindow)
			}
			chunkHook = func(i int) {
				switch i {
				case 0:
					editInPlace(t, data, 0, "XXXXYYYYZZZZWWWW")
				case 1:
					editInPlace(t, data, 0, content)
				}
			}
			defer func() { chunkHook = nil }()
			_, err := e.run(spec, Options{})
			if mode == "by_path: true" {
				// Read whole before the edit and checked right after: the
				// edit came after the read, and the entry is right.
				if err != nil {
					t.Fatalf("a change after CheckFiles failed the stage: %v", err)
				}
				return
			}
			e.wantChanged(err, data)
		})
	}
	// By path, an edit before the check is caught.
	e := newTestEnv(t)
	data := e.write("data.txt", content)
	spec := e.write("s.yaml", "name: s\nstages:\n  src: {kind: chunks, with: {file: data.txt, by_path: true}}\n")
	_, err := e.runWith(spec, hookDisplay(func() { editInPlace(t, data, 0, "XXXX") }))
	e.wantChanged(err, data)
}

// TestUnchangedInputsPass: the checks cost nothing when nothing changed,
// and a file only touched (same content, new times) still passes when read.
func TestUnchangedInputsPass(t *testing.T) {
	for _, mode := range []string{"", "random: true", "by_path: true"} {
		e := newTestEnv(t)
		e.write("data.txt", "aaaabbbbcccc")
		spec := e.write("s.yaml", "name: s\nstages:\n  src: {kind: chunks, with: {file: data.txt, "+mode+"}}\n")
		if _, err := e.run(spec, Options{}); err != nil {
			t.Fatalf("%s: %v", mode, err)
		}
	}
	e := newTestEnv(t)
	data := e.write("data.txt", "aaaabbbbcccc")
	spec := e.write("s.yaml", "name: s\nstages:\n  src: {kind: chunks, with: {file: data.txt, random: true}}\n")
	if _, err := e.runWith(spec, hookDisplay(func() { replaceFile(t, data, "aaaabbbbcccc") })); err != nil {
		t.Fatalf("same content in a new file: %v", err)
	}
}

// findKind records, as its statistic "found", what Task.FilesWithDigest
// lists for the digest its parameter names.
type findKind struct{}

type findParams struct {
	Digest string `json:"digest"`
}

func (findKind) Version() int       { return 1 }
func (findKind) Inputs() (int, int) { return 0, 0 }
func (findKind) Params() any        { return &findParams{} }
func (findKind) Prepare(params any, dir string) (Runner, error) {
	return findStage{params.(*findParams)}, nil
}

type findStage struct{ p *findParams }

func (findStage) Files() []string { return nil }
func (s findStage) Run(ctx context.Context, t *Task) error {
	t.SetStat("found", t.FilesWithDigest(s.p.Digest))
	return nil
}

// TestFilesWithDigest: a stage finds the input files of the whole plan
// (other stages' ones too) by content, in the plan's order, and not a file
// that no longer holds that content.
func TestFilesWithDigest(t *testing.T) {
	e := newTestEnv(t)
	e.reg.Register("find", findKind{})
	a, b := e.write("a.txt", "same"), e.write("b.txt", "same")
	e.write("c.txt", "other")
	sum := sha256.Sum256([]byte("same"))
	spec := e.write("spec.yaml", fmt.Sprintf(`name: find
stages:
  a: {kind: gen, with: {file: a.txt}}
  c: {kind: gen, with: {file: c.txt}}
  b: {kind: gen, with: {file: b.txt}}
  find: {kind: find, with: {digest: %x}}
`, sum))
	found := func(rec *RunRecord) string {
		for _, s := range rec.Stages {
			if s.Name == "find" {
				return fmt.Sprint(s.Stats["found"])
			}
		}
		return "no stage find"
	}
	rec, err := (&Engine{Store: e.store}).Run(context.Background(), e.load(spec), Options{})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := found(rec), fmt.Sprint([]string{a, b}); got != want {
		t.Errorf("found %s, want %s", got, want)
	}
	// b changes after the plan hashed it: only a holds the content now.
	eng := &Engine{Store: e.store, Progress: hookDisplay(func() { replaceFile(t, b, "changed") })}
	rec, err = eng.Run(context.Background(), e.load(spec), Options{Force: []string{"find"}})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := found(rec), fmt.Sprint([]string{a}); got != want {
		t.Errorf("after b changed: found %s, want %s", got, want)
	}
}
