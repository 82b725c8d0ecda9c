// Package userdir finds the user's home and cache folders as Python's
// os.path.expanduser, and so huggingface_hub, finds them: $HOME, else the
// account's home folder in the user database. A service started without
// HOME (a systemd unit without User=, env -i) then uses the caches its
// user's shell uses, where Go's os.UserHomeDir would fail.
package userdir

import (
	"errors"
	"os"
	"os/user"
	"path/filepath"
	"runtime"
)

// Home is the user's home folder.
func Home() (string, error) {
	if h := os.Getenv("HOME"); h != "" {
		return h, nil
	}
	if u, err := user.Current(); err == nil && u.HomeDir != "" {
		return u.HomeDir, nil
	}
	return "", errors.New("$HOME is not set, and the user database has no home folder for this user")
}

// Cache is the user's cache folder: $XDG_CACHE_HOME, else ~/.cache
// (~/Library/Caches on macOS), as os.UserCacheDir has it.
func Cache() (string, error) {
	if d, err := os.UserCacheDir(); err == nil {
		return d, nil
	}
	h, err := Home()
	if err != nil {
		return "", err
	}
	if runtime.GOOS == "darwin" {
		return filepath.Join(h, "Library", "Caches"), nil
	}
	return filepath.Join(h, ".cache"), nil
}
