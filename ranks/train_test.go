package ranks

import (
	"context"
	"errors"
	"math"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"gemmaft/trainer"
)

var _ trainer.Group = (*Group)(nil)

// TestTrainOverTCP: two ranks joined over TCP train a tiny model as one
// rank does with the same global batch.
func TestTrainOverTCP(t *testing.T) {
	c, _ := trainer.Preset("tiny")
	c.VocabSize, c.Hidden, c.Intermediate, c.Layers = 97, 32, 48, 2
	c.Heads, c.KVHeads, c.HeadDim, c.SlidingWindow = 4, 2, 8, 3
	c.DType = "float32"
	c.LayerTypes = []trainer.LayerType{trainer.SlidingAttention, trainer.FullAttention}
	dir := t.TempDir()
	if err := trainer.WriteRandomCheckpoint(filepath.Join(dir, "model"), c, trainer.InitOptions{Seed: 7, Std: 0.2, NormStd: 0.5}); err != nil {
		t.Fatal(err)
	}
	var rows trainer.Rows
	for i := range 16 {
		var r trainer.PackedRow
		for j := range 16 {
			id := int32((i*5 + j) % c.VocabSize)
			r.InputIDs, r.PositionIDs = append(r.InputIDs, id), append(r.PositionIDs, int32(j))
			r.Labels = append(r.Labels, id)
		}
		r.Labels[0] = trainer.IgnoreIndex
		r.SeqLengths = []int32{16}
		rows = append(rows, r)
	}
	train := func(g trainer.Group, out string) (*trainer.Result, error) {
		m, err := trainer.LoadModel(filepath.Join(dir, "model"))
		if err != nil {
			return nil, err
		}
		s, err := trainer.NewCPUSession(m, trainer.SessionConfig{
			LoRA:      trainer.LoRAConfig{R: 4, Alpha: 8, Dropout: 0.05, Targets: trainer.AllModules},
			Optimizer: trainer.OptimizerConfig{Name: "adamw"}, Group: g})
		if err != nil {
			return nil, err
		}
		return trainer.Train(context.Background(), s, rows, trainer.TrainOptions{LR: 1e-2, BatchSize: 2, GradAccum: 2,
			Seed: 3, EvalFraction: 0.25, EvalEvery: 2, OutDir: out})
	}
	one, err := train(nil, filepath.Join(dir, "one"))
	if err != nil {
		t.Fatal(err)
	}
	groups, errs := joinAll(t, 2, func(int) Options { return Options{Token: "t", JoinTimeout: 10 * time.Second} })
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	var two *trainer.Result
	var wg sync.WaitGroup
	errs = make([]error, 2)
	for r, g := range groups {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res, err := train(g, filepath.Join(dir, "two", []string{"0", "1"}[r]))
			if r == 0 {
				two = res
			}
			errs[r] = err
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	if one.Steps != two.Steps || math.Abs(one.FinalLoss-two.FinalLoss) > 1e-6*one.FinalLoss || math.Abs(one.EvalLoss-two.EvalLoss) > 1e-6*one.EvalLoss {
		t.Errorf("two ranks: %d steps, loss %v, eval %v; one rank: %d, %v, %v", two.Steps, two.FinalLoss, two.EvalLoss, one.Steps, one.FinalLoss, one.EvalLoss)
	}
	t.Logf("one rank: loss %.6f eval %.6f; two ranks over TCP: %.6f, %.6f", one.FinalLoss, one.EvalLoss, two.FinalLoss, two.EvalLoss)
}
