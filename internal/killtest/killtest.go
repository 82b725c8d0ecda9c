// Package killtest runs a test's child process and SIGKILLs it at random
// moments until it finishes, for tests that prove a run resumes after a
// kill with the results of an uninterrupted one.
package killtest

import (
	"bufio"
	"math/rand/v2"
	"os"
	"os/exec"
	"syscall"
	"testing"
	"time"
)

// Options says what to run and how hard to kill it.
type Options struct {
	// Child is the name of the test function the child process runs (this
	// test binary, -test.run=^Child$); Env is set in its environment.
	Child string
	Env   []string
	// The child prints one line per unit of progress; it is killed after a
	// random 1 .. MaxLinesBeforeKill of them, up to Kills times, a random
	// delay of up to MaxDelay after the line (mid-step or mid-checkpoint).
	Kills, MaxLinesBeforeKill int
	MaxDelay                  time.Duration
	// BeforeAttempt, when set, runs before each start of the child.
	BeforeAttempt func()
}

// Run restarts the child until it exits successfully and returns how many
// times it was killed. It fails t if the child fails on its own, if no kill
// happened, or if it does not finish within Kills + 20 starts.
func Run(t *testing.T, o Options) int {
	t.Helper()
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 1))
	kills := 0
	for attempt := 0; ; attempt++ {
		if attempt > o.Kills+20 {
			t.Fatalf("%s did not finish after %d starts", o.Child, attempt)
		}
		if o.BeforeAttempt != nil {
			o.BeforeAttempt()
		}
		cmd := exec.Command(os.Args[0], "-test.run=^"+o.Child+"$", "-test.count=1")
		cmd.Env = append(os.Environ(), o.Env...)
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		killAfter := 1 + rng.IntN(o.MaxLinesBeforeKill)
		sc := bufio.NewScanner(stdout)
		killed, seen := false, 0
		for sc.Scan() {
			if seen++; seen == killAfter && kills < o.Kills {
				time.Sleep(time.Duration(rng.Int64N(int64(o.MaxDelay) + 1)))
				cmd.Process.Signal(syscall.SIGKILL)
				killed = true
				kills++
				break
			}
		}
		go func() {
			for sc.Scan() {
			}
		}()
		err = cmd.Wait()
		if !killed {
			if err != nil {
				t.Fatalf("%s failed: %v", o.Child, err)
			}
			break
		}
	}
	if kills == 0 {
		t.Fatalf("%s finished before any kill", o.Child)
	}
	return kills
}
