package cuda

import "fmt"

// GEMM tuning is a measurement mode: cuBLASLt's heuristic names its first
// choice of algorithm for a shape, but not always the fastest one (a
// product with K = 32 writing a wide output, for instance, is bound by
// its stores, which the heuristic does not model). With tuning on, each
// plan times the heuristic's first few choices on its first use and keeps
// the fastest for the rest of the context's life. The choice depends on
// timings, so two runs may choose differently and round differently:
// tuning tells how much a fixed choice per shape would gain; it is not a
// way to run.

type gemmTuning struct {
	candidates int               // the heuristic's choices to time (≤ 1: none)
	report     func(line string) // one line a plan: the first choice's time and the fastest's
}

// SetGEMMTuning turns tuning on for plans made from now on: each times
// the heuristic's first n choices (n ≤ 1: tuning off) and reports the
// outcome through report (nil: silently).
func (c *Ctx) SetGEMMTuning(n int, report func(line string)) error {
	if err := c.check(); err != nil {
		return err
	}
	if err := c.blasInit(); err != nil {
		return err
	}
	c.blas.tune = gemmTuning{candidates: n, report: report}
	return nil
}

// tuneRounds and tuneRuns: each candidate runs tuneRuns times in a row, in
// each of tuneRounds rounds over the candidates; its time is its best
// round's mean. A first untimed run of each loads its kernel.
const (
	tuneRounds = 3
	tuneRuns   = 3
)

// tuneGEMM times p's candidates on the call's operands, writing into a
// scratch copy of out so that the call's own result is computed once,
// afterwards, as without tuning. It waits for the device.
func (c *Ctx) tuneGEMM(p *gemmPlan, g GEMM, alpha float32, a, b DevicePtr, beta float32, out DevicePtr, s *Stream) error {
	candidates := p.candidates
	p.candidates = nil
	// The operands may come from work queued on s.
	if err := c.streamOr(s).Synchronize(); err != nil {
		return err
	}
	_, _, elems := g.Elements()
	bytes := elems * int64(g.CType.Size())
	scratch, err := c.Alloc(bytes)
	if err != nil {
		return fmt.Errorf("cuda: tuning GEMM %s: %w", g, err)
	}
	defer c.Free(scratch)
	if beta != 0 {
		if err := c.CopyDtoDAsync(scratch.Ptr, out, bytes, nil); err != nil {
			return err
		}
	}
	start, end, err := c.eventPair()
	if err != nil {
		return err
	}
	defer start.Destroy()
	defer end.Destroy()
	best := make([]float64, len(candidates)) // µs a call; 0: failed
	for i := range candidates {
		if c.matmul(p, g, &candidates[i], alpha, a, b, beta, scratch.Ptr, nil) == nil {
			best[i] = -1 // runs; not yet timed
		}
	}
	if err := c.stream.Synchronize(); err != nil {
		return err
	}
	for range tuneRounds {
		for i := range candidates {
			if best[i] == 0 {
				continue
			}
			if err := start.Record(nil); err != nil {
				return err
			}
			for range tuneRuns {
				if err := c.matmul(p, g, &candidates[i], alpha, a, b, beta, scratch.Ptr, nil); err != nil {
					return err
				}
			}
			if err := end.Record(nil); err != nil {
				return err
			}
			if err := end.Synchronize(); err != nil {
				return err
			}
			ms, err := end.Elapsed(start)
			if err != nil {
				return err
			}
			if us := 1000 * float64(ms) / tuneRuns; best[i] < 0 || us < best[i] {
				best[i] = us
			}
		}
	}
	pick, timed := -1, 0
	for i, t := range best {
		if t <= 0 {
			continue
		}
		timed++
		if pick < 0 || t < best[pick] {
			pick = i
		}
	}
	if pick < 0 {
		return nil // none ran: keep the first choice, whose call reports why
	}
	p.heuristic = candidates[pick]
	if r := c.blas.tune.report; r != nil {
		first := "failed"
		if best[0] > 0 {
			first = fmt.Sprintf("%.1f µs", best[0])
		}
		r(fmt.Sprintf("gemm %s: heuristic's first %s, fastest of %d timed: #%d %.1f µs", g, first, timed, pick, best[pick]))
	}
	return nil
}

// eventPair creates two timing events.
func (c *Ctx) eventPair() (*Event, *Event, error) {
	start, err := c.NewEvent()
	if err != nil {
		return nil, nil, err
	}
	end, err := c.NewEvent()
	if err != nil {
		start.Destroy()
		return nil, nil, err
	}
	return start, end, nil
}
