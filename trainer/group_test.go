package trainer

import (
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// localGroup is a Group of goroutines: each collective waits for every
// rank, sums in rank order and hands every rank the same result.
type localHub struct {
	mu      sync.Mutex
	cond    *sync.Cond
	n, gen  int
	arrived int
	parts   [][]float64
	sum     []float64
	bytes   []byte
	closed  error
}

type localGroup struct {
	h    *localHub
	rank int
}

func localGroups(n int) []Group {
	h := &localHub{n: n, parts: make([][]float64, n)}
	h.cond = sync.NewCond(&h.mu)
	gs := make([]Group, n)
	for i := range gs {
		gs[i] = localGroup{h, i}
	}
	return gs
}

func (g localGroup) Rank() int { return g.rank }
func (g localGroup) Size() int { return g.h.n }

// round waits for every rank; the last to arrive runs done.
func (h *localHub) round(done func()) error {
	gen := h.gen
	h.arrived++
	if h.arrived == h.n {
		done()
		h.arrived = 0
		h.gen++
		h.cond.Broadcast()
	}
	for h.gen == gen && h.closed == nil {
		h.cond.Wait()
	}
	return h.closed
}

// fail ends every rank's collectives, as a rank that dies does.
func (h *localHub) fail(err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.closed = err
	h.cond.Broadcast()
}

func (g localGroup) AllReduceSum(x []float64) error {
	h := g.h
	h.mu.Lock()
	defer h.mu.Unlock()
	h.parts[g.rank] = append([]float64(nil), x...)
	err := h.round(func() {
		h.sum = make([]float64, len(x))
		for _, p := range h.parts {
			for i, v := range p {
				h.sum[i] += v
			}
		}
	})
	if err != nil {
		return err
	}
	copy(x, h.sum)
	return nil
}

func (g localGroup) Broadcast(root int, data []byte) ([]byte, error) {
	h := g.h
	h.mu.Lock()
	defer h.mu.Unlock()
	if g.rank == root {
		h.bytes = append([]byte(nil), data...)
	}
	if err := h.round(func() {}); err != nil {
		return nil, err
	}
	return append([]byte(nil), h.bytes...), nil
}

// trainRanks trains on n ranks (goroutines, a model and session each) and
// returns rank 0's result; out(i) and ck(i) are each rank's folders.
func trainRanks(t *testing.T, ctx context.Context, c *Config, n int, rows Rows, opts TrainOptions, out, ck func(int) string) (*Result, *Model, error) {
	t.Helper()
	groups := localGroups(n)
	results := make([]*Result, n)
	errs := make([]error, n)
	models := make([]*Model, n)
	var wg sync.WaitGroup
	for r := range n {
		models[r] = tinyModel(t, c)
		cfg := sessionConfig()
		cfg.Group = groups[r]
		s := openCPU(t, models[r], cfg)
		o := opts
		o.OutDir, o.CheckpointDir = out(r), ck(r)
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[r], errs[r] = Train(ctx, s, rows, o)
			if errs[r] != nil {
				groups[r].(localGroup).h.fail(fmt.Errorf("rank %d failed", r))
			}
		}()
	}
	wg.Wait()
	return results[0], models[0], errors.Join(errs...)
}

func adapterParams(t *testing.T, m *Model, dir string) []Param {
	t.Helper()
	a, err := m.LoadAdapter(dir)
	if err != nil {
		t.Fatal(err)
	}
	return a.Params()
}

func sameTraining(t *testing.T, what string, m *Model, want, got *Result) {
	t.Helper()
	wm, gm := readMetrics(t, want.MetricsPath), readMetrics(t, got.MetricsPath)
	if len(wm) != len(gm) {
		t.Fatalf("%s: %d metric lines, one rank wrote %d", what, len(gm), len(wm))
	}
	worst := 0.0
	for i := range wm {
		d := math.Abs(wm[i].Loss-gm[i].Loss) / wm[i].Loss
		if (wm[i].EvalLoss == nil) != (gm[i].EvalLoss == nil) || wm[i].Tokens != gm[i].Tokens || wm[i].LR != gm[i].LR {
			t.Errorf("%s, step %d: %+v; one rank: %+v", what, wm[i].Step, gm[i], wm[i])
		}
		if wm[i].EvalLoss != nil {
			d = math.Max(d, math.Abs(*wm[i].EvalLoss-*gm[i].EvalLoss) / *wm[i].EvalLoss)
		}
		worst = math.Max(worst, d)
	}
	// Only the order of the gradient sums differs (float32 partial sums).
	if worst > 1e-5 {
		t.Errorf("%s: losses differ from one rank's by up to %.2g relative", what, worst)
	}
	// AdamW divides by the gradients' running RMS, so the summation order
	// shows in the weights more than in the losses: held to 1e-5 of the
	// weights' norm.
	wp, gp := adapterParams(t, m, want.AdapterDir), adapterParams(t, m, got.AdapterDir)
	var d2, w2 float64
	for i := range wp {
		for j := range wp[i].Data {
			d := float64(wp[i].Data[j] - gp[i].Data[j])
			d2, w2 = d2+d*d, w2+float64(wp[i].Data[j])*float64(wp[i].Data[j])
		}
	}
	diff := math.Sqrt(d2 / w2)
	if diff > 1e-5 {
		t.Errorf("%s: adapter weights differ from one rank's by %.2g relative", what, diff)
	}
	t.Logf("%s: losses within %.2g relative, adapter within %.2g of one rank's", what, worst, diff)
}

// TestDataParallelMatchesOneRank: two and three ranks, each computing its
// share of every step's micro-batches and of the held-out batches, train
// as one rank does with the same global batch; only rank 0 writes.
func TestDataParallelMatchesOneRank(t *testing.T) {
	c := tinyConfig()
	rows := trainRows(c.VocabSize, 40, 16, 4)
	opts := trainOptions("")
	opts.GradAccum, opts.Epochs, opts.EvalEvery, opts.CheckpointEvery = 4, 1, 2, 0
	base := t.TempDir()
	one, m, err := trainRanks(t, context.Background(), c, 1, rows, opts, func(int) string { return filepath.Join(base, "one") }, func(int) string { return "" })
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []int{2, 3} {
		dir := func(r int) string { return filepath.Join(base, fmt.Sprintf("n%d-rank%d", n, r)) }
		got, _, err := trainRanks(t, context.Background(), c, n, rows, opts, dir, func(r int) string { return filepath.Join(dir(r), "ck") })
		if err != nil {
			t.Fatal(err)
		}
		sameTraining(t, fmt.Sprintf("%d ranks", n), m, one, got)
		for r := 1; r < n; r++ {
			if _, err := os.Stat(dir(r)); !os.IsNotExist(err) {
				t.Errorf("rank %d of %d wrote %s", r, n, dir(r))
			}
		}
	}
}

// TestResumeWithOtherRankCount: a run checkpointed by one rank resumes on
// three and ends where the uninterrupted one-rank run ends; ranks that see
// different checkpoint folders refuse to start.
func TestResumeWithOtherRankCount(t *testing.T) {
	c := tinyConfig()
	rows := trainRows(c.VocabSize, 24, 16, 5)
	opts := trainOptions("")
	opts.GradAccum, opts.Epochs, opts.EvalFraction = 3, 2, 0
	base := t.TempDir()
	ck := filepath.Join(base, "ck")
	one, m, err := trainRanks(t, context.Background(), c, 1, rows, opts, func(int) string { return filepath.Join(base, "one") }, func(int) string { return "" })
	if err != nil {
		t.Fatal(err)
	}
	// One rank stops after step 3; three ranks resume from its checkpoint.
	ctx, stop := context.WithCancel(context.Background())
	o := opts
	o.Progress = func(p Progress) {
		if p.Step == 3 {
			stop()
		}
	}
	if _, _, err := trainRanks(t, ctx, c, 1, rows, o, func(int) string { return filepath.Join(base, "stopped") }, func(int) string { return ck }); !errors.Is(err, context.Canceled) {
		t.Fatalf("stopped run: %v", err)
	}
	got, _, err := trainRanks(t, context.Background(), c, 3, rows, opts, func(r int) string { return filepath.Join(base, fmt.Sprintf("three-%d", r)) }, func(int) string { return ck })
	if err != nil {
		t.Fatal(err)
	}
	sameTraining(t, "resumed on 3 ranks", m, one, got)

	// Rank 0 sees the checkpoints, rank 1 an empty folder.
	_, _, err = trainRanks(t, context.Background(), c, 2, rows, opts, func(r int) string { return filepath.Join(base, fmt.Sprintf("split-%d", r)) },
		func(r int) string { return []string{ck, filepath.Join(base, "empty")}[r] })
	if err == nil || !strings.Contains(err.Error(), "different checkpoints") {
		t.Errorf("ranks with different checkpoints: %v", err)
	}
}

// A backend without AllReduceGrads cannot train across ranks.
type soloSession struct{ Session }

func TestGroupNeedsAReducer(t *testing.T) {
	c := tinyConfig()
	m := tinyModel(t, c)
	cfg := sessionConfig()
	cfg.Group = localGroups(2)[0]
	_, err := Train(context.Background(), soloSession{openCPU(t, m, cfg)}, trainRows(c.VocabSize, 8, 16, 1), trainOptions(t.TempDir()))
	if !errors.Is(err, errNoReducer) {
		t.Errorf("2 ranks on a session without AllReduceGrads: %v", err)
	}
}

// TestLastOwnMicroBatch: the micro-batch before which each rank starts its
// overlapped all-reduce is its own last one, and only when every rank has
// one (otherwise the ranks' collectives would not match).
func TestLastOwnMicroBatch(t *testing.T) {
	for _, c := range []struct{ n, rank, size, want int }{
		{4, 0, 2, 2}, {4, 1, 2, 3}, {3, 0, 2, 2}, {3, 1, 2, 1}, {2, 1, 2, 1},
		{1, 0, 2, -1}, {5, 2, 4, 2}, {8, 3, 4, 7}, {4, 0, 1, -1},
	} {
		if got := LastOwnMicroBatch(c.n, c.rank, c.size); got != c.want {
			t.Errorf("LastOwnMicroBatch(%d, %d, %d) = %d, want %d", c.n, c.rank, c.size, got, c.want)
		}
	}
}
