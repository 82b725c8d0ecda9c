//go:build !windows

// Package diskfull tells the errors of a write that found no room: the
// disk full, or the user's quota spent.
package diskfull

import (
	"errors"
	"syscall"
)

// Is says whether err is a write that found no space left.
func Is(err error) bool { return errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) }
