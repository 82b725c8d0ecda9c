package atomicfile

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"
)

func TestWriteReplacesWhole(t *testing.T) {
	p := filepath.Join(t.TempDir(), "f.json")
	if err := WriteFile(p, []byte("old")); err != nil {
		t.Fatal(err)
	}
	if err := WriteFile(p, []byte("new content")); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(p); string(got) != "new content" {
		t.Fatalf("got %q", got)
	}
	fi, _ := os.Stat(p)
	if fi.Mode().Perm() != 0o644 {
		t.Errorf("mode %v", fi.Mode().Perm())
	}
}

func TestFailedWriteLeavesOldFileAndNoTemp(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "f")
	WriteFile(p, []byte("old"))
	boom := errors.New("boom")
	err := Write(p, func(w io.Writer) error {
		w.Write([]byte("half"))
		return boom
	})
	if !errors.Is(err, boom) {
		t.Fatalf("err = %v", err)
	}
	if got, _ := os.ReadFile(p); string(got) != "old" {
		t.Fatalf("old content lost: %q", got)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Fatalf("left %d files", len(ents))
	}
}

func TestDirAppearsWholeOrNotAtAll(t *testing.T) {
	root := t.TempDir()
	out := filepath.Join(root, "model")
	err := Dir(out, func(dir string) error {
		os.WriteFile(filepath.Join(dir, "a"), []byte("1"), 0o644)
		return errors.New("disk full")
	})
	if err == nil {
		t.Fatal("a failed fill succeeded")
	}
	if ents, _ := os.ReadDir(root); len(ents) != 0 {
		t.Fatalf("a failed fill left %v", ents)
	}
	if err := Dir(out, func(dir string) error { return os.WriteFile(filepath.Join(dir, "a"), []byte("1"), 0o644) }); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(out, "a")); err != nil || string(b) != "1" {
		t.Fatalf("%q %v", b, err)
	}
	if err := Dir(out, func(string) error { return nil }); !errors.Is(err, os.ErrExist) {
		t.Errorf("an existing folder was not refused: %v", err)
	}
}

func TestPendingAbortAndCommit(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "f")
	WriteFile(p, []byte("old"))
	w, err := Create(p)
	if err != nil {
		t.Fatal(err)
	}
	w.Write([]byte("half"))
	w.Abort()
	if got, _ := os.ReadFile(p); string(got) != "old" {
		t.Fatalf("abort changed the file: %q", got)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Fatalf("abort left %d files", len(ents))
	}
	w, _ = Create(p)
	w.Write([]byte("new"))
	if err := w.Commit(); err != nil {
		t.Fatal(err)
	}
	w.Abort() // a no-op after Commit
	if got, _ := os.ReadFile(p); string(got) != "new" {
		t.Fatalf("commit: %q", got)
	}
}
