//go:build !windows

package hub

import (
	"errors"
	"syscall"
)

// diskFull says whether err is a write that found no space left.
func diskFull(err error) bool { return errors.Is(err, syscall.ENOSPC) }
