package trainer

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"gemmaft/internal/dirsum"
)

// interruptedRun trains with a checkpoint every 2 steps and stops after
// step 4 (as a kill would), leaving checkpoints step-2 and step-4 in the
// returned checkpoint folder; ref is the adapter of the same run left
// uninterrupted.
func interruptedRun(t *testing.T) (m *Model, rows Rows, opts TrainOptions, ckDir string, ref []byte) {
	t.Helper()
	c := tinyConfig()
	m = tinyModel(t, c)
	rows = trainRows(c.VocabSize, 24, 16, 1)
	opts = trainOptions(t.TempDir())
	opts.CheckpointEvery = 2
	res, err := Train(context.Background(), openCPU(t, m, sessionConfig()), rows, opts)
	if err != nil {
		t.Fatal(err)
	}
	ref, _ = os.ReadFile(filepath.Join(res.AdapterDir, AdapterWeightsFile))

	opts.OutDir = t.TempDir()
	ckDir = filepath.Join(opts.OutDir, CheckpointsDirName)
	ctx, cancel := context.WithCancel(context.Background())
	o := opts
	o.Progress = func(p Progress) {
		if p.Step == 4 {
			cancel()
		}
	}
	if _, err := Train(ctx, openCPU(t, m, sessionConfig()), rows, o); !errors.Is(err, context.Canceled) {
		t.Fatalf("interrupted run: %v", err)
	}
	if got := checkpointNames(ckDir); len(got) != 2 || got[1] != "step-00000004" {
		t.Fatalf("checkpoints %v, want step-2 and step-4", got)
	}
	return m, rows, opts, ckDir, ref
}

// resume trains on from ckDir, logging to a buffer, and returns the
// adapter and the log.
func resume(t *testing.T, m *Model, rows Rows, opts TrainOptions) ([]byte, string) {
	t.Helper()
	var log bytes.Buffer
	opts.Log = slog.New(slog.NewTextHandler(&log, nil))
	res, err := Train(context.Background(), openCPU(t, m, sessionConfig()), rows, opts)
	if err != nil {
		t.Fatalf("resume: %v\n%s", err, log.String())
	}
	a, _ := os.ReadFile(filepath.Join(res.AdapterDir, AdapterWeightsFile))
	return a, log.String()
}

// setAsideDirs lists the checkpoints set aside in ckDir, with their reasons.
func setAsideDirs(t *testing.T, ckDir string) map[string]string {
	out := map[string]string{}
	ents, _ := os.ReadDir(ckDir)
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), setAsidePrefix) {
			why, err := os.ReadFile(filepath.Join(ckDir, e.Name(), dirsum.SetAsideFile))
			if err != nil {
				t.Errorf("%s has no %s", e.Name(), dirsum.SetAsideFile)
			}
			out[e.Name()] = string(why)
		}
	}
	return out
}

// TestDamagedCheckpointIsSetAside: a checkpoint damaged on disk (one bit of
// an adapter weight, still a finite number) fails its digests, is set
// aside (kept, its reason beside it, named in the log), and the run resumes
// from the checkpoint before it, ending with the uninterrupted run's
// adapter. Before, the damaged weights were resumed silently and a
// different adapter was committed.
func TestDamagedCheckpointIsSetAside(t *testing.T) {
	m, rows, opts, ckDir, ref := interruptedRun(t)
	weights := filepath.Join(ckDir, "step-00000004", AdapterWeightsFile)
	b, err := os.ReadFile(weights)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)-8] ^= 1 // the lowest mantissa bit of a float32 near the end
	os.WriteFile(weights, b, 0o644)

	got, log := resume(t, m, rows, opts)
	if !bytes.Equal(got, ref) {
		t.Error("the adapter differs from the uninterrupted run's: the damaged checkpoint was resumed")
	}
	aside := setAsideDirs(t, ckDir)
	if len(aside) != 1 {
		t.Fatalf("set aside: %v", aside)
	}
	for name, why := range aside {
		if !strings.HasPrefix(name, "damaged-step-00000004-") || !strings.Contains(why, AdapterWeightsFile+" does not match its digest") {
			t.Errorf("%s: %s", name, why)
		}
		if !strings.Contains(log, "checkpoint set aside") || !strings.Contains(log, name) || !strings.Contains(log, "step-00000002") {
			t.Errorf("log does not name the checkpoint, where it went and what comes next:\n%s", log)
		}
	}
	// Every other part of a checkpoint is covered too.
	for _, part := range []string{AdapterConfigFile, optimizerFile, stateFile, MetricsFile, dirsum.File} {
		m, rows, opts, ckDir, ref := interruptedRun(t)
		p := filepath.Join(ckDir, "step-00000004", part)
		b, _ := os.ReadFile(p)
		if part == dirsum.File {
			b = b[:len(b)/2]
		} else {
			b = append(b, ' ')
		}
		os.WriteFile(p, b, 0o644)
		if got, _ := resume(t, m, rows, opts); !bytes.Equal(got, ref) {
			t.Errorf("%s damaged: the adapter differs from the uninterrupted run's", part)
		}
		if aside := setAsideDirs(t, ckDir); len(aside) != 1 {
			t.Errorf("%s damaged: set aside %v", part, aside)
		}
	}
}

// TestDivergedResumeIsSetAside: a checkpoint that passes its digests but
// whose resume gives a non-finite loss (a huge but finite weight, as a
// failing device might have written) is set aside too, and the run goes on
// from the one before it.
func TestDivergedResumeIsSetAside(t *testing.T) {
	m, rows, opts, ckDir, ref := interruptedRun(t)
	ck := filepath.Join(ckDir, "step-00000004")
	a, err := m.LoadAdapter(ck)
	if err != nil {
		t.Fatal(err)
	}
	for _, mods := range a.Layers {
		for _, w := range mods {
			for i := range w.B {
				w.B[i] = 3e38
			}
		}
	}
	if err := m.SaveAdapter(ck, a, BaseModel{}); err != nil {
		t.Fatal(err)
	}
	if err := dirsum.Write(ck); err != nil {
		t.Fatal(err)
	}
	got, log := resume(t, m, rows, opts)
	if !bytes.Equal(got, ref) {
		t.Error("the adapter differs from the uninterrupted run's")
	}
	aside := setAsideDirs(t, ckDir)
	if len(aside) != 1 {
		t.Fatalf("set aside: %v\n%s", aside, log)
	}
	for _, why := range aside {
		if !strings.Contains(why, "resuming from it gave a loss of") {
			t.Errorf("reason: %s", why)
		}
	}
}

// TestOnlyTwoCheckpointsKept: the newest checkpoint and the one to fall
// back to; set-aside ones are never removed.
func TestOnlyTwoCheckpointsKept(t *testing.T) {
	m, rows, opts, ckDir, _ := interruptedRun(t)
	os.Mkdir(filepath.Join(ckDir, "damaged-step-00000001-x"), 0o755)
	resume(t, m, rows, opts) // to step 12, a checkpoint every 2 steps
	ents, _ := os.ReadDir(ckDir)
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	if strings.Join(names, " ") != "damaged-step-00000001-x latest step-00000010 step-00000012" {
		t.Errorf("checkpoint folder holds %v", names)
	}
	for _, n := range []string{"step-00000010", "step-00000012"} {
		if err := dirsum.Verify(filepath.Join(ckDir, n)); err != nil {
			t.Errorf("%s: %v", n, err)
		}
	}
}
