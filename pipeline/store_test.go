package pipeline

import (
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
