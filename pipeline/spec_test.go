package pipeline

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestSpecErrors checks that each kind of mistake in a spec is reported
// with the file, the line, and a fix, before anything runs.
func TestSpecErrors(t *testing.T) {
	cases := []struct {
		name string
		spec string
		line int
		want []string // substrings of the message, the fix included
	}{
		{"unknown top-level key", "name: x\nstagez: {}\nstages:\n  a: {kind: gen}\n", 2,
			[]string{`unknown key "stagez"`, "name, cache and stages"}},
		{"unknown stage key", "name: x\nstages:\n  a:\n    kind: gen\n    need: [b]\n", 5,
			[]string{`unknown key "need"`, "kind, needs and with"}},
		{"unknown parameter", "name: x\nstages:\n  a:\n    kind: gen\n    with:\n      rowz: 3\n", 6,
			[]string{`unknown parameter "rowz"`, `did you mean "rows"`, "rows, batch, file, delay_ms"}},
		{"unknown kind", "name: x\nstages:\n  a: {kind: gne}\n", 3,
			[]string{`unknown kind "gne"`, `did you mean "gen"`}},
		{"missing kind", "name: x\nstages:\n  a: {with: {rows: 1}}\n", 3,
			[]string{`stage "a" has no kind`, "known kinds: chunks, concat, count, double, fail, gen"}},
		{"cycle", "name: x\nstages:\n  a: {kind: double, needs: [c]}\n  b: {kind: double, needs: [a]}\n  c: {kind: double, needs: [b]}\n", 3,
			[]string{"cycle: a -> c -> b -> a", "remove one of these needs"}},
		{"missing need", "name: x\nstages:\n  src: {kind: gen}\n  b: {kind: double, needs: [scr]}\n", 4,
			[]string{`needs "scr", which is not defined`, `did you mean "src"`}},
		{"input missing", "name: x\nstages:\n  b: {kind: double}\n", 3,
			[]string{"needs exactly 1 input", "needs: [stage]"}},
		{"too many inputs", "name: x\nstages:\n  a: {kind: gen}\n  b: {kind: gen, needs: [a]}\n", 4,
			[]string{"has 1 input", "remove `needs:`"}},
		{"bad value type", "name: x\nstages:\n  a:\n    kind: gen\n    with: {rows: many}\n", 5,
			[]string{`stage "a"`, `rows must be a whole number, got "many"`}},
		{"invalid value", "name: x\nstages:\n  a:\n    kind: gen\n    with:\n      batch: 5\n      rows: -4\n", 7,
			[]string{"rows: must not be negative", "row count"}},
		{"missing file", "name: x\nstages:\n  a:\n    kind: gen\n    with:\n      file: nowhere.txt\n", 6,
			[]string{"file:", "nowhere.txt", "existing file"}},
		{"yaml syntax", "name: x\nstages:\n  a: {kind: gen\n  b: 1\n", 0,
			[]string{"fix the YAML syntax"}},
		{"duplicate stage", "name: x\nstages:\n  a: {kind: gen}\n  a: {kind: gen}\n", 4,
			[]string{"a"}},
		{"scalar for a list", "name: x\nstages:\n  a:\n    kind: gen\n    with: {tags: nightly}\n", 5,
			[]string{`stage "a": tags must be a list`, "e.g. tags: [nightly]"}},
		{"no stages", "name: x\n", 1, []string{"missing `stages:`"}},
		{"bad stage name", "name: x\nstages:\n  1a: {kind: gen}\n", 3, []string{`bad stage name "1a"`}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			e := newTestEnv(t)
			path := e.write("bad.yaml", c.spec)
			dag, err := Load(path, e.reg)
			if err == nil {
				// What the stages read is checked by the plan that
				// needs them (a run of all stages here).
				_, err = e.store.Plan(dag, Options{})
			}
			if err == nil {
				t.Fatal("spec planned without error")
			}
			if !IsSpecError(err) {
				t.Fatalf("not a spec error: %T %v", err, err)
			}
			msg := err.Error()
			if !strings.HasPrefix(msg, path+":") {
				t.Errorf("message does not start with the file: %q", msg)
			}
			if c.line > 0 && !strings.HasPrefix(msg, path+":"+strconv.Itoa(c.line)+":") {
				t.Errorf("want line %d in %q", c.line, msg)
			}
			for _, w := range c.want {
				if !strings.Contains(msg, w) {
					t.Errorf("message lacks %q:\n%s", w, msg)
				}
			}
		})
	}
}

// TestPlanNeedsOnlyWhatItRuns: a stage whose file is missing fails the
// plans that need it, not those of the stages before it (preprocessing
// without the model a later stage trains), and status says why it has no
// key instead of failing.
func TestPlanNeedsOnlyWhatItRuns(t *testing.T) {
	e := newTestEnv(t)
	spec := e.write("spec.yaml", `name: x
stages:
  data: {kind: gen, with: {rows: 3}}
  model: {kind: gen, with: {file: nowhere.txt}}
  train: {kind: concat, needs: [data, model]}
  after: {kind: double, needs: [train]}
`)
	dag := e.load(spec)
	for _, opts := range []Options{{}, {Until: "train"}, {Only: "after"}} {
		_, err := e.store.Plan(dag, opts)
		if !IsSpecError(err) || !strings.Contains(err.Error(), "nowhere.txt") {
			t.Errorf("plan %+v: %v, want the missing file", opts, err)
		}
	}
	plan, err := e.store.Plan(dag, Options{Until: "data"})
	if err != nil {
		t.Fatal(err)
	}
	for _, st := range plan.Steps {
		if (st.Key != "") != (st.Node.Name == "data") {
			t.Errorf("stage %s: key %q", st.Node.Name, st.Key)
		}
	}
	if _, err := (&Engine{Store: e.store}).Run(context.Background(), dag, Options{Until: "data"}); err != nil {
		t.Fatal(err)
	}
	status, err := e.store.Status(dag)
	if err != nil {
		t.Fatal(err)
	}
	var states []string
	for _, s := range status.Stages {
		states = append(states, s.Name+" "+s.State)
		if (s.Unavailable != nil) != (s.State == "unavailable") {
			t.Errorf("stage %s %s: %v", s.Name, s.State, s.Unavailable)
		}
	}
	if want := "[data cached model unavailable train unavailable after unavailable]"; fmt.Sprint(states) != want {
		t.Errorf("status %v, want %s", states, want)
	}
	if err := status.Stages[3].Unavailable; err == nil || !strings.Contains(err.Error(), "train") {
		t.Errorf("after unavailable: %v, want train named", err)
	}
}

func TestSpecReportsAllErrors(t *testing.T) {
	e := newTestEnv(t)
	path := e.write("bad.yaml", "name: x\nstages:\n  a: {kind: nope}\n  b: {kind: gen, with: {rows: -1}}\n")
	_, err := Load(path, e.reg)
	errs, ok := err.(SpecErrors)
	if !ok || len(errs) != 2 || errs[0].Line != 3 || errs[1].Line != 4 {
		t.Fatalf("want two errors on lines 3 and 4, got %v", err)
	}
}

// TestSpecNeedsOfABrokenStage: a stage in error is reported once; the
// stages that need it do not add "not defined".
func TestSpecNeedsOfABrokenStage(t *testing.T) {
	e := newTestEnv(t)
	path := e.write("bad.yaml", "name: x\nstages:\n  a: {kind: gen, with: {tags: nightly}}\n  b: {kind: double, needs: [a]}\n  c: {kind: gne}\n  d: {kind: count, needs: [c]}\n")
	_, err := Load(path, e.reg)
	errs, ok := err.(SpecErrors)
	if !ok || len(errs) != 2 || errs[0].Line != 3 || errs[1].Line != 5 {
		t.Fatalf("want the errors of a and c alone, got %v", err)
	}
}

// TestSpecErgonomics: what people write in YAML beyond the basics is read
// as they mean it, and mistakes name the fix.
func TestSpecErgonomics(t *testing.T) {
	t.Run("byte order mark", func(t *testing.T) {
		e := newTestEnv(t)
		dag := e.load(e.write("bom.yaml", "\xef\xbb\xbfname: x\nstages:\n  a: {kind: gen}\n"))
		if dag.Name != "x" {
			t.Fatalf("name %q", dag.Name)
		}
	})
	t.Run("anchors and aliases across stages", func(t *testing.T) {
		e := newTestEnv(t)
		dag := e.load(e.write("anchors.yaml", `name: x
x-defaults: &small {rows: 7, batch: 2}
stages:
  a: {kind: gen, with: &gen {rows: 5, batch: 3}}
  b: {kind: gen, with: *gen}
  c:
    kind: gen
    with:
      <<: *gen
      rows: 9
  d:
    kind: gen
    with: {<<: [*small, *gen]}
`))
		want := map[string]string{
			"a": `{"rows":5,"batch":3,"delay_ms":0}`,
			"b": `{"rows":5,"batch":3,"delay_ms":0}`,
			"c": `{"rows":9,"batch":3,"delay_ms":0}`,
			"d": `{"rows":7,"batch":2,"delay_ms":0}`,
		}
		for name, w := range want {
			if got := string(dag.Node(name).Canon); got != w {
				t.Errorf("stage %s: %s, want %s", name, got, w)
			}
		}
	})
	t.Run("a name in Turkish", func(t *testing.T) {
		e := newTestEnv(t)
		dag := e.load(e.write("tr.yaml", "name: x\nstages:\n  kaynağı: {kind: gen}\n  çift: {kind: double, needs: [kaynağı]}\n"))
		if b := dag.Node("çift"); b == nil || len(b.Needs) != 1 || b.Needs[0].Name != "kaynağı" {
			t.Errorf("stages %v", dag.Nodes)
		}
	})
	t.Run("one need as a name", func(t *testing.T) {
		e := newTestEnv(t)
		dag := e.load(e.write("one.yaml", "name: x\nstages:\n  a: {kind: gen}\n  b: {kind: double, needs: a}\n"))
		if b := dag.Node("b"); len(b.Needs) != 1 || b.Needs[0].Name != "a" {
			t.Errorf("needs: a read as %v", b.Needs)
		}
	})
	t.Run("home in cache", func(t *testing.T) {
		e := newTestEnv(t)
		home := t.TempDir()
		t.Setenv("HOME", home)
		dag := e.load(e.write("home.yaml", "name: x\ncache: ~/pipeline-cache\nstages:\n  a: {kind: gen}\n"))
		if want := filepath.Join(home, "pipeline-cache"); dag.Cache != want {
			t.Errorf("cache %q, want %q", dag.Cache, want)
		}
		t.Setenv(CacheEnv, "~/from-env")
		if got, err := CacheRoot("", dag); err != nil || got != filepath.Join(home, "from-env") {
			t.Errorf("$%s: %q (%v), want %q", CacheEnv, got, err, filepath.Join(home, "from-env"))
		}
	})
	t.Run("dot-dot through a linked folder", func(t *testing.T) {
		// As the shell and the kernel read it: the link's target's
		// parent, not the link's.
		e := newTestEnv(t)
		project, err := filepath.EvalSymlinks(t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		if err := os.Mkdir(filepath.Join(project, "dags"), 0o755); err != nil {
			t.Fatal(err)
		}
		spec := filepath.Join(project, "dags", "x.yaml")
		if err := os.WriteFile(spec, []byte("name: x\ncache: ../cache\nstages:\n  a: {kind: gen}\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		link := filepath.Join(t.TempDir(), "linked")
		if err := os.Symlink(filepath.Join(project, "dags"), link); err != nil {
			t.Fatal(err)
		}
		dag := e.load(filepath.Join(link, "x.yaml"))
		if want := filepath.Join(project, "cache"); dag.Cache != want {
			t.Errorf("cache %q, want %q", dag.Cache, want)
		}
	})
}

// TestSpecMistakes: mistakes that used to pass silently (or truncate, or
// drop a stage) are spec errors with the line and a fix.
func TestSpecMistakes(t *testing.T) {
	cases := []struct {
		name string
		spec string
		line int
		want []string
	}{
		{"kind null", "name: x\nstages:\n  a: {kind: gen}\n  b: {kind: null, needs: [a]}\n", 4,
			[]string{`stage "b": kind is empty`, "known kinds: chunks, concat, count"}},
		{"kind empty", "name: x\nstages:\n  a: {kind: gen}\n  b:\n    kind: \"\"\n    needs: [a]\n", 5,
			[]string{`stage "b": kind is empty`}},
		{"fractional integer", "name: x\nstages:\n  a:\n    kind: gen\n    with:\n      rows: 10.4\n", 6,
			[]string{`rows must be a whole number, got 10.4`, "rows: 10"}},
		{"infinite integer", "name: x\nstages:\n  a:\n    kind: gen\n    with: {rows: .inf}\n", 5,
			[]string{`rows must be a whole number, got .inf`}},
		{"no stages", "name: x\nstages: {}\n", 2,
			[]string{"stages is empty: the spec does nothing"}},
		{"tab", "name: x\nstages:\n\ta: {kind: gen}\n", 3,
			[]string{"YAML forbids tabs", "indent with spaces"}},
		{"alias without anchor", "name: x\nstages:\n  a: {kind: gen, with: *nothing}\n", 3,
			[]string{"alias *nothing refers to no anchor"}},
		{"merge of a list", "name: x\nstages:\n  a:\n    kind: gen\n    with: {<<: [1, 2]}\n", 5,
			[]string{"`<<` must name a mapping"}},
		// Numbers YAML would silently change.
		{"number as text", "name: x\nstages:\n  a: {kind: gen, with: {file: 3.10}}\n", 3,
			[]string{`file: YAML reads 3.10 as the number 3.1, not the text "3.10"`, `file: "3.10"`}},
		{"octal as text", "name: x\nstages:\n  a: {kind: gen, with: {tags: [nightly, 0017]}}\n", 3,
			[]string{`tags: YAML reads 0017 as the number 15`}},
		{"leading zero", "name: x\nstages:\n  a:\n    kind: gen\n    with: {rows: 0512}\n", 5,
			[]string{`rows: 0512 has a leading zero, and YAML reads it as 330`, "rows: 512"}},
		{"name as number", "name: 2024.10\nstages:\n  a: {kind: gen}\n", 1,
			[]string{`name: YAML reads 2024.10 as the number 2024.1`}},
		{"not UTF-8", "name: x\nstages:\n  a: {kind: gen, with: {file: yard\xfdm}}\n", 3,
			[]string{"spec is not UTF-8 (byte 0xfd)", "save the spec as UTF-8"}},
		{"past 64 bits", "name: x\nstages:\n  a:\n    kind: gen\n    with: {rows: 9223372036854775808}\n", 5,
			[]string{`rows: 9223372036854775808 is too large`, "fits in 64 bits"}},
		{"duplicate key", "name: x\nstages:\n  a: {kind: gen}\n  a: {kind: gen}\n", 4,
			[]string{`mapping key "a" already defined`, "keep one of them"}},
		{"empty parameter", "name: x\nstages:\n  a:\n    kind: gen\n    with:\n      rows:\n", 6,
			[]string{`stage "a": rows is empty`, "remove the line for the default (100)"}},
		{"variable in cache", "name: x\ncache: $HOME/pcache\nstages:\n  a: {kind: gen}\n", 2,
			[]string{`$HOME is not expanded (a spec reads no environment variables)`, "~/"}},
		// The suggestion is another stage, one in error too, never itself.
		{"need near itself", "name: x\nstages:\n  data: {kind: gen}\n  c1: {kind: double, needs: [c]}\n", 4,
			[]string{`stage "c1" needs "c", which is not defined`, "stages in this spec: data"}},
		{"need near a broken stage", "name: x\nstages:\n  src: {kind: gen, with: {rows: -1}}\n  b: {kind: double, needs: [sr]}\n", 3,
			[]string{`needs "sr", which is not defined`, `did you mean "src"?`}},
		// A stage in error for its parameters still has its inputs checked.
		{"broken stage's need", "name: x\nstages:\n  a: {kind: gen}\n  b: {kind: double, needs: [aa], with: {scale: 1, nope: 2}}\n", 4,
			[]string{`stage "b" needs "aa", which is not defined`, `did you mean "a"?`}},
		{"key in capitals", "name: x\nstages:\n  a: {Kind: gen}\n", 3,
			[]string{`unknown key "Kind"`, `did you mean "kind"?`}},
		{"stage for stages", "name: x\nstage:\n  a: {kind: gen}\n", 2,
			[]string{`unknown key "stage"`, `did you mean "stages"?`}},
		// Found by FuzzLoadSpec: the YAML library panics on a stray tag
		// before a null list; the loader used to crash with it.
		{"library panic", "name: x\nstages:\n  a:\n    kind: gen\n    with:\n      tags: !-]\n", 3,
			[]string{"the YAML library cannot read this"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			e := newTestEnv(t)
			path := e.write("bad.yaml", c.spec)
			dag, err := Load(path, e.reg)
			if err == nil {
				// What the stages read is checked by the plan that
				// needs them (a run of all stages here).
				_, err = e.store.Plan(dag, Options{})
			}
			if err == nil {
				t.Fatal("spec planned without error")
			}
			if !IsSpecError(err) {
				t.Fatalf("not a spec error: %T %v", err, err)
			}
			msg := err.Error()
			if !strings.HasPrefix(msg, path+":"+strconv.Itoa(c.line)+":") {
				t.Errorf("want line %d in %q", c.line, msg)
			}
			for _, w := range c.want {
				if !strings.Contains(msg, w) {
					t.Errorf("message lacks %q:\n%s", w, msg)
				}
			}
		})
	}
}

// TestAliasBomb: nested aliases that would expand beyond any real spec are
// refused rather than decoded.
func TestAliasBomb(t *testing.T) {
	e := newTestEnv(t)
	var b strings.Builder
	b.WriteString("name: x\nl0: &l0 [a, a, a, a, a, a, a, a, a, a]\n")
	for i := 1; i < 9; i++ {
		fmt.Fprintf(&b, "l%d: &l%d [*l%d, *l%d, *l%d, *l%d, *l%d, *l%d, *l%d, *l%d, *l%d, *l%d]\n", i, i, i-1, i-1, i-1, i-1, i-1, i-1, i-1, i-1, i-1, i-1)
	}
	b.WriteString("stages:\n  a: {kind: gen}\n")
	_, err := Load(e.write("bomb.yaml", b.String()), e.reg)
	if err == nil || !strings.Contains(err.Error(), "aliases expand the spec") {
		t.Fatalf("want the expansion refused, got %v", err)
	}
}

// TestSpecPathIsNotAFile: a spec path that is a folder, a named pipe or a
// link loop is refused with what it is (a pipe would block the read).
func TestSpecPathIsNotAFile(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo.yaml")
	if err := syscall.Mkfifo(fifo, 0o644); err != nil {
		t.Skip("no named pipes here:", err)
	}
	loop := filepath.Join(dir, "loop.yaml")
	os.Symlink(filepath.Join(dir, "loop2.yaml"), loop)
	os.Symlink(loop, filepath.Join(dir, "loop2.yaml"))
	for path, want := range map[string]string{
		dir:                                "is a folder",
		fifo:                               "is a named pipe",
		loop:                               "loop of symbolic links",
		filepath.Join(dir, "missing.yaml"): "does not exist",
	} {
		done := make(chan error, 1)
		go func() { _, err := Load(path, testRegistry()); done <- err }()
		select {
		case err := <-done:
			if !IsSpecError(err) || !strings.Contains(err.Error(), want) {
				t.Errorf("%s: %v, want a spec error saying %q", path, err, want)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("%s: Load blocked", path)
		}
	}
}
