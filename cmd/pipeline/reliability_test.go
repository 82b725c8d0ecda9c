package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"gemmaft/internal/atomicfile"
	"gemmaft/internal/testenv"
)

// leftovers lists the hidden temporary files in dir.
func leftovers(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), ".") {
			out = append(out, e.Name())
		}
	}
	return out
}

// TestTokenizeOutIsAtomic: a bad line, first or later, leaves an existing
// --out as it was and no temporary file (a bad first line used to empty a
// good output, a later one to leave it truncated).
func TestTokenizeOutIsAtomic(t *testing.T) {
	tok := testenv.GemmaFile(t, "tokenizer.json")
	dir := t.TempDir()
	out := filepath.Join(dir, "out.jsonl")
	good := `{"text":"Merhaba"}` + "\n"
	writeFile(t, filepath.Join(dir, "good.jsonl"), strings.Repeat(good, 3000))
	if r := runCLI(t, dir, "tokenize", "--tokenizer", tok, "--in", "good.jsonl", "--out", out); r.code != 0 {
		t.Fatal(r.stderr)
	}
	want, _ := os.ReadFile(out)
	for name, in := range map[string]string{
		"bad first line": "not json\n" + good,
		"bad later line": strings.Repeat(good, 2500) + "{\"txt\": 1}\n",
	} {
		writeFile(t, filepath.Join(dir, "in.jsonl"), in)
		r := runCLI(t, dir, "tokenize", "--tokenizer", tok, "--in", "in.jsonl", "--out", out)
		if r.code != 1 {
			t.Errorf("%s: exit %d", name, r.code)
		}
		if got, _ := os.ReadFile(out); !bytes.Equal(got, want) {
			t.Errorf("%s: the existing output changed (%d bytes, was %d)", name, len(got), len(want))
		}
		if l := leftovers(t, dir); len(l) != 0 {
			t.Errorf("%s: left %v", name, l)
		}
	}
}

// startCLI starts the CLI as a child process in dir.
func startCLI(t *testing.T, dir string, stdin io.Reader, args ...string) (*exec.Cmd, *bytes.Buffer, *bytes.Buffer) {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "PIPELINE_CLI=1", "PIPELINE_CACHE="+filepath.Join(dir, "cache"))
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr, cmd.Stdin = &out, &errb, stdin
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	return cmd, &out, &errb
}

// exitCode waits for cmd, failing the test after limit.
func exitCode(t *testing.T, cmd *exec.Cmd, limit time.Duration) int {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return ee.ExitCode()
		}
		if err != nil {
			t.Fatal(err)
		}
		return 0
	case <-time.After(limit):
		cmd.Process.Kill()
		<-done
		t.Fatalf("%v did not exit within %v", cmd.Args, limit)
	}
	return -1
}

// TestTokenizeInterrupted: SIGINT or SIGTERM while tokenize waits on its
// input (a pipe that stays open) exits 130 or 143, leaves --out as it was
// and removes the temporary file.
func TestTokenizeInterrupted(t *testing.T) {
	tok := testenv.GemmaFile(t, "tokenizer.json")
	for sig, code := range map[syscall.Signal]int{syscall.SIGINT: 130, syscall.SIGTERM: 143} {
		dir := t.TempDir()
		out := filepath.Join(dir, "out.jsonl")
		writeFile(t, out, "old output\n")
		pr, pw, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		cmd, _, stderr := startCLI(t, dir, pr, "tokenize", "--tokenizer", tok, "--out", out)
		pr.Close()
		fmt.Fprintln(pw, `{"text":"Merhaba"}`) // then nothing more, the pipe open
		deadline := time.Now().Add(20 * time.Second)
		// The temporary output exists: reading (not the check that --out's
		// folder is writable, which comes before the signal handler).
		for !slices.ContainsFunc(leftovers(t, dir), func(n string) bool { return strings.HasPrefix(n, ".out.jsonl.tmp") }) {
			if time.Now().After(deadline) {
				t.Fatalf("tokenize never started writing: %s", stderr)
			}
			time.Sleep(10 * time.Millisecond)
		}
		cmd.Process.Signal(sig)
		if got := exitCode(t, cmd, 10*time.Second); got != code {
			t.Errorf("%v: exit %d, want %d\n%s", sig, got, code, stderr)
		}
		pw.Close()
		if got, _ := os.ReadFile(out); string(got) != "old output\n" {
			t.Errorf("%v: --out changed: %q", sig, got)
		}
		if l := leftovers(t, dir); len(l) != 0 {
			t.Errorf("%v: left %v", sig, l)
		}
	}
}

// TestExportInterrupted: an export whose context is canceled mid-write
// (what SIGINT does) leaves --out as it was and no temporary file behind.
func TestExportInterrupted(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, "out.jsonl")
	writeFile(t, out, "old\n")
	ctx, cancel := context.WithCancel(context.Background())
	err := exportTo(ctx, out, func(w io.Writer) error {
		for i := 0; i < 1000; i++ {
			if i == 10 {
				cancel()
			}
			if _, err := w.Write(bytes.Repeat([]byte("x"), 1<<16)); err != nil {
				return err
			}
		}
		return nil
	})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("export: %v", err)
	}
	if got, _ := os.ReadFile(out); string(got) != "old\n" {
		t.Errorf("--out changed: %d bytes", len(got))
	}
	if l := leftovers(t, dir); len(l) != 0 {
		t.Errorf("left %v", l)
	}
}

// TestReportPathCheckedFirst: a --report that cannot be written fails the
// command with exit 2 before anything runs (it used to be lost after the
// run, which still exited 0).
func TestReportPathCheckedFirst(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "a.jsonl"), sampleJSONL)
	spec := filepath.Join(dir, "s.yaml")
	writeFile(t, spec, "name: s\nstages:\n  src: {kind: jsonl, with: {paths: [a.jsonl]}}\n")
	for report, want := range map[string]string{
		filepath.Join(dir, "missing", "r.json"): "the folder " + filepath.Join(dir, "missing") + " does not exist",
		dir:                                     "is a folder",
	} {
		r := runCLI(t, dir, "run", spec, "--report", report)
		if r.code != 2 || !strings.Contains(r.stderr, "--report: ") || !strings.Contains(r.stderr, want) {
			t.Errorf("--report %s: exit %d\n%s", report, r.code, r.stderr)
		}
		// The HTML report's --out, the same.
		r = runCLI(t, dir, "report", spec, "--out", report)
		if r.code != 2 || !strings.Contains(r.stderr, "--out: ") || !strings.Contains(r.stderr, want) {
			t.Errorf("report --out %s: exit %d\n%s", report, r.code, r.stderr)
		}
		if _, err := os.Stat(filepath.Join(dir, "cache")); err == nil {
			if entries, _ := filepath.Glob(filepath.Join(dir, "cache", "entries", "*", "*")); len(entries) != 0 {
				t.Errorf("--report %s: the run ran", report)
			}
		}
	}
	report := filepath.Join(dir, "r.json")
	if r := runCLI(t, dir, "run", spec, "--report", report); r.code != 0 {
		t.Fatal(r.stderr)
	}
	if l := leftovers(t, dir); len(l) != 0 {
		t.Errorf("left %v", l)
	}
}

// TestEndlessLinesAreBounded: a line without end, on tokenize's --in or
// standard input or in loss --data, fails with a message instead of
// filling memory.
func TestEndlessLinesAreBounded(t *testing.T) {
	tok := testenv.GemmaFile(t, "tokenizer.json")
	dir := t.TempDir()
	// A sparse file of zeros: 65 MiB without a newline, using no disk.
	endless := filepath.Join(dir, "endless.jsonl")
	if err := os.Truncate(writeEmpty(t, endless), 65<<20); err != nil {
		t.Fatal(err)
	}
	r := runCLI(t, dir, "tokenize", "--tokenizer", tok, "--in", endless, "--out", filepath.Join(dir, "o.jsonl"))
	if r.code != 1 || !strings.Contains(r.stderr, "line 1 is longer than 64 MiB") {
		t.Errorf("tokenize --in: exit %d\n%s", r.code, r.stderr)
	}
	r = runCLI(t, dir, "tokenize", "--tokenizer", tok, "--in", endless, "--max-line-bytes", "1024")
	if r.code != 1 || !strings.Contains(r.stderr, "line 1 is longer than 1 KiB") {
		t.Errorf("tokenize --max-line-bytes: exit %d\n%s", r.code, r.stderr)
	}
	// Standard input that never ends.
	cmd, _, stderr := startCLI(t, dir, zeros{}, "tokenize", "--tokenizer", tok)
	if code := exitCode(t, cmd, 60*time.Second); code != 1 || !strings.Contains(stderr.String(), "line 1 is longer than 64 MiB") {
		t.Errorf("tokenize from stdin: exit %d\n%s", code, stderr)
	}
	r = runCLI(t, dir, "loss", "--model", dir, "--backend", "cpu", "--data", endless)
	if r.code != 1 || !strings.Contains(r.stderr, "line 1 is longer than 64 MiB") {
		t.Errorf("loss --data: exit %d\n%s", r.code, r.stderr)
	}
}

func writeEmpty(t *testing.T, path string) string {
	t.Helper()
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// zeros is an endless stream without a newline.
type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

// TestVerifyAndGCNeedAnExistingCache: a mistyped --cache is reported, not
// created.
func TestVerifyAndGCNeedAnExistingCache(t *testing.T) {
	dir := t.TempDir()
	typo := filepath.Join(dir, "cahce")
	for _, args := range [][]string{{"verify", "--cache", typo}, {"gc", "--cache", typo}} {
		r := runCLI(t, dir, args...)
		if r.code != 2 || !strings.Contains(r.stderr, "cache "+typo+" does not exist") {
			t.Errorf("%v: exit %d\n%s", args, r.code, r.stderr)
		}
		if _, err := os.Stat(typo); err == nil {
			t.Errorf("%v created %s", args, typo)
		}
	}
	// A folder that is not a cache is not turned into one.
	// Nor do the commands that read one stage's entry.
	writeFile(t, filepath.Join(dir, "s.yaml"), "name: s\nstages:\n  base: {kind: model, with: {preset: tiny}}\n")
	for _, args := range [][]string{{"inspect", "s.yaml", "base", "--cache", typo}, {"export", "s.yaml", "base", "--out", "m", "--cache", typo}} {
		r := runCLI(t, dir, args...)
		if r.code != 2 || !strings.Contains(r.stderr, "cache "+typo+" does not exist") {
			t.Errorf("%v: exit %d\n%s", args, r.code, r.stderr)
		}
		if _, err := os.Stat(typo); err == nil {
			t.Errorf("%v created %s", args, typo)
		}
	}
	r := runCLI(t, dir, "gc", "--cache", dir)
	if r.code != 2 || !strings.Contains(r.stderr, "is not a pipeline cache") {
		t.Errorf("gc on a plain folder: exit %d\n%s", r.code, r.stderr)
	}
	if _, err := os.Stat(filepath.Join(dir, "entries")); err == nil {
		t.Error("gc made a cache of a plain folder")
	}
}

// TestStatusSaysKilledRunDidNotFinish: a run that left its lock note
// behind (killed: SIGKILL, the OOM killer) is reported as unfinished.
func TestStatusSaysKilledRunDidNotFinish(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "a.jsonl"), sampleJSONL)
	spec := filepath.Join(dir, "s.yaml")
	writeFile(t, spec, "name: s\nstages:\n  src: {kind: jsonl, with: {paths: [a.jsonl]}}\n")
	if r := runCLI(t, dir, "run", spec); r.code != 0 {
		t.Fatal(r.stderr)
	}
	if r := runCLI(t, dir, "status", spec); r.code != 0 || strings.Contains(r.stdout, "DID NOT FINISH") || !strings.Contains(r.stdout, "last run: ") {
		t.Fatalf("status after a finished run:\n%s", r.stdout)
	}
	if r := runCLI(t, dir, "status", spec, "--check"); r.code != 0 {
		t.Errorf("status --check after a finished run: exit %d\n%s", r.code, r.stderr)
	}
	locks, _ := filepath.Glob(filepath.Join(dir, "cache", "locks", "dag-*.lock"))
	if len(locks) != 1 {
		t.Fatalf("locks %v", locks)
	}
	// What a run killed a moment ago leaves.
	writeFile(t, strings.TrimSuffix(locks[0], ".lock")+".holder", fmt.Sprintf("pid 999999 on host since %s\n", time.Now().Format(time.RFC3339)))
	r := runCLI(t, dir, "status", spec)
	if !strings.Contains(r.stdout, "last run: DID NOT FINISH: pid 999999 on host") || !strings.Contains(r.stdout, "the run before it: ") {
		t.Errorf("status after a killed run:\n%s", r.stdout)
	}
	// A health check says so by its exit code.
	if r := runCLI(t, dir, "status", spec, "--check"); r.code != exitFailed || !strings.Contains(r.stderr, "status --check: the last run did not finish") {
		t.Errorf("status --check after a killed run: exit %d\n%s", r.code, r.stderr)
	}
	// The report's title and headline say so too (a page mailed by
	// ExecStopPost= after the OOM killer).
	page := filepath.Join(dir, "report.html")
	r = runCLI(t, dir, "report", spec, "--out", page)
	html, _ := os.ReadFile(page)
	if r.code != 0 || !strings.Contains(string(html), "<title>s: DID NOT FINISH</title>") ||
		!strings.Contains(string(html), "DID NOT FINISH</span> (pid 999999 on host") || !strings.Contains(string(html), "Last finished run ") {
		t.Errorf("report after a killed run: %d %s\n%s", r.code, r.stderr, html)
	}
	r = runCLI(t, dir, "run", spec)
	if r.code != 0 || !strings.Contains(r.stderr, "the previous run of this DAG did not finish") {
		t.Errorf("run after a killed run: %d\n%s", r.code, r.stderr)
	}
	if r := runCLI(t, dir, "status", spec); strings.Contains(r.stdout, "DID NOT FINISH") {
		t.Errorf("status after the next run finished:\n%s", r.stdout)
	}
}

// TestRunInterrupted: SIGINT, SIGTERM or SIGHUP (the terminal closed)
// during a run stops it with exit 130, 143 or 129 (not 1: cron can tell an
// interruption from a failure), prints the table so far, and records the
// run as interrupted.
func TestRunInterrupted(t *testing.T) {
	tok := testenv.GemmaFile(t, "tokenizer.json")
	demo := filepath.Join(testenv.RepoRoot(t), "dataset", "demo", "alpaca-tr-demo.jsonl")
	dir := t.TempDir()
	spec := filepath.Join(dir, "train.yaml")
	writeFile(t, spec, fmt.Sprintf(`name: train
stages:
  alpaca: {kind: jsonl, with: {paths: [%s], limit: 20}}
  chat: {kind: chat_template, needs: [alpaca]}
  tokens: {kind: tokenize, needs: [chat], with: {tokenizer: %s}}
  pack: {kind: pack, needs: [tokens], with: {seq_len: 64}}
  base: {kind: model, with: {preset: tiny}}
  adapter: {kind: qlora, needs: [pack, base], with: {r: 2, alpha: 4, batch_size: 1, grad_accum: 1, epochs: 100000, backend: cpu}}
`, demo, tok))
	for _, c := range []struct {
		sig  syscall.Signal
		code int
		json bool // --log-format json: every line of stderr a JSON record
	}{{syscall.SIGINT, 130, false}, {syscall.SIGTERM, 143, false}, {syscall.SIGTERM, 143, true}, {syscall.SIGHUP, 129, false}} {
		report := filepath.Join(dir, "report.json")
		args := []string{"run", spec, "--progress", "none", "--report", report}
		if c.json {
			args = append(args, "--log-format", "json")
		}
		cmd, stdout, stderr := startCLI(t, dir, nil, args...)
		deadline := time.Now().Add(60 * time.Second)
		for {
			if m, _ := filepath.Glob(filepath.Join(dir, "cache", "scratch", "*")); len(m) > 0 {
				break // training has begun
			}
			if time.Now().After(deadline) {
				cmd.Process.Kill()
				t.Fatalf("training never began:\n%s", stderr)
			}
			time.Sleep(20 * time.Millisecond)
		}
		time.Sleep(300 * time.Millisecond)
		cmd.Process.Signal(c.sig)
		if got := exitCode(t, cmd, 30*time.Second); got != c.code {
			t.Errorf("%v: exit %d, want %d\n%s", c.sig, got, c.code, stderr)
		}
		table := strings.Join(strings.Fields(stdout.String()), " ")
		if c.json {
			// The table as JSON lines: a log of stdout and stderr together is all JSON.
			for _, line := range strings.Split(strings.TrimSpace(stdout.String()), "\n") {
				if !json.Valid([]byte(line)) {
					t.Errorf("--log-format json: stdout line %q is not JSON", line)
				}
			}
			if !strings.Contains(table, `"stage":"adapter","state":"canceled"`) || !strings.Contains(table, `"ok":false`) {
				t.Errorf("%v: no JSON table so far on stdout:\n%s", c.sig, stdout)
			}
		} else if !strings.Contains(table, "adapter canceled - ") || !strings.Contains(table, "stopped after") {
			t.Errorf("%v: no table so far on stdout:\n%s", c.sig, stdout)
		}
		data, _ := os.ReadFile(report)
		if !bytes.Contains(data, []byte(`"interrupted": true`)) {
			t.Errorf("%v: the report does not say interrupted:\n%s", c.sig, data)
		}
		if !c.json {
			continue
		}
		var msgs []string
		for _, line := range strings.Split(strings.TrimSpace(stderr.String()), "\n") {
			var rec struct{ Level, Msg string }
			if err := json.Unmarshal([]byte(line), &rec); err != nil || rec.Level == "" {
				t.Errorf("--log-format json: a line that is not a log record: %q", line)
			}
			msgs = append(msgs, rec.Msg)
		}
		if all := strings.Join(msgs, "\n"); !strings.Contains(all, "SIGTERM: stopping") || !strings.Contains(all, "run interrupted: interrupted by SIGTERM") {
			t.Errorf("--log-format json: the stop and the error are not among the records:\n%s", stderr)
		}
	}
	// plan names the checkpoint the next run resumes from, and promises
	// nothing where the attempt left no checkpoint (a full disk).
	r := runCLI(t, dir, "plan", spec)
	if !regexp.MustCompile(`it resumes an interrupted attempt \(checkpoint of step \d+\)`).MatchString(r.stdout) {
		t.Errorf("plan after the interrupts:\n%s%s", r.stdout, r.stderr)
	}
	checkpoints, _ := filepath.Glob(filepath.Join(dir, "cache", "scratch", "*", "checkpoints"))
	for _, c := range checkpoints {
		os.RemoveAll(c)
	}
	if r := runCLI(t, dir, "plan", spec); len(checkpoints) == 0 || strings.Contains(r.stdout, "resumes") {
		t.Errorf("plan with no checkpoint left (%d removed):\n%s%s", len(checkpoints), r.stdout, r.stderr)
	}
}

// TestRunOutlivesItsLogReader: a run whose output pipe is closed (a `| tee`
// or `| logger` that ended) carries on to the end and records itself,
// instead of dying of SIGPIPE at its next line; it exits 1 for the output
// it could not write, as any failed write to standard output does.
func TestRunOutlivesItsLogReader(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "a.jsonl"), sampleJSONL)
	writeFile(t, filepath.Join(dir, "dag.yaml"), "name: piped\nstages:\n  a: {kind: jsonl, with: {paths: [a.jsonl]}}\n")
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	r.Close() // the reader is gone before the first line
	cmd := exec.Command(os.Args[0], "run", "dag.yaml", "--report", "report.json")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "PIPELINE_CLI=1", "PIPELINE_CACHE="+filepath.Join(dir, "cache"))
	cmd.Stdout, cmd.Stderr = w, w
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	w.Close()
	if code := exitCode(t, cmd, 30*time.Second); code != exitFailed {
		t.Errorf("exit %d, want %d (%v)", code, exitFailed, cmd.ProcessState)
	}
	if data, err := os.ReadFile(filepath.Join(dir, "report.json")); err != nil || !bytes.Contains(data, []byte(`"ok": true`)) {
		t.Errorf("the run's report: %s (%v)", data, err)
	}
}

// TestTokenizerPathIsAFIFO: a --tokenizer that is a named pipe is refused
// with what it is, instead of blocking on the read.
func TestTokenizerPathIsAFIFO(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "tokenizer.json")
	if err := syscall.Mkfifo(fifo, 0o644); err != nil {
		t.Skip("no named pipes here:", err)
	}
	cmd, _, stderr := startCLI(t, dir, nil, "tokenize", "--tokenizer", fifo)
	if code := exitCode(t, cmd, 20*time.Second); code != exitUsage || !strings.Contains(stderr.String(), "is a named pipe") {
		t.Errorf("exit %d\n%s", code, stderr)
	}
}

// TestEveryFailedStageSaysWhy: two sources fail side by side on bad input;
// the run's error names both, not only the first to fail.
func TestEveryFailedStageSaysWhy(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "a.jsonl"), "{\"instruction\": \"x\", \"output\": \"y\"}\nnot json\n")
	writeFile(t, filepath.Join(dir, "b.jsonl"), "[1, 2]\n")
	writeFile(t, filepath.Join(dir, "dag.yaml"), `name: two-failures
stages:
  a: {kind: jsonl, with: {paths: [a.jsonl]}}
  b: {kind: jsonl, with: {paths: [b.jsonl]}}
`)
	res := runCLI(t, dir, "run", "dag.yaml", "--progress", "none")
	if res.code != 1 {
		t.Fatalf("exit %d, want 1; stderr:\n%s", res.code, res.stderr)
	}
	for _, name := range []string{"a.jsonl", "b.jsonl"} {
		if !strings.Contains(res.stderr, name) {
			t.Errorf("stderr does not say why %s failed:\n%s", name, res.stderr)
		}
	}
}

// TestWorkWithoutContextInterrupted: SIGINT or SIGTERM during work that
// does not stop by itself (blocked) exits 130 or 143 once the grace is
// over and leaves no temporary file behind.
func TestWorkWithoutContextInterrupted(t *testing.T) {
	for sig, code := range map[syscall.Signal]int{syscall.SIGINT: 130, syscall.SIGTERM: 143} {
		dir := t.TempDir()
		cmd := exec.Command(os.Args[0])
		cmd.Env = append(os.Environ(), "PIPELINE_TEST_FILL_FOREVER="+filepath.Join(dir, "model"))
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(20 * time.Second)
		for len(leftovers(t, dir)) == 0 {
			if time.Now().After(deadline) {
				cmd.Process.Kill()
				t.Fatalf("the fill never started: %s", &stderr)
			}
			time.Sleep(5 * time.Millisecond)
		}
		time.Sleep(50 * time.Millisecond) // its file written, the handler in place
		cmd.Process.Signal(sig)
		if got := exitCode(t, cmd, 10*time.Second); got != code {
			t.Errorf("%v: exit %d, want %d\n%s", sig, got, code, &stderr)
		}
		if l := leftovers(t, dir); len(l) != 0 {
			t.Errorf("%v: left %v", sig, l)
		}
	}
}

// fillForever is what TestWorkWithoutContextInterrupted interrupts: a
// folder whose fill never ends, with no grace to stop in.
func fillForever(out string) int {
	_, stop := signalContext(0)
	defer stop()
	err := atomicfile.Dir(out, func(dir string) error {
		if err := os.WriteFile(filepath.Join(dir, "model.safetensors"), make([]byte, 1<<20), 0o644); err != nil {
			return err
		}
		select {}
	})
	fmt.Fprintln(os.Stderr, err)
	return 1
}

// TestRunOnTerminalWithoutSize: on a terminal that reports no size (the
// pseudo-terminal of `script`, a CI runner's), where a live display shows
// nothing, a run logs its progress lines instead.
func TestRunOnTerminalWithoutSize(t *testing.T) {
	scriptBin, err := exec.LookPath("script")
	if err != nil {
		t.Skip("no script(1) to give the run a terminal")
	}
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "a.jsonl"), strings.Repeat(sampleJSONL, 20000)) // long enough to report on
	writeFile(t, filepath.Join(dir, "s.yaml"), "name: s\nstages:\n  src: {kind: jsonl, with: {paths: [a.jsonl]}}\n  chat: {kind: chat_template, needs: [src]}\n")
	cmd := exec.Command(scriptBin, "-qec", "stty cols 0 rows 0; "+os.Args[0]+" run s.yaml --log-every 1ms", "/dev/null")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "PIPELINE_CLI=1", "PIPELINE_CACHE="+filepath.Join(dir, "cache"))
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if !strings.Contains(string(out), "msg=progress stage=") {
		t.Errorf("no progress lines on a terminal without a size:\n%s", out)
	}
}
