package gpu

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"gemmaft/cuda"
	"gemmaft/cuda/cudatest"
	"gemmaft/ranks"
	"gemmaft/trainer"
	"gemmaft/trainer/backendtest"
)

// TestDataParallelOnGPUs: two ranks, one GPU each, their gradients summed
// through NCCL, train as one GPU does with the same global batch: every
// step's loss within 2e-3 (bf16 activations; only the order in which the
// float32 gradients are summed differs, and each rank's micro-batches are
// those one GPU computes). Run it again with NCCL_P2P_DISABLE=1 and
// NCCL_SHM_DISABLE=1 to hold NCCL's socket transport, as between machines,
// to the same.
func TestDataParallelOnGPUs(t *testing.T) {
	cudatest.Device(t)
	if n, err := cuda.DeviceCount(); err != nil || n < 2 {
		t.Skipf("needs two GPUs (%d, %v)", n, err)
	}
	sc, opts := demoOptions()
	sc.Model = demoModel(t)
	opts.MaxSteps, opts.EvalFraction, opts.EvalEvery = 12, 0.1, 6
	rows := syntheticRows(262144, 40, 512, 3)
	sc.MaxTokens = opts.BatchSize * 512
	train := func(g trainer.Group, out string) (*trainer.Result, error) {
		c := sc
		c.Group = g
		s, err := trainer.OpenSession(context.Background(), "cuda", c)
		if err != nil {
			return nil, err
		}
		defer s.Close()
		o := opts
		o.OutDir = out
		return trainer.Train(context.Background(), s, rows, o)
	}
	dir := t.TempDir()
	start := time.Now()
	one, err := train(nil, filepath.Join(dir, "one"))
	if err != nil {
		t.Fatal(err)
	}
	oneTime := time.Since(start)

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	var two *trainer.Result
	errs := make([]error, 2)
	var wg sync.WaitGroup
	start = time.Now()
	for r := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			g, err := ranks.Join(context.Background(), ranks.Rank{Rank: r, Size: 2, LocalRank: r, Addr: addr}, ranks.Options{Token: "t", JoinTimeout: time.Minute})
			if err != nil {
				errs[r] = err
				return
			}
			defer g.Close()
			res, err := train(g, filepath.Join(dir, fmt.Sprint("rank", r)))
			if r == 0 {
				two = res
			}
			errs[r] = err
		}()
	}
	wg.Wait()
	twoTime := time.Since(start)
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	want, got := backendtest.ReadMetrics(t, one.MetricsPath), backendtest.ReadMetrics(t, two.MetricsPath)
	if len(want) != len(got) {
		t.Fatalf("%d steps on one GPU, %d on two", len(want), len(got))
	}
	worst := 0.0
	for i := range want {
		worst = math.Max(worst, math.Abs(got[i].Loss-want[i].Loss)/want[i].Loss)
	}
	if worst > 2e-3 {
		t.Errorf("losses on two GPUs differ from one GPU's by up to %.3g relative", worst)
	}
	if math.Abs(one.EvalLoss-two.EvalLoss) > 2e-3*one.EvalLoss {
		t.Errorf("eval loss %v on two GPUs, %v on one", two.EvalLoss, one.EvalLoss)
	}
	t.Logf("NCCL_P2P_DISABLE=%q NCCL_SHM_DISABLE=%q: losses within %.3g of one GPU's (eval %.5f vs %.5f); %d steps in %v on one GPU, %v on two",
		os.Getenv("NCCL_P2P_DISABLE"), os.Getenv("NCCL_SHM_DISABLE"), worst, two.EvalLoss, one.EvalLoss, len(got), oneTime.Round(time.Millisecond), twoTime.Round(time.Millisecond))
}
