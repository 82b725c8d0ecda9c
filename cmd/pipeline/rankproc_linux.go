package main

import (
	"runtime"
	"syscall"
)

// rankProcAttr makes a rank started by --gpus receive SIGTERM, a clean
// stop, when the launcher dies without forwarding one (kill -9, the OOM
// killer): ranks left running would keep their GPUs from the next run.
// Linux sends it when the thread that started the child ends, so the
// caller starts every rank from one locked thread (lockRankThread) that
// lives until they have all exited.
func rankProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
}

// lockRankThread keeps the calling goroutine on its thread until unlock,
// so that no rank it starts sees that thread end early.
func lockRankThread() (unlock func()) {
	runtime.LockOSThread()
	return runtime.UnlockOSThread
}
