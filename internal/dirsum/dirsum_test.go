package dirsum

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestWriteVerify(t *testing.T) {
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "sub"), 0o755)
	os.WriteFile(filepath.Join(dir, "a"), []byte("a"), 0o644)
	os.WriteFile(filepath.Join(dir, "sub", "b"), []byte("b"), 0o644)
	if err := Verify(dir); !errors.Is(err, ErrNoSums) {
		t.Fatalf("before Write: %v", err)
	}
	if err := Write(dir); err != nil {
		t.Fatal(err)
	}
	sums, _ := os.ReadFile(filepath.Join(dir, File))
	// sha256sum's format, so that `sha256sum -c SHA256SUMS` works too.
	if !strings.Contains(string(sums), "  a\n") || !strings.Contains(string(sums), "  sub/b\n") {
		t.Fatalf("%s", sums)
	}
	if err := Verify(dir); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, "sub", "b"), []byte("c"), 0o644)
	if err := Verify(dir); err == nil || !strings.Contains(err.Error(), "sub/b does not match") {
		t.Fatalf("changed file: %v", err)
	}
	os.WriteFile(filepath.Join(dir, "sub", "b"), []byte("b"), 0o644)
	os.Remove(filepath.Join(dir, "a"))
	if err := Verify(dir); err == nil || !strings.Contains(err.Error(), "a: no such file") {
		t.Fatalf("missing file: %v", err)
	}
	if IsSetAside(dir) {
		t.Fatal("set aside before SetAside")
	}
	SetAside(dir, "why")
	if !IsSetAside(dir) {
		t.Fatal("not set aside")
	}
}
