package pipeline

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/user"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"

	"gemmaft/internal/userdir"
)

// ExpandHome replaces a leading "~" or "~user" in p with that home folder,
// as a shell would; other paths are returned as they are.
func ExpandHome(p string) (string, error) {
	if !strings.HasPrefix(p, "~") {
		return p, nil
	}
	name, rest, _ := strings.Cut(p[1:], "/")
	if strings.Contains(name, string(filepath.Separator)) {
		name, rest, _ = strings.Cut(p[1:], string(filepath.Separator))
	}
	var home string
	if name == "" {
		h, err := userdir.Home()
		if err != nil {
			return p, fmt.Errorf("cannot expand ~ in %q: %w", p, err)
		}
		home = h
	} else {
		u, err := user.Lookup(name)
		if err != nil {
			return p, fmt.Errorf("cannot expand ~%s in %q: no such user", name, p)
		}
		home = u.HomeDir
	}
	return filepath.Join(home, rest), nil
}

// ResolvePath turns a path as a spec writes it into an absolute one: a
// leading ~ is the home folder, and a relative path is relative to dir
// (the spec's folder). A variable ($HOME, ${DATA}) is an error: a spec's
// meaning does not change with the environment it runs in (cron's is
// bare), and a folder literally named $HOME is never what was meant.
func ResolvePath(dir, p string) (string, error) {
	if v := variableIn(p); v != "" {
		return "", fmt.Errorf("%q: %s is not expanded (a spec reads no environment variables); write ~/… for the home folder, or a path relative to the spec's folder", p, v)
	}
	p, err := ExpandHome(p)
	if err != nil {
		return "", err
	}
	if !filepath.IsAbs(p) {
		p = filepath.Join(dir, p)
	}
	return p, nil
}

// A FileError says why a path cannot be read as a file.
type FileError struct {
	Path string
	Why  string // "is a folder, not a regular file", "does not exist", ...
	Err  error  // the cause, when there is one
}

func (e *FileError) Error() string { return e.Path + " " + e.Why }
func (e *FileError) Unwrap() error { return e.Err }

// CheckReadableFile returns nil when path is a regular file this process
// may read, and otherwise an error that says what the path is instead: a
// folder, a named pipe (whose reading would wait for a writer), a device, a
// symbolic link loop or a dangling link, a missing file, or one it may not
// read.
func CheckReadableFile(path string) error {
	fi, err := os.Stat(path)
	if err != nil {
		return describeStatError(path, err)
	}
	if why := notRegular(fi.Mode()); why != "" {
		return &FileError{Path: path, Why: "is " + why + ", not a regular file"}
	}
	f, err := os.Open(path)
	if err != nil {
		return describeStatError(path, err)
	}
	f.Close()
	return nil
}

// notRegular names what a file of mode m is, or "" for a regular file.
func notRegular(m fs.FileMode) string {
	switch {
	case m.IsRegular():
		return ""
	case m.IsDir():
		return "a folder"
	case m&fs.ModeNamedPipe != 0:
		return "a named pipe (FIFO; reading it would wait for a writer)"
	case m&fs.ModeSocket != 0:
		return "a socket"
	case m&fs.ModeDevice != 0 || m&fs.ModeCharDevice != 0:
		return "a device"
	}
	return "not a regular file (" + m.Type().String() + ")"
}

func describeStatError(path string, err error) error {
	fe := &FileError{Path: path, Err: err}
	switch {
	case errors.Is(err, syscall.ELOOP):
		fe.Why = "is a loop of symbolic links"
	case errors.Is(err, fs.ErrNotExist):
		fe.Why = "does not exist"
		if fi, lerr := os.Lstat(path); lerr == nil && fi.Mode()&fs.ModeSymlink != 0 {
			target, _ := os.Readlink(path)
			fe.Why = "is a symbolic link to " + target + ", which does not exist"
		}
	case errors.Is(err, syscall.ENOTDIR):
		fe.Why = "does not exist (a folder on its path is a file)"
	case errors.Is(err, fs.ErrPermission):
		fe.Why = "cannot be read: permission denied (on it or a folder above it)"
	default:
		var pe *fs.PathError
		if errors.As(err, &pe) {
			fe.Why = "cannot be read: " + pe.Err.Error()
		} else {
			fe.Why = "cannot be read: " + err.Error()
		}
	}
	return fe
}

// variableIn returns the first shell variable p names ($NAME or ${NAME}),
// or "".
func variableIn(p string) string {
	return shellVariable.FindString(p)
}

var shellVariable = regexp.MustCompile(`\$(\{[A-Za-z_][A-Za-z0-9_]*\}|[A-Za-z_][A-Za-z0-9_]*)`)
