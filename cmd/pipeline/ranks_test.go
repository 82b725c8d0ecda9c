package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"gemmaft/pipeline"
)

func TestRankEnv(t *testing.T) {
	parent := []string{"PATH=/bin", "NCCL_NVLS_ENABLE=0", "NCCL_SOCKET_IFNAME=lo", "RANK=7", "CUDA_VISIBLE_DEVICES=0,1"}
	got := rankEnv(parent, 1, 2, "127.0.0.1:4567")
	for _, kv := range []string{"PATH=/bin", "NCCL_NVLS_ENABLE=0", "NCCL_SOCKET_IFNAME=lo", "CUDA_VISIBLE_DEVICES=0,1",
		"RANK=1", "WORLD_SIZE=2", "LOCAL_RANK=1", "MASTER_ADDR=127.0.0.1", "MASTER_PORT=4567"} {
		if !slices.Contains(got, kv) {
			t.Errorf("a spawned rank's environment lacks %s: %v", kv, got)
		}
	}
	if slices.Contains(got, "RANK=7") {
		t.Errorf("the parent's RANK reached the rank: %v", got)
	}
	for in, want := range map[string]string{
		"run a.yaml --gpus 2 --until q": "run a.yaml --until q",
		"run --gpus=4 a.yaml":           "run a.yaml",
		"run a.yaml":                    "run a.yaml",
	} {
		if got := strings.Join(withoutGPUs(strings.Fields(in)), " "); got != want {
			t.Errorf("withoutGPUs(%q) = %q, want %q", in, got, want)
		}
	}
}

// entryOf is the entry of stage in the cache at root (rank 0's entries).
func entryOf(t *testing.T, root, stage string) string {
	t.Helper()
	ms, _ := filepath.Glob(filepath.Join(root, "entries", "*", "*", "manifest.json"))
	for _, m := range ms {
		man, err := pipeline.ReadManifest(filepath.Dir(m))
		if err == nil && man.Stage == stage {
			return filepath.Dir(m)
		}
	}
	t.Fatalf("no entry of stage %s in %s", stage, root)
	return ""
}

func lossesOf(t *testing.T, path string) []float64 {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []float64
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var m struct{ Loss float64 }
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			t.Fatal(err)
		}
		out = append(out, m.Loss)
	}
	return out
}

// TestRunOnTwoRanks: `pipeline run --gpus 2` (two processes, here training
// on the CPU) trains the adapter one process trains, over one cache: every
// entry written once, the data stages computed by one rank and found
// cached by the other, one run recorded (rank 0's), no scratch left.
func TestRunOnTwoRanks(t *testing.T) {
	if testing.Short() {
		t.Skip("trains a tiny model twice")
	}
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "spec.yaml"), lrSpec(t, "1.0e-2"))
	one := runCLI(t, dir, "run", "spec.yaml", "--cache", filepath.Join(dir, "one"), "--progress", "none")
	if one.code != 0 {
		t.Fatalf("one rank: exit %d\n%s", one.code, one.stderr)
	}
	// Preprocessing alone trains nothing: one process, said so.
	if r := runCLI(t, dir, "run", "spec.yaml", "--cache", filepath.Join(dir, "pre"), "--progress", "none", "--gpus", "2", "--until", "pack"); r.code != 0 ||
		!strings.Contains(r.stderr, "--gpus 2: this run trains nothing; it runs as one process") || strings.Contains(r.stderr, "rank 1") {
		t.Errorf("--gpus 2 --until pack: exit %d\n%s", r.code, r.stderr)
	}
	// --no-wait refuses another run's work, not the other rank's: on a
	// fresh cache the ranks share the data stages' entries.
	two := runCLI(t, dir, "run", "spec.yaml", "--cache", filepath.Join(dir, "two"), "--progress", "none", "--gpus", "2", "--no-wait")
	if two.code != 0 {
		t.Fatalf("two ranks: exit %d\n%s", two.code, two.stderr)
	}
	if !strings.Contains(two.stdout, "adapter") || !strings.Contains(two.stdout, "computed") {
		t.Errorf("rank 0's summary is not on stdout:\n%s", two.stdout)
	}
	if !strings.Contains(two.stderr, "elsewhere") {
		t.Errorf("rank 1 does not say that rank 0 writes the adapter:\n%s", two.stderr)
	}
	a, b := entryOf(t, filepath.Join(dir, "one"), "adapter"), entryOf(t, filepath.Join(dir, "two"), "adapter")
	la, lb := lossesOf(t, filepath.Join(a, "metrics.jsonl")), lossesOf(t, filepath.Join(b, "metrics.jsonl"))
	if len(la) != len(lb) || len(la) == 0 {
		t.Fatalf("%d metric lines on one rank, %d on two", len(la), len(lb))
	}
	for i := range la {
		if math.Abs(la[i]-lb[i]) > 1e-6*la[i] {
			t.Errorf("step %d: loss %v on one rank, %v on two", i+1, la[i], lb[i])
		}
	}
	count := func(cache string) (entries int, stages map[string]int) {
		stages = map[string]int{}
		ms, _ := filepath.Glob(filepath.Join(cache, "entries", "*", "*", "manifest.json"))
		for _, m := range ms {
			if man, err := pipeline.ReadManifest(filepath.Dir(m)); err == nil {
				stages[man.Stage]++
			}
		}
		return len(ms), stages
	}
	n1, _ := count(filepath.Join(dir, "one"))
	n2, per := count(filepath.Join(dir, "two"))
	if n1 != n2 {
		t.Errorf("%d entries from one rank, %d from two: %v", n1, n2, per)
	}
	for stage, n := range per {
		if n != 1 {
			t.Errorf("stage %s has %d entries", stage, n)
		}
	}
	// Each data stage computed by one rank: the two ranks' tables (rank
	// 1's on stderr) say "computed" once for it, "cached" once.
	for _, stage := range []string{"alpaca", "chat", "tokens", "pack", "base"} {
		states := map[string]int{}
		for _, line := range strings.Split(two.stdout+"\n"+two.stderr, "\n") {
			if f := strings.Fields(line); len(f) >= 2 && f[0] == stage {
				states[f[1]]++
			}
		}
		if states["computed"] != 1 || states["cached"] != 1 {
			t.Errorf("stage %s: %v in the two ranks' tables, want computed once and cached once", stage, states)
		}
	}
	if runs, _ := filepath.Glob(filepath.Join(dir, "two", "runs", "*", "*.json")); len(runs) != 1 {
		t.Errorf("%d runs recorded, want rank 0's alone: %v", len(runs), runs)
	}
	if left, _ := filepath.Glob(filepath.Join(dir, "two", "scratch", "*")); len(left) != 0 {
		t.Errorf("scratch left behind: %v", left)
	}
	// Forcing the training stage and a data stage: both ranks train again,
	// the data stage is rank 0's alone to recompute.
	again := runCLI(t, dir, "run", "spec.yaml", "--cache", filepath.Join(dir, "two"), "--progress", "none", "--gpus", "2",
		"--force", "adapter", "--force", "pack")
	if again.code != 0 || !strings.Contains(again.stderr, "elsewhere") {
		t.Fatalf("forced on two ranks: exit %d\n%s", again.code, again.stderr)
	}
	for _, line := range strings.Split(again.stderr, "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "pack" && f[1] == "computed" && !strings.Contains(again.stdout, line) {
			t.Errorf("rank 1 recomputed the forced data stage: %q", line)
		}
	}
	t.Logf("losses %v on one rank, %v on two", la, lb)
}

// childOf finds the rank whose environment says RANK=rank among the
// children of pid (Linux's /proc).
func childOf(t *testing.T, pid, rank int) int {
	t.Helper()
	// A child is listed under the thread that started it, which in a Go
	// program is any of the process's threads.
	lists, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", pid))
	if len(lists) == 0 {
		t.Skip("no /proc children lists")
	}
	var children []string
	for _, l := range lists {
		b, _ := os.ReadFile(l)
		children = append(children, strings.Fields(string(b))...)
	}
	for _, f := range children {
		child, _ := strconv.Atoi(f)
		env, _ := os.ReadFile(fmt.Sprintf("/proc/%d/environ", child))
		if slices.Contains(strings.Split(string(env), "\x00"), fmt.Sprintf("RANK=%d", rank)) {
			return child
		}
	}
	return 0
}

// trainingOnTwoRanks starts `pipeline run --gpus 2` on a long training
// with a checkpoint every 5 steps, and returns once rank 0 has written one.
func trainingOnTwoRanks(t *testing.T) (dir string, cmd *exec.Cmd, stderr *bytes.Buffer) {
	t.Helper()
	dir = t.TempDir()
	spec := strings.Replace(lrSpec(t, "1.0e-2"), "max_steps: 6", "max_steps: 400", 1)
	spec = strings.Replace(spec, "checkpoint_every: 0", "checkpoint_every: 5", 1)
	writeFile(t, filepath.Join(dir, "spec.yaml"), spec)
	cmd, _, stderr = startCLI(t, dir, nil, "run", "spec.yaml", "--progress", "none", "--gpus", "2")
	deadline := time.Now().Add(2 * time.Minute)
	for {
		if cks, _ := filepath.Glob(filepath.Join(dir, "cache", "scratch", "*", "checkpoints", "step-*")); len(cks) > 0 {
			return dir, cmd, stderr
		}
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			t.Fatal("no checkpoint within two minutes")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// resumesOnTwoRanks runs the spec in dir again on two ranks: it must
// resume from a checkpoint and finish.
func resumesOnTwoRanks(t *testing.T, dir string) {
	t.Helper()
	again := runCLI(t, dir, "run", "spec.yaml", "--progress", "none", "--gpus", "2")
	if again.code != 0 {
		t.Fatalf("running again: exit %d\n%s", again.code, again.stderr)
	}
	if !strings.Contains(again.stderr, "resuming from a checkpoint") {
		t.Errorf("the second run did not resume:\n%s", again.stderr)
	}
}

// TestKilledRankStopsTheOthers: SIGKILL to rank 1 mid-training ends rank 0
// and the launcher within a minute, naming the rank; running again resumes
// from rank 0's last checkpoint and finishes.
func TestKilledRankStopsTheOthers(t *testing.T) {
	if testing.Short() {
		t.Skip("trains a tiny model")
	}
	dir, cmd, stderr := trainingOnTwoRanks(t)
	rank1 := childOf(t, cmd.Process.Pid, 1)
	if rank1 == 0 {
		cmd.Process.Kill()
		t.Fatal("rank 1 is not a child of the launcher")
	}
	killed := time.Now()
	if err := syscall.Kill(rank1, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if code := exitCode(t, cmd, time.Minute); code == 0 {
		t.Fatal("the launcher succeeded with rank 1 killed")
	}
	took := time.Since(killed)
	if !strings.Contains(stderr.String(), "rank 1 went away") || !strings.Contains(stderr.String(), "rank 1 of 2 failed") {
		t.Errorf("the error does not name rank 1:\n%s", stderr.String())
	}
	t.Logf("the others stopped %v after rank 1 was killed", took.Round(time.Millisecond))

	resumesOnTwoRanks(t, dir)
}

// gone says whether process pid has exited (a zombie counts: nobody may
// be left to reap an orphan).
func gone(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	_, rest, _ := strings.Cut(string(b), ") ")
	return strings.HasPrefix(rest, "Z") || strings.HasPrefix(rest, "X")
}

// TestKilledLauncherStopsTheRanks: SIGKILL to `pipeline run --gpus 2`
// itself, which can forward nothing, still stops both ranks within a
// minute (they would otherwise train on, holding their GPUs from the
// next run), and running again resumes from rank 0's last checkpoint.
func TestKilledLauncherStopsTheRanks(t *testing.T) {
	if testing.Short() {
		t.Skip("trains a tiny model")
	}
	dir, cmd, _ := trainingOnTwoRanks(t)
	pids := []int{childOf(t, cmd.Process.Pid, 0), childOf(t, cmd.Process.Pid, 1)}
	if slices.Contains(pids, 0) {
		cmd.Process.Kill()
		t.Fatalf("the ranks are not children of the launcher: %v", pids)
	}
	t.Cleanup(func() {
		for _, p := range pids {
			syscall.Kill(p, syscall.SIGKILL)
		}
	})
	killed := time.Now()
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	for _, p := range pids {
		for !gone(p) {
			if time.Since(killed) > time.Minute {
				t.Fatalf("rank %d (pid %d) still runs a minute after its launcher was killed", slices.Index(pids, p), p)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	t.Logf("both ranks stopped %v after the launcher was killed", time.Since(killed).Round(time.Millisecond))
	exitCode(t, cmd, time.Minute)
	if ms, _ := filepath.Glob(filepath.Join(dir, "cache", "entries", "*", "*", "adapter", "adapter_model.safetensors")); len(ms) != 0 {
		t.Fatalf("the ranks trained on to the end after their launcher was killed: %v", ms)
	}

	resumesOnTwoRanks(t, dir)
}
