package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"gemmaft/internal/atomicfile"
)

// Interrupts. The first SIGINT, SIGTERM or SIGHUP (the terminal closed)
// cancels the command's context:
// `run` stops its stages, records the run and prints the table so far;
// `tokenize` and `export` stop writing and discard their unfinished output.
// A command still busy after a grace period (blocked reading a terminal or
// a pipe, say), or a second signal, makes the process remove the temporary
// files of its unfinished writes and exit at once. Either way the exit
// code is 128 + the signal's number, 130 for SIGINT, 143 for SIGTERM and
// 129 for SIGHUP, as shells report it, so that cron and systemd can tell an
// interruption from a failure.

// stopSignals are the signals that stop a command cleanly.
var stopSignals = []os.Signal{os.Interrupt, syscall.SIGTERM, syscall.SIGHUP}

// interrupted is the number of the signal that interrupted the command, 0
// while none has.
var interrupted atomic.Int32

// signalContext returns a context canceled by the first SIGINT or SIGTERM,
// and a stop function that restores the default handling. grace is how
// long the command may take to stop by itself.
func signalContext(grace time.Duration) (context.Context, func()) {
	return signalContextFrom(context.Background(), grace)
}

// signalContextFrom is signalContext under parent, whose cancellation and
// deadline it keeps.
func signalContextFrom(parent context.Context, grace time.Duration) (context.Context, func()) {
	ctx, cancel := context.WithCancelCause(context.WithValue(parent, signalsKey{}, true))
	ch := make(chan os.Signal, 2)
	signal.Notify(ch, stopSignals...)
	done := make(chan struct{})
	go func() {
		var sig os.Signal
		select {
		case sig = <-ch:
		case <-done:
			return
		}
		num := int32(sig.(syscall.Signal))
		interrupted.Store(num)
		notice(slog.LevelWarn, fmt.Sprintf("pipeline: %s: stopping (again to stop at once)", signalName(sig)))
		cancel(signalCause{sig})
		first, timer := time.Now(), time.NewTimer(grace)
		defer timer.Stop()
	wait:
		for {
			select {
			case again := <-ch:
				// One signal delivered twice at once (coreutils' timeout
				// signals the process and then its group) is one request.
				if again == sig && time.Since(first) < sameSignal {
					continue
				}
				break wait
			case <-timer.C:
				break wait
			case <-done:
				return
			}
		}
		atomicfile.RemovePending() // what the command leaves half-written
		notice(slog.LevelWarn, "pipeline: stopped by "+signalName(sig))
		os.Exit(128 + int(num))
	}()
	var once sync.Once
	return ctx, func() {
		once.Do(func() {
			signal.Stop(ch)
			close(done)
			cancel(nil)
		})
	}
}

// sameSignal is how soon after a first signal a second counts as the same
// delivery, not a second request: far below a person's double press.
const sameSignal = 200 * time.Millisecond

// signalsKey marks a context that signalContext made.
type signalsKey struct{}

// watchesSignals reports whether ctx is canceled by a signal.
func watchesSignals(ctx context.Context) bool { return ctx.Value(signalsKey{}) != nil }

// interruptCode is the exit code of a command interrupted by a signal, or
// 0 when no signal came.
func interruptCode() int {
	if s := interrupted.Load(); s != 0 {
		return 128 + int(s)
	}
	return 0
}

// signalCause is the cause of a context canceled by a signal; it is a
// context.Canceled, as stages expect.
type signalCause struct{ sig os.Signal }

func (c signalCause) Error() string        { return "interrupted by " + signalName(c.sig) }
func (c signalCause) Is(target error) bool { return target == context.Canceled }

func signalName(sig os.Signal) string {
	switch sig {
	case os.Interrupt:
		return "SIGINT"
	case syscall.SIGTERM:
		return "SIGTERM"
	case syscall.SIGHUP:
		return "SIGHUP"
	}
	return sig.String()
}
