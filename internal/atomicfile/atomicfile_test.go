package atomicfile

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
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

// TestDirOwnTemporaryName: a folder the user calls OUT.tmp is not the
// work folder of OUT; "out/" as a shell completes it is out.
func TestDirOwnTemporaryName(t *testing.T) {
	root := t.TempDir()
	out := filepath.Join(root, "model")
	os.Mkdir(out+".tmp", 0o755)
	os.WriteFile(filepath.Join(out+".tmp", "notes.txt"), []byte("mine"), 0o644)
	if err := Dir(out+"/", func(dir string) error { return os.WriteFile(filepath.Join(dir, "a"), []byte("1"), 0o644) }); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(out+".tmp", "notes.txt")); err != nil || string(b) != "mine" {
		t.Errorf("the user's model.tmp: %q %v", b, err)
	}
	if b, err := os.ReadFile(filepath.Join(out, "a")); err != nil || string(b) != "1" {
		t.Errorf("model/a: %q %v", b, err)
	}
	if ents, _ := os.ReadDir(root); len(ents) != 2 {
		t.Errorf("left beside model: %v", ents)
	}
}

// TestRemovePending: what a process about to exit on a signal removes is
// exactly the writes in progress.
func TestRemovePending(t *testing.T) {
	root := t.TempDir()
	done := filepath.Join(root, "done")
	if err := WriteFile(done, []byte("whole")); err != nil {
		t.Fatal(err)
	}
	p, err := Create(filepath.Join(root, "file"))
	if err != nil {
		t.Fatal(err)
	}
	p.Write([]byte("half"))
	p.w.Flush()
	var inFill []string
	err = Dir(filepath.Join(root, "folder"), func(dir string) error {
		os.WriteFile(filepath.Join(dir, "a"), []byte("1"), 0o644)
		RemovePending() // the signal, while the folder fills
		ents, _ := os.ReadDir(root)
		for _, e := range ents {
			inFill = append(inFill, e.Name())
		}
		return errors.New("interrupted")
	})
	if err == nil {
		t.Fatal("no error")
	}
	if len(inFill) != 1 || inFill[0] != "done" {
		t.Errorf("after RemovePending the folder holds %v, want [done]", inFill)
	}
	p.Abort()
}

// TestErrorsNamePath: a write that cannot start names the path asked for,
// not the temporary file's.
func TestErrorsNamePath(t *testing.T) {
	out := filepath.Join(t.TempDir(), "no", "such", "folder", "x.gguf")
	_, err := Create(out)
	if err == nil || !strings.Contains(err.Error(), out) || strings.Contains(err.Error(), ".tmp") {
		t.Errorf("Create: %v", err)
	}
	file := filepath.Join(t.TempDir(), "file")
	os.WriteFile(file, nil, 0o644)
	err = Dir(filepath.Join(file, "model"), func(string) error { return nil })
	if err == nil || strings.Contains(err.Error(), ".tmp") {
		t.Errorf("Dir under a file: %v", err)
	}
}
