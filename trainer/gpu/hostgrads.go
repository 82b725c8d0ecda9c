package gpu

import (
	"encoding/binary"
	"fmt"
	"math"

	"gemmaft/cuda"
	"gemmaft/trainer"
)

// Gradients in host memory: in the low-memory layout of a run on one GPU,
// the adapter's float32 gradients (4 bytes a parameter: 0.85 GiB at 27B,
// r 32 on every projection) live in mapped pinned host memory. A layer's
// gradients are complete once the backward pass has run its block, so the
// pass computes them into one of three device slots and copies them out
// at once, on a stream of its own, while the pass goes on. A later
// micro-batch of the same step brings them back into a slot one layer
// ahead of use, to add to. The optimizer's update of a layer brings them
// into a slot too, during the next forward pass (pendingUpdate). The
// numbers are those of device-resident gradients, bit for bit: only where
// they rest between layers changes.

const gradSlots = 3

// gradsOnHost says whether a session of sc in the low-memory layout
// (offload) keeps its gradients in host memory. A group of ranks sums them
// on the device (NCCL), and an inference session has none.
func gradsOnHost(sc trainer.SessionConfig, offload bool) bool {
	return offload && !sc.Inference && (sc.Group == nil || sc.Group.Size() == 1)
}

// hostGrads moves the gradients between their host home and the slots.
type hostGrads struct {
	host     *cuda.HostBuffer // every layer's gradients, mapped
	slots    [gradSlots]cuda.Buffer
	copy     *cuda.Stream
	out, in  [gradSlots]*cuda.Event // a slot's last copy to, from the host done
	computed *cuda.Event
	held     [gradSlots]int // the layer a slot holds during a pass
	// fresh: the host holds no gradients (a step or a new state cleared
	// them), so a pass starts each layer's from zero instead of adding to
	// them.
	fresh bool
}

func newHostGrads(s *session, c *cuda.Ctx, total, widest int64) (*hostGrads, error) {
	h := &hostGrads{fresh: true}
	var err error
	if h.host, err = c.AllocMapped(4 * total); err != nil {
		return nil, fmt.Errorf("pinned host memory for the LoRA gradients (%.2f GiB): %w", gib(4*total), err)
	}
	for i := range h.slots {
		if h.slots[i], err = s.alloc(c, 4*max(widest, 1), "LoRA gradients (one layer's)"); err != nil {
			h.free(c)
			return nil, err
		}
	}
	if h.copy, err = c.NewStream(); err != nil {
		h.free(c)
		return nil, err
	}
	for _, e := range []**cuda.Event{&h.out[0], &h.out[1], &h.out[2], &h.in[0], &h.in[1], &h.in[2], &h.computed} {
		if *e, err = c.NewEvent(); err != nil {
			h.free(c)
			return nil, err
		}
	}
	return h, nil
}

// slotOf is layer l's slot: the backward pass runs the layers downward,
// so the three slots hold the layer being computed, the one above it on
// its way out and the one below on its way in.
func slotOf(l int) int { return l % gradSlots }

// rangeOf is layer l's part of the flat gradients, in bytes.
func (st *loraState) rangeOf(l int) (off, n int64) {
	return 4 * st.layerStart[l], 4 * (st.layerStart[l+1] - st.layerStart[l])
}

// beginLayer readies layer l's slot before its backward pass: zeroed, or
// holding what earlier micro-batches added (waiting for the copy started a
// layer ahead), and starts bringing layer l − 1's in.
func (h *hostGrads) beginLayer(c *cuda.Ctx, st *loraState, l int) error {
	sl := slotOf(l)
	last := len(st.layerStart) - 2
	if l == last {
		// The first layer of a pass: nothing of a pass that failed midway
		// may still be copying.
		if err := h.copy.Synchronize(); err != nil {
			return err
		}
	}
	if h.fresh {
		// The slot's previous layer (l + 3) must be out first.
		if l+gradSlots <= last {
			if err := c.Stream().Wait(h.out[sl]); err != nil {
				return err
			}
		}
		if _, n := st.rangeOf(l); n > 0 {
			if err := c.MemsetD8Async(h.slots[sl].Ptr, 0, n, nil); err != nil {
				return err
			}
		}
	} else {
		if l == last {
			if err := h.fetch(c, st, l); err != nil {
				return err
			}
		}
		if err := c.Stream().Wait(h.in[sl]); err != nil {
			return err
		}
		if l > 0 {
			// Its slot held layer l + 2, whose copy out is queued ahead on
			// the same stream.
			if err := h.fetch(c, st, l-1); err != nil {
				return err
			}
		}
	}
	h.held[sl] = l
	return nil
}

// fetch queues the copy of layer l's gradients into its slot on the copy
// stream.
func (h *hostGrads) fetch(c *cuda.Ctx, st *loraState, l int) error {
	sl := slotOf(l)
	if off, n := st.rangeOf(l); n > 0 {
		if err := c.CopyHtoDAsync(h.slots[sl].Ptr, h.host.Sub(off, n), h.copy); err != nil {
			return err
		}
	}
	return h.in[sl].Record(h.copy)
}

// fetchForUpdate queues the copy of layer l's gradients into its slot for
// a pending update (pendingUpdate), behind the work queued so far on the
// working stream: the update of the slot's previous layer reads it there.
func (h *hostGrads) fetchForUpdate(c *cuda.Ctx, st *loraState, l int) error {
	if err := h.behindWorking(); err != nil {
		return err
	}
	return h.fetch(c, st, l)
}

// behindWorking makes the copy stream's next copies wait for the work
// queued so far on the working stream.
func (h *hostGrads) behindWorking() error {
	if err := h.computed.Record(nil); err != nil {
		return err
	}
	return h.copy.Wait(h.computed)
}

// fetched makes the working stream wait for fetchForUpdate's copy of
// layer l and returns the address of its gradients in the flat layout:
// element i of the layer at that address + 4i.
func (h *hostGrads) fetched(c *cuda.Ctx, st *loraState, l int) (cuda.DevicePtr, error) {
	sl := slotOf(l)
	if err := c.Stream().Wait(h.in[sl]); err != nil {
		return 0, err
	}
	return h.slots[sl].Ptr.Add(-4 * st.layerStart[l]), nil
}

// endLayer queues the copy of layer l's finished gradients to the host,
// behind the work queued so far on the working stream.
func (h *hostGrads) endLayer(c *cuda.Ctx, st *loraState, l int) error {
	sl := slotOf(l)
	if err := h.behindWorking(); err != nil {
		return err
	}
	if off, n := st.rangeOf(l); n > 0 {
		if err := c.CopyDtoHAsync(h.host.Sub(off, n), h.slots[sl].Ptr, h.copy); err != nil {
			return err
		}
	}
	return h.out[sl].Record(h.copy)
}

// endPass waits for the last copies: the host then holds the step's
// gradients so far.
func (h *hostGrads) endPass() error {
	if err := h.copy.Synchronize(); err != nil {
		return err
	}
	h.fresh = false
	return nil
}

// layerPtr is where layer l's gradient element off (a flat index) is
// during its backward pass.
func (h *hostGrads) layerPtr(st *loraState, l int, off int64) cuda.DevicePtr {
	sl := slotOf(l)
	if h.held[sl] != l {
		panic(fmt.Sprintf("gpu: gradients of layer %d written while its slot holds layer %d", l, h.held[sl]))
	}
	return f32At(h.slots[sl], off-st.layerStart[l])
}

// values returns the gradients as float32 values (zero when fresh). The
// last pass's copies are done (endPass).
func (h *hostGrads) values(total int64) []float32 {
	g := make([]float32, total)
	if !h.fresh {
		for i := range g {
			g[i] = math.Float32frombits(binary.LittleEndian.Uint32(h.host.Bytes[4*i:]))
		}
	}
	return g
}

func (h *hostGrads) free(c *cuda.Ctx) {
	if h.host != nil {
		c.FreeHost(h.host)
		h.host = nil
	}
	for _, e := range append(h.out[:], append(h.in[:], h.computed)...) {
		if e != nil {
			e.Destroy()
		}
	}
	if h.copy != nil {
		h.copy.Destroy()
	}
}
