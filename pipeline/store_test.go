package pipeline

import (
	"encoding/json"
	"os"
	"os/user"
	"path/filepath"
	"testing"
)

func TestCacheRootPrecedence(t *testing.T) {
	root := func(flag string, dag *DAG) string {
		t.Helper()
		r, err := CacheRoot(flag, dag)
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	dag := &DAG{Cache: "/from/spec"}
	t.Setenv(CacheEnv, "/from/env")
	if got := root("/from/flag", dag); got != "/from/flag" {
		t.Errorf("flag: %s", got)
	}
	if got := root("", dag); got != "/from/env" {
		t.Errorf("environment: %s", got)
	}
	t.Setenv(CacheEnv, "")
	if got := root("", dag); got != "/from/spec" {
		t.Errorf("spec: %s", got)
	}
	t.Setenv("HOME", "/home/u")
	t.Setenv("XDG_CACHE_HOME", "")
	if got := root("", nil); got != "/home/u/.cache/pipeline" {
		t.Errorf("default: %s", got)
	}
	// A service started without HOME (systemd without User=, env -i) uses
	// its user's cache, as its commands run by hand do, not a temporary
	// folder.
	t.Setenv("HOME", "")
	if u, err := user.Current(); err == nil && u.HomeDir != "" {
		if got, want := root("", nil), filepath.Join(u.HomeDir, ".cache", "pipeline"); got != want {
			t.Errorf("without HOME: %s, want %s", got, want)
		}
	}
}

// TestManifestOfANameNotUTF8: a data file named in a legacy code page
// (güz.jsonl saved as Latin-1) gives a manifest that reads back whole, not
// one "edited or torn" on every later run.
func TestManifestOfANameNotUTF8(t *testing.T) {
	dir := t.TempDir()
	m := &Manifest{Key: "k", Stage: "s", Kind: "jsonl", Params: json.RawMessage(`{}`),
		Files: []FileRef{{Path: "/data/g\xfcz.jsonl", Size: 3, SHA256: "ab"}}}
	data, err := m.encode()
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, manifestName), data, 0o644); err != nil {
		t.Fatal(err)
	}
	got, err := ReadManifest(dir)
	if err != nil {
		t.Fatalf("the manifest does not read back: %v", err)
	}
	if got.Files[0].Path != "/data/g\ufffdz.jsonl" {
		t.Errorf("path read back as %q", got.Files[0].Path)
	}
}
