package cuda

import (
	"errors"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"
)

// DeviceInfo describes one GPU, read without creating a context.
type DeviceInfo struct {
	Ordinal         int
	Name            string
	Major, Minor    int   // compute capability, e.g. 9.0 on H100/H200
	SMs             int   // multiprocessors
	TotalMemory     int64 // bytes
	L2Bytes         int
	MaxSharedOptin  int // bytes of shared memory a block may opt in to
	MemoryBusWidth  int // bits
	MemoryClockKHz  int
	ClockKHz        int
	ConcurrentCopy  bool
	ComputeCapLabel string // "sm_90"
}

// Device attributes (CUdevice_attribute).
const (
	attrClockRate         = 13
	attrMultiprocessors   = 16
	attrMemoryClockRate   = 36
	attrGlobalMemBusWidth = 37
	attrL2CacheSize       = 38
	attrAsyncEngineCount  = 40
	attrComputeMajor      = 75
	attrComputeMinor      = 76
	attrMaxSharedOptin    = 97
)

// Report is what Discover found: the libraries, the driver and the devices.
type Report struct {
	Driver, NVRTC, BLASLt Library
	DriverVersion         int // CUDA version the driver supports, e.g. 13000
	Devices               []DeviceInfo
	// Err is nil when the GPU can be used, else why not (wrapping
	// ErrUnavailable).
	Err error
}

// Libraries returns the three library reports in a fixed order.
func (r *Report) Libraries() []Library { return []Library{r.Driver, r.NVRTC, r.BLASLt} }

// Discover loads the CUDA libraries (once per process) and lists the
// devices. It never fails: what went wrong is in Report.Err.
func Discover() Report {
	l := loadLibs()
	rep := Report{Driver: *l.driver, NVRTC: *l.nvrtc, BLASLt: *l.blasLt, DriverVersion: l.driverVersion}
	if l.driver.Found() && l.initErr == nil {
		var n int32
		if err := l.cu.cuDeviceGetCount.check(uintptr(unsafe.Pointer(&n))); err != nil {
			rep.Err = err
			return rep
		}
		for i := 0; i < int(n); i++ {
			info, err := deviceInfo(l, i)
			if err != nil {
				rep.Err = err
				return rep
			}
			rep.Devices = append(rep.Devices, info)
		}
	}
	rep.Err = l.usable()
	if rep.Err == nil && len(rep.Devices) == 0 {
		rep.Err = fmt.Errorf("%w: the driver found no CUDA device", ErrUnavailable)
	}
	return rep
}

func deviceInfo(l *runtimeLibs, ordinal int) (DeviceInfo, error) {
	info := DeviceInfo{Ordinal: ordinal}
	var dev int32
	if err := l.cu.cuDeviceGet.check(uintptr(unsafe.Pointer(&dev)), uintptr(ordinal)); err != nil {
		return info, err
	}
	var name [256]byte
	if err := l.cu.cuDeviceGetName.check(uintptr(unsafe.Pointer(&name[0])), uintptr(len(name)), uintptr(dev)); err != nil {
		return info, err
	}
	info.Name = cString(uintptr(unsafe.Pointer(&name[0])))
	var total uint64
	if err := l.cu.cuDeviceTotalMem.check(uintptr(unsafe.Pointer(&total)), uintptr(dev)); err != nil {
		return info, err
	}
	info.TotalMemory = int64(total)
	attrs := []struct {
		attr int
		dst  *int
	}{
		{attrComputeMajor, &info.Major}, {attrComputeMinor, &info.Minor},
		{attrMultiprocessors, &info.SMs}, {attrL2CacheSize, &info.L2Bytes},
		{attrMaxSharedOptin, &info.MaxSharedOptin}, {attrGlobalMemBusWidth, &info.MemoryBusWidth},
		{attrMemoryClockRate, &info.MemoryClockKHz}, {attrClockRate, &info.ClockKHz},
	}
	for _, a := range attrs {
		var v int32
		if err := l.cu.cuDeviceGetAttribute.check(uintptr(unsafe.Pointer(&v)), uintptr(a.attr), uintptr(dev)); err != nil {
			return info, err
		}
		*a.dst = int(v)
	}
	var engines int32
	if l.cu.cuDeviceGetAttribute.check(uintptr(unsafe.Pointer(&engines)), attrAsyncEngineCount, uintptr(dev)) == nil {
		info.ConcurrentCopy = engines > 0
	}
	info.ComputeCapLabel = fmt.Sprintf("sm_%d%d", info.Major, info.Minor)
	return info, nil
}

// Device is one GPU with its primary context, owned by a goroutine locked
// to its OS thread. All work on it goes through Do.
type Device struct {
	Info DeviceInfo

	work   chan func()
	quit   chan struct{}
	closed atomic.Bool
	once   sync.Once
	exited chan struct{}
	ctx    *Ctx
}

// DeviceCount is the number of CUDA devices this process sees (after
// CUDA_VISIBLE_DEVICES).
func DeviceCount() (int, error) {
	l := loadLibs()
	if err := l.usable(); err != nil {
		return 0, err
	}
	var n int32
	if err := l.cu.cuDeviceGetCount.check(uintptr(unsafe.Pointer(&n))); err != nil {
		return 0, err
	}
	return int(n), nil
}

// Open starts device ordinal: it loads the libraries if needed, retains
// the primary context on a locked OS thread and creates the context's
// working stream. An error wrapping ErrUnavailable means "use the CPU".
func Open(ordinal int) (*Device, error) {
	n, err := DeviceCount()
	if err != nil {
		return nil, err
	}
	l := loadLibs()
	if ordinal < 0 || ordinal >= n {
		if n == 0 {
			return nil, fmt.Errorf("%w: the driver found no CUDA device", ErrUnavailable)
		}
		return nil, fmt.Errorf("cuda: device %d does not exist (%d found)", ordinal, n)
	}
	info, err := deviceInfo(l, ordinal)
	if err != nil {
		return nil, err
	}
	// A buffered queue lets Do hand work over without waiting for the
	// device thread to be at its receive.
	d := &Device{Info: info, work: make(chan func(), 1), quit: make(chan struct{}), exited: make(chan struct{})}
	started := make(chan error)
	go d.loop(l, started)
	if err := <-started; err != nil {
		return nil, err
	}
	return d, nil
}

// loop is the device's goroutine. It never unlocks its OS thread, so when
// it returns the thread exits with the context's binding.
func (d *Device) loop(l *runtimeLibs, started chan<- error) {
	runtime.LockOSThread()
	defer close(d.exited)
	c, err := newCtx(d, l)
	started <- err
	if err != nil {
		return
	}
	d.ctx = c
	for {
		if f, ok := poll(d.work, loopSpin); ok {
			f()
			continue
		}
		select {
		case f := <-d.work:
			f()
		case <-d.quit:
			c.release()
			return
		}
	}
}

// Parking and waking a thread costs a futex round trip each way of a Do
// (about 18 µs on an H100 VM, 60 µs and more on an H200 VM under a
// decoding loop), so each side polls for a while first:
//   - the device's thread, for the next call: back-to-back calls (a
//     decoding step after the host has read the last one's token) find
//     it awake;
//   - the caller, for its call's end: long enough to cover a decoding
//     step of one token (1.6 ms at 1B, 8 ms at 12B on an H200), whose
//     host part, run on a 1B step, is otherwise a tenth of it. A call
//     that takes longer (a training step) parks after this much CPU time.
//
// A model of Do's two threads, with a busy-waiting call of 1.5 ms and
// 20 µs between calls, measured 164 µs of hops a call with 50 µs polls
// and 7 µs with these.
const (
	loopSpin = 200 * time.Microsecond
	callSpin = 10 * time.Millisecond
)

// poll receives from ch without blocking, retrying for about d.
func poll[T any](ch <-chan T, d time.Duration) (T, bool) {
	var deadline time.Time
	for i := 1; ; i++ {
		select {
		case v := <-ch:
			return v, true
		default:
		}
		// Reading the clock costs far more than a channel poll (a system
		// call on some virtual machines), so the first polls go unclocked
		// and later ones read it rarely.
		if i%256 == 0 {
			now := time.Now()
			if deadline.IsZero() {
				deadline = now.Add(d)
			} else if now.After(deadline) {
				var zero T
				return zero, false
			}
		}
	}
}

// Do runs f on the device's thread with the context current, and returns
// f's error. Calls from several goroutines are serialised. f must not call
// Do on the same device (it would wait for itself) nor runtime.Goexit (so
// no t.Fatal inside f: return an error instead). A panic in f is re-raised
// in the caller.
func (d *Device) Do(f func(c *Ctx) error) error {
	if d.closed.Load() {
		return ErrClosed
	}
	type outcome struct {
		err      error
		panicked bool
		value    any
	}
	done := make(chan outcome, 1)
	job := func() {
		var out outcome
		returned := false
		defer func() {
			d.ctx.active.Store(false)
			if p := recover(); p != nil {
				out = outcome{panicked: true, value: p}
			} else if !returned {
				// runtime.Goexit (t.FailNow in a test) ends the device's
				// goroutine; the device is closed from here on.
				out.err = errors.New("cuda: Do callback called runtime.Goexit; the device is now closed")
				d.closed.Store(true)
			}
			done <- out
		}()
		d.ctx.active.Store(true)
		out.err = f(d.ctx)
		returned = true
	}
	select {
	case d.work <- job:
	case <-d.exited:
		return ErrClosed
	}
	out, ok := poll(done, callSpin)
	if !ok {
		select {
		case out = <-done:
		case <-d.exited:
			// Closed with the job still queued: it never ran.
			select {
			case out = <-done:
			default:
				return ErrClosed
			}
		}
	}
	if out.panicked {
		panic(out.value)
	}
	return out.err
}

// Close frees the device's memory, modules and handles and releases the
// primary context. Buffers from this device are invalid afterwards.
func (d *Device) Close() error {
	d.once.Do(func() {
		d.closed.Store(true)
		close(d.quit)
	})
	<-d.exited
	return nil
}

// Ctx is the device's context as seen from inside Do. Its methods fail
// with ErrOutsideDo when called after Do returned.
type Ctx struct {
	dev    *Device
	libs   *runtimeLibs
	cu     *driverAPI
	active atomic.Bool
	handle uintptr // CUcontext
	cuDev  int32

	stream   *Stream
	alloc    allocator
	modules  map[[32]byte]*Module
	compiler *Compiler
	blas     *blasState
	// capturing: a graph capture is under way (work is recorded, not run).
	capturing bool

	// Kernel arguments are staged here: cuLaunchKernel reads them during
	// the call, so one set, reused on this thread, is enough.
	argVals [maxKernelArgs]uint64
	argPtrs [maxKernelArgs]uintptr
}

const maxKernelArgs = 64

func newCtx(d *Device, l *runtimeLibs) (*Ctx, error) {
	c := &Ctx{dev: d, libs: l, cu: &l.cu, modules: map[[32]byte]*Module{}}
	c.alloc.sizes = map[DevicePtr]int64{}
	c.alloc.free = map[int64][]DevicePtr{}
	for i := range c.argPtrs {
		c.argPtrs[i] = uintptr(unsafe.Pointer(&c.argVals[i]))
	}
	if err := c.cu.cuDeviceGet.check(uintptr(unsafe.Pointer(&c.cuDev)), uintptr(d.Info.Ordinal)); err != nil {
		return nil, err
	}
	if err := c.cu.cuDevicePrimaryCtxRetain.check(uintptr(unsafe.Pointer(&c.handle)), uintptr(c.cuDev)); err != nil {
		return nil, err
	}
	if err := c.cu.cuCtxSetCurrent.check(c.handle); err != nil {
		c.cu.cuDevicePrimaryCtxRelease.call(uintptr(c.cuDev))
		return nil, err
	}
	c.active.Store(true)
	s, err := c.NewStream()
	c.active.Store(false)
	if err != nil {
		c.cu.cuDevicePrimaryCtxRelease.call(uintptr(c.cuDev))
		return nil, err
	}
	c.stream = s
	comp, err := NewCompiler("")
	if err != nil {
		comp = &Compiler{} // no disk cache; compiles still work
	}
	c.compiler = comp
	return c, nil
}

// release frees everything the context owns, on the device's thread.
func (c *Ctx) release() {
	c.cu.cuCtxSynchronize.call()
	if c.blas != nil {
		c.blas.destroy(c)
	}
	for _, m := range c.modules {
		c.cu.cuModuleUnload.call(m.handle)
	}
	c.alloc.releaseAll(c)
	if c.stream != nil {
		c.cu.cuStreamDestroy.call(c.stream.handle)
	}
	c.cu.cuDevicePrimaryCtxRelease.call(uintptr(c.cuDev))
}

func (c *Ctx) check() error {
	if !c.active.Load() {
		return ErrOutsideDo
	}
	return nil
}

// Device returns the device this context belongs to.
func (c *Ctx) Device() *Device { return c.dev }

// Stream returns the context's working stream, on which the package's
// synchronous helpers and default launches run.
func (c *Ctx) Stream() *Stream { return c.stream }

// Synchronize waits for all work on the device and reports any
// asynchronous error (a faulting kernel, for instance).
func (c *Ctx) Synchronize() error {
	if err := c.check(); err != nil {
		return err
	}
	return c.cu.cuCtxSynchronize.check()
}

// MemInfo returns the device's free and total memory in bytes.
func (c *Ctx) MemInfo() (free, total int64, err error) {
	if err := c.check(); err != nil {
		return 0, 0, err
	}
	var f, t uint64
	if err := c.cu.cuMemGetInfo.check(uintptr(unsafe.Pointer(&f)), uintptr(unsafe.Pointer(&t))); err != nil {
		return 0, 0, err
	}
	return int64(f), int64(t), nil
}

// streamOr returns s, or the context's working stream when s is nil.
func (c *Ctx) streamOr(s *Stream) *Stream {
	if s == nil {
		return c.stream
	}
	return s
}
