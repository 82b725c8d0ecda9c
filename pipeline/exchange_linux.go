package pipeline

import (
	"errors"

	"golang.org/x/sys/unix"
)

// exchangeDirs swaps the folders at a and b in one step (renameat2 with
// RENAME_EXCHANGE), so that b is never missing. It reports false when the
// file system cannot (an old kernel, NFS), for the caller to fall back.
func exchangeDirs(a, b string) (bool, error) {
	err := unix.Renameat2(unix.AT_FDCWD, a, unix.AT_FDCWD, b, unix.RENAME_EXCHANGE)
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, unix.EINVAL), errors.Is(err, unix.ENOSYS), errors.Is(err, unix.ENOTSUP), errors.Is(err, unix.EOPNOTSUPP):
		return false, nil
	}
	return false, err
}
