// Command pipeline runs declarative DAGs that turn instruction data into
// Gemma 3 training rows and LoRA adapters, caching every stage's output by
// the content hash of what made it.
//
// Each subcommand lives in its own file and adds itself to root in an init
// function, so commands stay independent of one another.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"regexp"
	"strings"
	"syscall"

	"github.com/spf13/cobra"

	"gemmaft/pipeline"
	"gemmaft/stages"

	// The GPU trainer registers itself as the qlora stage's "cuda" backend.
	_ "gemmaft/trainer/gpu"
)

// Exit codes, documented in the README and in `pipeline --help`.
const (
	exitOK       = 0
	exitFailed   = 1  // a stage or check failed
	exitUsage    = 2  // bad flags, arguments or spec
	exitLockBusy = 75 // --no-wait and another run holds the DAG (EX_TEMPFAIL)
	// 128 + the signal's number when interrupted: 130 (SIGINT), 143 (SIGTERM),
	// 129 (SIGHUP).
)

var root = &cobra.Command{
	Use:   "pipeline",
	Short: "Run cached data and fine-tuning DAGs for Gemma 3",
	Long: `pipeline runs a declarative DAG of stages (data sources, chat templating,
tokenizing, packing, QLoRA training, evaluation, generation, merging, GGUF
export), caching each stage's output under the content hash of everything that
produced it. The stage kinds:

` + indentedList(stages.Registry().Names(), 78) + `

The README's table gives each kind's inputs, output and parameters; a spec
naming a parameter its kind does not have is told the kind's parameters.

Exit codes: 0 success, 1 a stage or check failed (or a model's --out exists
already), 2 usage or spec error, 75 busy and --no-wait was given (another run
holds the DAG's lock or computes an entry the run needs, gc holds the cache, or,
for gc, runs use it), 130, 143 or 129 interrupted by SIGINT, SIGTERM or
SIGHUP.`,
	SilenceUsage:  true,
	SilenceErrors: true,
	Version:       pipeline.Version(), // --version; manifests and reports record it too
}

// exitError carries an exit code out of a command.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }

// usageErr marks err as a usage or spec error (exit 2).
func usageErr(err error) error { return &exitError{exitUsage, err} }

// failErr marks err as a failed stage or check (exit 1).
func failErr(err error) error { return &exitError{exitFailed, err} }

// started is set once a command's own code begins; errors raised before
// that (unknown command, wrong argument count, bad flag) are usage errors.
var started bool

func init() {
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageErr(plainFlagErr(err)) })
	root.PersistentPreRunE = func(cmd *cobra.Command, _ []string) error {
		started = true
		// Every command logs or notices; a bad value is refused by all
		// alike, not only by those that make a logger.
		if _, err := newLogger(); err != nil {
			return err
		}
		warnCacheUnused(cmd)
		return nil
	}
}

// strconvErr is the parser's part of a bad flag value's error:
// `strconv.ParseUint: parsing "-1": invalid syntax`.
var strconvErr = regexp.MustCompile(`strconv\.Parse(Uint|Int|Float|Bool): parsing "[^"]*": (invalid syntax|value out of range)`)

// plainFlagErr says what a bad flag value should be, in place of the
// parser's words.
func plainFlagErr(err error) error {
	msg := strconvErr.ReplaceAllStringFunc(err.Error(), func(m string) string {
		sub := strconvErr.FindStringSubmatch(m)
		if sub[2] == "value out of range" {
			return "out of range"
		}
		return map[string]string{"Uint": "want a whole number, 0 or more", "Int": "want a whole number",
			"Float": "want a number", "Bool": "want true or false"}[sub[1]]
	})
	return errors.New(msg)
}

// stoppedErr is err as a command interrupted with exit code code (0: not
// interrupted) reports it: work stopped at the signal says which signal,
// not "context canceled".
func stoppedErr(err error, code int) error {
	if code <= 128 {
		return err
	}
	lines := strings.Split(err.Error(), "\n") // errors.Join's, one a stage
	for i, l := range lines {
		if m, ok := strings.CutSuffix(l, context.Canceled.Error()); ok {
			lines[i] = m + "stopped by " + signalName(syscall.Signal(code-128))
		}
	}
	return errors.New(strings.Join(lines, "\n"))
}

func main() {
	os.Exit(execute(os.Args[1:]))
}

// stdout is where commands print: a write that fails (a full disk, a
// closed file) fails the command, as it does for the tools a script pipes
// them into, rather than exit 0 having printed nothing.
var stdout = &checkedWriter{w: os.Stdout}

func init() { root.SetOut(stdout) } // a test may set its own

func execute(args []string) int {
	stdout.err = nil // for tests that execute several commands
	root.SetArgs(args)
	err := root.Execute()
	if err == nil && stdout.err != nil {
		err = failErr(fmt.Errorf("writing to standard output: %w", stdout.err))
	}
	if err == nil {
		return exitOK
	}
	code := interruptCode()
	notice(slog.LevelError, "pipeline: "+stoppedErr(err, code).Error())
	if code != 0 {
		return code // 130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP
	}
	var ee *exitError
	if errors.As(err, &ee) {
		return ee.code
	}
	if !started {
		return exitUsage
	}
	return exitFailed
}

// indentedList lays names out comma-separated in lines of at most width
// columns, each indented by two spaces.
func indentedList(names []string, width int) string {
	var b strings.Builder
	line := 0
	for i, n := range names {
		if i < len(names)-1 {
			n += ","
		}
		if line > 0 && line+1+len(n) > width {
			b.WriteString("\n")
			line = 0
		}
		if line == 0 {
			b.WriteString("  ")
			line = 2
		} else {
			b.WriteString(" ")
			line++
		}
		b.WriteString(n)
		line += len(n)
	}
	return b.String()
}

// checkedWriter keeps the first error of its writes, so that an answer
// that could not be written (a full disk) fails the command rather than
// vanish.
type checkedWriter struct {
	w   io.Writer
	err error
}

func (c *checkedWriter) Write(p []byte) (int, error) {
	if c.err != nil {
		return 0, c.err
	}
	n, err := c.w.Write(p)
	c.err = err
	return n, err
}
