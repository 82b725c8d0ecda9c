package userdir

import (
	"os/user"
	"path/filepath"
	"strings"
	"testing"
)

// TestWithoutHome: with HOME unset, the home and cache folders are the
// account's, as a shell or Python finds them, not an error or a relative
// path.
func TestWithoutHome(t *testing.T) {
	u, err := user.Current()
	if err != nil || u.HomeDir == "" {
		t.Skipf("no user database entry for this user: %v", err)
	}
	t.Setenv("HOME", "")
	t.Setenv("XDG_CACHE_HOME", "")
	if h, err := Home(); err != nil || h != u.HomeDir {
		t.Errorf("Home() = %q, %v; want %q", h, err, u.HomeDir)
	}
	if c, err := Cache(); err != nil || !filepath.IsAbs(c) || !strings.HasPrefix(c, u.HomeDir) {
		t.Errorf("Cache() = %q, %v; want a folder under %s", c, err, u.HomeDir)
	}
	t.Setenv("HOME", "/somewhere")
	t.Setenv("XDG_CACHE_HOME", "/xdg")
	if h, _ := Home(); h != "/somewhere" {
		t.Errorf("Home() with HOME set = %q", h)
	}
	if c, _ := Cache(); c != "/xdg" {
		t.Errorf("Cache() with XDG_CACHE_HOME set = %q", c)
	}
}
