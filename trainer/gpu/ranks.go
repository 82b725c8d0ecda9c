package gpu

import (
	"fmt"
	"time"

	"gemmaft/cuda"
	"gemmaft/trainer"
)

// Training with other ranks: each rank's session runs on its own GPU and
// sums its LoRA gradients with the others' through NCCL before each step.

// deviceOf is the GPU a rank of g takes: its local rank among the devices
// it sees, or the only one when the launcher gave each rank one GPU
// (CUDA_VISIBLE_DEVICES, Slurm's --gpus-per-task).
func deviceOf(g trainer.Group) (int, error) {
	lr, ok := g.(interface{ LocalRank() int })
	if g == nil || g.Size() == 1 || !ok {
		return 0, nil
	}
	n, err := cuda.DeviceCount()
	if err != nil {
		return 0, err
	}
	switch {
	case n == 1:
		return 0, nil
	case lr.LocalRank() < n:
		return lr.LocalRank(), nil
	}
	return 0, fmt.Errorf("gpu: local rank %d, but this process sees %d GPUs: start at most one rank per GPU on each machine", lr.LocalRank(), n)
}

// joinComm forms the NCCL communicator of the session's group: rank 0
// makes its id and sends it to the others over the group.
func (s *session) joinComm() error {
	g := s.cfg.Group
	if g == nil || g.Size() == 1 {
		return nil
	}
	var id cuda.NCCLUniqueID
	if g.Rank() == 0 {
		var err error
		if id, err = cuda.NewNCCLUniqueID(); err != nil {
			return fmt.Errorf("gpu: NCCL, which training on several GPUs needs: %w", err)
		}
	}
	b, err := g.Broadcast(0, id.Internal[:])
	if err != nil {
		return err
	}
	if len(b) != len(id.Internal) {
		return fmt.Errorf("gpu: rank 0 sent an NCCL id of %d bytes", len(b))
	}
	copy(id.Internal[:], b)
	return s.dev.Do(func(c *cuda.Ctx) error {
		var err error
		if s.comm, err = c.NewComm(id, g.Rank(), g.Size()); err != nil {
			return err
		}
		s.red = &reducer{}
		if s.red.stream, err = c.NewStream(); err != nil {
			return err
		}
		s.red.done, err = c.NewEvent()
		return err
	})
}

// reducer sums a layer's LoRA gradients over the ranks as soon as the
// backward pass has finished them, on a stream of its own, while the pass
// goes on to earlier layers: during a rank's last micro-batch of a step
// (ReduceInNextBackward), when no later micro-batch adds to them.
type reducer struct {
	stream *cuda.Stream
	done   *cuda.Event // recorded after a layer's backward pass
	next   bool        // the next backward pass reduces
	active bool        // reductions are queued on stream
}

// ReduceInNextBackward makes the next LossAndGrad start the gradients'
// all-reduce layer by layer (trainer.OverlappingReducer).
func (s *session) ReduceInNextBackward() {
	if s.red != nil {
		s.red.next = true
	}
}

// reduceLayer queues the all-reduce of layer l's gradients behind the
// work queued so far on the working stream.
func (s *session) reduceLayer(c *cuda.Ctx, l int) error {
	r, lo := s.red, s.lora
	off, n := lo.layerStart[l], lo.layerStart[l+1]-lo.layerStart[l]
	if n == 0 {
		return nil
	}
	if err := r.done.Record(nil); err != nil {
		return err
	}
	if err := r.stream.Wait(r.done); err != nil {
		return err
	}
	r.active = true
	return s.comm.AllReduceSumF32(c, r.stream, lo.grad.Ptr.Add(4*off), n)
}

// reduceTimeout bounds the wait for one step's gradient all-reduce: a
// rank that died inside it would otherwise leave the others waiting for
// ever. The ranks meet over the group just before (a rank that died
// earlier is found there at once), and a live all-reduce takes
// milliseconds, the first one (NCCL connecting its peers) seconds; under
// a minute, so that every rank of a run with a dead one ends within one.
const reduceTimeout = 45 * time.Second

// AllReduceGrads sums the LoRA gradients over the ranks, in place, in
// float32, and waits for the sum: the one the last backward pass queued
// layer by layer, or else the whole buffer at once. Past
// reduceTimeout the communicator is aborted and the step fails.
func (s *session) AllReduceGrads() error {
	if s.comm == nil {
		return nil
	}
	watchdog := time.AfterFunc(reduceTimeout, func() { s.comm.Abort() })
	err := s.dev.Do(func(c *cuda.Ctx) error {
		if s.red.active {
			// Queued layer by layer during the backward pass: wait for them.
			s.red.active = false
			if err := s.red.stream.Synchronize(); err != nil {
				return err
			}
			return s.comm.AsyncError()
		}
		if err := s.comm.AllReduceSumF32(c, nil, s.lora.grad.Ptr, s.lora.total); err != nil {
			return err
		}
		if err := c.Stream().Synchronize(); err != nil {
			return err
		}
		return s.comm.AsyncError()
	})
	if !watchdog.Stop() {
		return fmt.Errorf("gpu: summing the gradients with the other ranks took over %v; a rank stopped answering (NCCL aborted): %v", reduceTimeout, err)
	}
	return err
}
