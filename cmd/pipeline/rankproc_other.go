//go:build !linux

package main

import "syscall"

// rankProcAttr: only Linux can tie a child's life to its parent's; a rank
// elsewhere outlives a launcher killed without a signal to forward.
func rankProcAttr() *syscall.SysProcAttr { return nil }

func lockRankThread() (unlock func()) { return func() {} }
