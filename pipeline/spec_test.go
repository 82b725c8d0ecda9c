package pipeline

import (
	"strconv"
	"strings"
	"testing"
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
			[]string{`stage "a" has no kind`, "known kinds: concat, count, double, fail, gen"}},
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
		{"no stages", "name: x\n", 1, []string{"missing `stages:`"}},
		{"bad stage name", "name: x\nstages:\n  1a: {kind: gen}\n", 3, []string{`bad stage name "1a"`}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			e := newTestEnv(t)
			path := e.write("bad.yaml", c.spec)
			_, err := Load(path, e.reg)
			if err == nil {
				t.Fatal("spec loaded without error")
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

func TestSpecReportsAllErrors(t *testing.T) {
	e := newTestEnv(t)
	path := e.write("bad.yaml", "name: x\nstages:\n  a: {kind: nope}\n  b: {kind: gen, with: {rows: -1}}\n")
	_, err := Load(path, e.reg)
	errs, ok := err.(SpecErrors)
	if !ok || len(errs) != 2 || errs[0].Line != 3 || errs[1].Line != 4 {
		t.Fatalf("want two errors on lines 3 and 4, got %v", err)
	}
}
