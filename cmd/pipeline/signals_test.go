package main

import (
	"syscall"
	"testing"
	"time"
)

// TestSignalDeliveredTwice: a SIGINT that arrives twice at once (coreutils'
// timeout signals the process and then its group) stops gracefully, as one
// Ctrl-C does, instead of at once. The stop at once would exit this test's
// process.
func TestSignalDeliveredTwice(t *testing.T) {
	ctx, stop := signalContext(time.Minute)
	defer stop()
	defer interrupted.Store(0)
	if err := syscall.Kill(syscall.Getpid(), syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	select {
	case <-ctx.Done(): // the handler has the first
	case <-time.After(10 * time.Second):
		t.Fatal("the context was not canceled")
	}
	if err := syscall.Kill(syscall.Getpid(), syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	time.Sleep(3 * sameSignal) // the handler has seen the second: the process is still here
}
