package trainer

import (
	"errors"
	"fmt"
)

// Data parallelism: several ranks (processes, one GPU each) train one
// adapter together. Every rank runs Train with the same options, data and
// session settings; each computes its share of every optimizer step's
// micro-batches, the gradients are summed over the ranks before the
// update, and all ranks apply the same update. Because the data order,
// the dropout masks and the loss normaliser are those of the whole step,
// N ranks train as one rank does with the same global batch, up to the
// order in which gradients are summed.

// Group is the set of ranks of one training run.
type Group interface {
	// Rank is this process's place in the group, from 0; Size the number
	// of ranks.
	Rank() int
	Size() int
	// AllReduceSum replaces x, on every rank, with the sum over the ranks
	// of their x: the same bits on every rank.
	AllReduceSum(x []float64) error
	// Broadcast returns, on every rank, the data rank root passed.
	Broadcast(root int, data []byte) ([]byte, error)
}

// GradientReducer is a Session that trains in a group: it sums the
// gradients accumulated since the last step over the ranks of its
// SessionConfig.Group.
type GradientReducer interface {
	AllReduceGrads() error
}

// OverlappingReducer is a GradientReducer that can sum each layer's
// gradients while the backward pass goes on to earlier layers.
// ReduceInNextBackward, called before a rank's last micro-batch of a step,
// makes that micro-batch's backward pass start the sums, and
// AllReduceGrads then waits for them. The ranks' collectives must match:
// every rank calls it in the same steps.
type OverlappingReducer interface {
	GradientReducer
	ReduceInNextBackward()
}

// LastOwnMicroBatch is the index of rank's last micro-batch among n, when
// every rank has one (so that all of them may overlap their all-reduce
// with it), and -1 otherwise.
func LastOwnMicroBatch(n, rank, size int) int {
	if size < 2 || n < size {
		return -1
	}
	return (n-1-rank)/size*size + rank
}

// rankOf is the group's rank and size, 0 and 1 without a group.
func rankOf(g Group) (rank, size int) {
	if g == nil {
		return 0, 1
	}
	return g.Rank(), g.Size()
}

// sumOver sums x over the group in place; without a group it does nothing.
func sumOver(g Group, x ...*float64) error {
	if g == nil || g.Size() == 1 {
		return nil
	}
	buf := make([]float64, len(x))
	for i, p := range x {
		buf[i] = *p
	}
	if err := g.AllReduceSum(buf); err != nil {
		return fmt.Errorf("rank %d of %d: %w", g.Rank(), g.Size(), err)
	}
	for i, p := range x {
		*p = buf[i]
	}
	return nil
}

// errNoReducer: a backend whose sessions cannot sum gradients over ranks.
var errNoReducer = errors.New("this backend's sessions cannot train across ranks")

// AllReduceGrads sums the CPU session's gradients over its group, in
// float64, rounding the sums to the gradients' float32.
func (s *cpuSession) AllReduceGrads() error {
	g := s.cfg.Group
	if g == nil || g.Size() == 1 {
		return nil
	}
	params := s.a.Params()
	n := 0
	for _, p := range params {
		n += len(p.Grad)
	}
	buf := make([]float64, 0, n)
	for _, p := range params {
		for _, v := range p.Grad {
			buf = append(buf, float64(v))
		}
	}
	if err := g.AllReduceSum(buf); err != nil {
		return fmt.Errorf("summing gradients over %d ranks: %w", g.Size(), err)
	}
	for _, p := range params {
		for i := range p.Grad {
			p.Grad[i] = float32(buf[i])
		}
		buf = buf[len(p.Grad):]
	}
	return nil
}
