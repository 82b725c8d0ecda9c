package hub

import (
	"errors"
	"syscall"
)

// diskFull says whether err is a write that found no space left:
// ERROR_DISK_FULL and ERROR_HANDLE_DISK_FULL on Windows.
func diskFull(err error) bool {
	return errors.Is(err, syscall.Errno(112)) || errors.Is(err, syscall.Errno(39)) || errors.Is(err, syscall.ENOSPC)
}
