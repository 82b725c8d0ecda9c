// Package diskfull tells the errors of a write that found no room: the
// disk full, or the user's quota spent.
package diskfull

import (
	"errors"
	"syscall"
)

// Is says whether err is a write that found no space left:
// ERROR_DISK_FULL and ERROR_HANDLE_DISK_FULL on Windows.
func Is(err error) bool {
	return errors.Is(err, syscall.Errno(112)) || errors.Is(err, syscall.Errno(39)) || errors.Is(err, syscall.ENOSPC)
}
