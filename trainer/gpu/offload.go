package gpu

import (
	"fmt"

	"gemmaft/cuda"
)

// Offloading the saved layer inputs: with gradient checkpointing, the
// input of every block is kept through the forward pass for the backward
// pass to recompute the block from, with what the block saves beside it
// (workspace.oAt). They are the largest part of the activations (5.8 GiB
// at 12B, seq 4096, batch 2). Offloaded, each goes to pinned host memory
// as soon as the forward pass has run its block, on a stream of its own,
// while the next blocks compute; the backward pass fetches each back one
// block ahead of its use. The device keeps three slots: in the backward
// pass, the block's input, the recomputed block's output, and the next
// block's input arriving. Only data moves: the numbers are those of a run
// without offloading, bit for bit.

// OffloadEnv names the switch: "auto" (the default) offloads what the run
// would not fit without (choosePlan), "inputs" the saved layer inputs,
// "on" those and the LoRA gradients (the least device memory), "off"
// nothing.
const OffloadEnv = "PIPELINE_OFFLOAD"

const offloadSlots = 3

// offloadMode reads OffloadEnv.
func offloadMode() (string, error) { return envSwitch(OffloadEnv, "auto", "on", "inputs", "off") }

// offloader holds the host copies and the slots' bookkeeping.
type offloader struct {
	layers int
	host   []*cuda.HostBuffer // host[i]: block i's input, i < layers
	slots  [offloadSlots]cuda.Buffer
	copy   *cuda.Stream
	// saved[i] has happened once host[i] holds input i; loaded[i] once a
	// slot holds it again; computed marks the working stream's progress
	// for the copy stream to wait on.
	saved, loaded []*cuda.Event
	computed      *cuda.Event
	slotOf        []int  // the backward pass's slot of each input
	resident      []bool // input i is in slotOf[i]
}

func newOffloader(c *cuda.Ctx, layers int, slots [offloadSlots]cuda.Buffer, bytes int64) (*offloader, error) {
	o := &offloader{layers: layers, slots: slots, slotOf: make([]int, layers+1), resident: make([]bool, layers+1)}
	var err error
	if o.copy, err = c.NewStream(); err != nil {
		return nil, err
	}
	for i := 0; i < layers; i++ {
		h, err := c.AllocHost(bytes)
		if err != nil {
			o.free(c)
			return nil, fmt.Errorf("pinned host memory for the offloaded layer inputs (%d × %.2f GiB): %w", layers, gib(bytes), err)
		}
		o.host = append(o.host, h)
	}
	for i := 0; i < layers; i++ {
		s, err := c.NewEvent()
		if err != nil {
			return nil, err
		}
		l, err := c.NewEvent()
		if err != nil {
			return nil, err
		}
		o.saved, o.loaded = append(o.saved, s), append(o.loaded, l)
	}
	if o.computed, err = c.NewEvent(); err != nil {
		return nil, err
	}
	return o, nil
}

// forwardSlot is where the forward pass keeps input i.
func (o *offloader) forwardSlot(i int) cuda.DevicePtr { return o.slots[i%offloadSlots].Ptr }

// beforeWrite makes the working stream wait until the input that input
// i's slot held (i − 3) is safe on the host.
func (o *offloader) beforeWrite(c *cuda.Ctx, i int) error {
	if i < offloadSlots {
		return nil
	}
	return c.Stream().Wait(o.saved[i-offloadSlots])
}

// save copies input i to the host once the working stream has run block i
// (which writes what it saves into the same buffer).
func (o *offloader) save(c *cuda.Ctx, i int) error {
	if i >= o.layers {
		return nil // the last block's output is not needed again
	}
	if err := o.computed.Record(nil); err != nil {
		return err
	}
	if err := o.copy.Wait(o.computed); err != nil {
		return err
	}
	if err := c.CopyDtoHAsync(o.host[i], o.forwardSlot(i), o.copy); err != nil {
		return err
	}
	return o.saved[i].Record(o.copy)
}

// startBackward notes what the forward pass left in the slots (the last
// three inputs), and makes the working stream wait for the copies to the
// host, the last of which reads a slot the backward pass writes.
func (o *offloader) startBackward(c *cuda.Ctx) error {
	for i := range o.resident {
		o.resident[i] = i > o.layers-offloadSlots
		o.slotOf[i] = i % offloadSlots
	}
	return c.Stream().Wait(o.saved[o.layers-1])
}

// backwardSlots readies block l's backward pass: its input's slot (waiting
// for its transfer), the slot the recomputed block writes its output to,
// and the transfer of input l − 1 into the third slot.
func (o *offloader) backwardSlots(c *cuda.Ctx, l int) (in, out cuda.DevicePtr, err error) {
	if !o.resident[l] {
		return 0, 0, fmt.Errorf("offload: block %d's input was not fetched", l)
	}
	if err := c.Stream().Wait(o.loaded[l]); err != nil {
		return 0, 0, err
	}
	a, b := o.slotOf[l], o.slotOf[l+1]
	if p := l - 1; p >= 0 && !o.resident[p] {
		next := offloadSlots - a - b // the slot neither a nor b
		// The working stream is done with that slot once the work queued
		// so far (blocks above l) has run.
		if err := o.computed.Record(nil); err != nil {
			return 0, 0, err
		}
		if err := o.copy.Wait(o.computed); err != nil {
			return 0, 0, err
		}
		if err := c.CopyHtoDAsync(o.slots[next].Ptr, o.host[p], o.copy); err != nil {
			return 0, 0, err
		}
		if err := o.loaded[p].Record(o.copy); err != nil {
			return 0, 0, err
		}
		o.slotOf[p], o.resident[p] = next, true
	}
	return o.slots[a].Ptr, o.slots[b].Ptr, nil
}

// finish waits for the copy stream, so that the next pass starts clean.
func (o *offloader) finish() error { return o.copy.Synchronize() }

func (o *offloader) free(c *cuda.Ctx) {
	for _, h := range o.host {
		c.FreeHost(h)
	}
	o.host = nil
	for _, e := range append(append(o.saved, o.loaded...), o.computed) {
		if e != nil {
			e.Destroy()
		}
	}
	if o.copy != nil {
		o.copy.Destroy()
	}
}
