package cuda

import (
	"errors"
	"unsafe"
)

// Stream is a CUDA stream of its context. Work on one stream runs in order.
type Stream struct {
	ctx    *Ctx
	handle uintptr
}

// NewStream creates a stream that does not synchronise with the legacy
// default stream.
func (c *Ctx) NewStream() (*Stream, error) {
	if err := c.check(); err != nil {
		return nil, err
	}
	const nonBlocking = 1 // CU_STREAM_NON_BLOCKING
	var h uintptr
	if err := c.cu.cuStreamCreate.check(uintptr(unsafe.Pointer(&h)), nonBlocking); err != nil {
		return nil, err
	}
	return &Stream{ctx: c, handle: h}, nil
}

// Synchronize waits for the stream's work and reports its errors.
func (s *Stream) Synchronize() error {
	if err := s.ctx.check(); err != nil {
		return err
	}
	return s.ctx.cu.cuStreamSynchronize.check(s.handle)
}

// Destroy releases the stream once its work is done. The working stream
// cannot be destroyed.
func (s *Stream) Destroy() error {
	if err := s.ctx.check(); err != nil {
		return err
	}
	if s == s.ctx.stream {
		return errors.New("cuda: the context's working stream cannot be destroyed")
	}
	return s.ctx.cu.cuStreamDestroy.check(s.handle)
}

// Wait makes later work on s wait for e.
func (s *Stream) Wait(e *Event) error {
	if err := s.ctx.check(); err != nil {
		return err
	}
	return s.ctx.cu.cuStreamWaitEvent.check(s.handle, e.handle, 0)
}

// Event marks a point in a stream, for ordering and timing.
type Event struct {
	ctx    *Ctx
	handle uintptr
}

// NewEvent creates an event that records time.
func (c *Ctx) NewEvent() (*Event, error) {
	if err := c.check(); err != nil {
		return nil, err
	}
	var h uintptr
	if err := c.cu.cuEventCreate.check(uintptr(unsafe.Pointer(&h)), 0); err != nil {
		return nil, err
	}
	return &Event{ctx: c, handle: h}, nil
}

// Record marks the current end of stream s (nil: the working stream).
func (e *Event) Record(s *Stream) error {
	if err := e.ctx.check(); err != nil {
		return err
	}
	return e.ctx.cu.cuEventRecord.check(e.handle, e.ctx.streamOr(s).handle)
}

// Synchronize waits until the event has happened.
func (e *Event) Synchronize() error {
	if err := e.ctx.check(); err != nil {
		return err
	}
	return e.ctx.cu.cuEventSynchronize.check(e.handle)
}

// Elapsed returns the milliseconds between start and e, both recorded and
// completed.
func (e *Event) Elapsed(start *Event) (float32, error) {
	if err := e.ctx.check(); err != nil {
		return 0, err
	}
	var ms float32
	if err := e.ctx.cu.cuEventElapsedTime.check(uintptr(unsafe.Pointer(&ms)), start.handle, e.handle); err != nil {
		return 0, err
	}
	return ms, nil
}

// Destroy releases the event.
func (e *Event) Destroy() error {
	if err := e.ctx.check(); err != nil {
		return err
	}
	return e.ctx.cu.cuEventDestroy.check(e.handle)
}

// Graph is a captured sequence of stream work, replayed with one launch:
// it removes the per-launch host cost when a step is many small kernels.
type Graph struct {
	ctx   *Ctx
	graph uintptr
	exec  uintptr
}

// Capture records the work that f queues on s (not the working stream,
// which may be used outside the capture) into a graph, without running it.
func (c *Ctx) Capture(s *Stream, f func() error) (*Graph, error) {
	if err := c.check(); err != nil {
		return nil, err
	}
	if s == nil || s == c.stream {
		return nil, errors.New("cuda: Capture needs a stream made by NewStream")
	}
	const threadLocal = 1 // CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
	if err := c.cu.cuStreamBeginCapture.check(s.handle, threadLocal); err != nil {
		return nil, err
	}
	c.capturing = true
	ferr := f()
	c.capturing = false
	var g uintptr
	endErr := c.cu.cuStreamEndCapture.check(s.handle, uintptr(unsafe.Pointer(&g)))
	if ferr != nil {
		if g != 0 {
			c.cu.cuGraphDestroy.call(g)
		}
		return nil, ferr
	}
	if endErr != nil {
		return nil, endErr
	}
	var exec uintptr
	if err := c.cu.cuGraphInstantiate.check(uintptr(unsafe.Pointer(&exec)), g, 0); err != nil {
		c.cu.cuGraphDestroy.call(g)
		return nil, err
	}
	return &Graph{ctx: c, graph: g, exec: exec}, nil
}

// CaptureWorking records into a graph the work f queues on the working
// stream (kernels, GEMMs and other calls given no stream), without running
// it: the working stream is a fresh one while f runs. f must not wait for
// the device (no Upload, Download or Synchronize).
func (c *Ctx) CaptureWorking(f func() error) (*Graph, error) {
	if err := c.check(); err != nil {
		return nil, err
	}
	s, err := c.NewStream()
	if err != nil {
		return nil, err
	}
	defer s.Destroy()
	return c.Capture(s, func() error {
		working := c.stream
		c.stream = s
		defer func() { c.stream = working }()
		return f()
	})
}

// Launch replays the graph on s (nil: the working stream).
func (g *Graph) Launch(s *Stream) error {
	if err := g.ctx.check(); err != nil {
		return err
	}
	return g.ctx.cu.cuGraphLaunch.check(g.exec, g.ctx.streamOr(s).handle)
}

// Destroy releases the graph.
func (g *Graph) Destroy() error {
	if err := g.ctx.check(); err != nil {
		return err
	}
	err := g.ctx.cu.cuGraphExecDestroy.check(g.exec)
	if err2 := g.ctx.cu.cuGraphDestroy.check(g.graph); err == nil {
		err = err2
	}
	return err
}
