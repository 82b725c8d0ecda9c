package cuda

import (
	"errors"
	"fmt"
	"math/bits"
	"runtime"
	"unsafe"
)

// DevicePtr is an address in device memory.
type DevicePtr uint64

// Add returns p advanced by n bytes.
func (p DevicePtr) Add(n int64) DevicePtr { return DevicePtr(int64(p) + n) }

// Buffer is a device allocation: its address and the size asked for.
type Buffer struct {
	Ptr  DevicePtr
	Size int64
}

// MemStats counts the caching allocator's work.
type MemStats struct {
	InUse        int64 // bytes handed out and not yet freed (rounded sizes)
	Cached       int64 // bytes freed by callers and kept for reuse
	PeakInUse    int64
	Allocs       int64 // Alloc calls
	CacheHits    int64 // Allocs served from the cache
	DeviceAllocs int64 // cuMemAlloc calls
	DeviceFrees  int64 // cuMemFree calls
}

// allocator keeps freed blocks, grouped by rounded size, for reuse: a
// training step allocates the same shapes every time, and cuMemAlloc and
// cuMemFree synchronise the device. A block freed here may be handed out
// again at once; that is safe for work ordered on one stream (the usual
// case), and callers that share buffers across streams synchronise first.
type allocator struct {
	free  map[int64][]DevicePtr
	sizes map[DevicePtr]int64 // live blocks and their rounded sizes
	stats MemStats
}

// roundSize picks the block size for a request: multiples of 512 bytes up
// to 1 MiB, then steps of 1/8 of the size's power of two, so that a block
// wastes at most 12.5% while near sizes still share blocks.
func roundSize(n int64) int64 {
	const small = 512
	if n <= 1<<20 {
		return (n + small - 1) / small * small
	}
	step := int64(1) << (63 - bits.LeadingZeros64(uint64(n)) - 3)
	return (n + step - 1) / step * step
}

// AllocSize is the size of the block Alloc takes for a request of n
// bytes (what buffers laid out inside one block step by).
func AllocSize(n int64) int64 { return roundSize(n) }

// devicePage is the granularity in which the driver maps blocks of 2 MiB
// or more (PyTorch's caching allocator rounds its large blocks to it for
// the same reason).
const devicePage = 2 << 20

// DeviceBytes is the device memory that Alloc's block for a request of n
// bytes holds: AllocSize, mapped in whole pages from devicePage up (on an
// H200, plans that counted blocks so came within 0.09 GiB of the
// training presets' measured peaks, where AllocSize's sums missed them by
// up to 0.28 GiB).
func DeviceBytes(n int64) int64 { return WholeBytes(roundSize(n)) }

// WholeBytes is AllocWhole's block for a request of n bytes, and the device
// memory it holds: Alloc's size below devicePage, whole pages from there up.
func WholeBytes(n int64) int64 {
	if n < devicePage {
		return roundSize(n)
	}
	return (n + devicePage - 1) / devicePage * devicePage
}

// Alloc returns a device buffer of at least n bytes, reusing a cached block
// when one of the same rounded size is free. When the device is out of
// memory it frees the cache and tries once more.
func (c *Ctx) Alloc(n int64) (Buffer, error) {
	if n <= 0 {
		return Buffer{}, fmt.Errorf("cuda: Alloc(%d): size must be positive", n)
	}
	return c.allocBlock(n, roundSize(n))
}

// AllocWhole is Alloc for a buffer held as long as its owner lives: its
// block is rounded up to whole pages only, not to Alloc's size classes,
// which may add an eighth (the 2 GB embedding of a Gemma 3 model would
// take 126 MiB more) for reuses such buffers never see.
func (c *Ctx) AllocWhole(n int64) (Buffer, error) {
	if n <= 0 {
		return Buffer{}, fmt.Errorf("cuda: AllocWhole(%d): size must be positive", n)
	}
	return c.allocBlock(n, WholeBytes(n))
}

// allocBlock returns a block of size bytes (at least n) for a request of
// n bytes, cached or new.
func (c *Ctx) allocBlock(n, size int64) (Buffer, error) {
	if err := c.check(); err != nil {
		return Buffer{}, err
	}
	a := &c.alloc
	a.stats.Allocs++
	var p DevicePtr
	if list := a.free[size]; len(list) > 0 {
		p = list[len(list)-1]
		a.free[size] = list[:len(list)-1]
		a.stats.Cached -= size
		a.stats.CacheHits++
	} else {
		err := c.cu.cuMemAlloc.check(uintptr(unsafe.Pointer(&p)), uintptr(size))
		var de *DriverError
		if errors.As(err, &de) && de.Result == 2 { // CUDA_ERROR_OUT_OF_MEMORY
			a.releaseCached(c)
			err = c.cu.cuMemAlloc.check(uintptr(unsafe.Pointer(&p)), uintptr(size))
		}
		if err != nil {
			return Buffer{}, fmt.Errorf("%w (asked for %d bytes, %d in use)", err, size, a.stats.InUse)
		}
		a.stats.DeviceAllocs++
	}
	a.sizes[p] = size
	a.stats.InUse += size
	a.stats.PeakInUse = max(a.stats.PeakInUse, a.stats.InUse)
	return Buffer{Ptr: p, Size: n}, nil
}

// Free returns b to the cache. Freeing a buffer twice, or one that did not
// come from this context, is an error.
func (c *Ctx) Free(b Buffer) error {
	if err := c.check(); err != nil {
		return err
	}
	a := &c.alloc
	size, ok := a.sizes[b.Ptr]
	if !ok {
		return fmt.Errorf("cuda: Free(%#x): not a live allocation of this device", uint64(b.Ptr))
	}
	delete(a.sizes, b.Ptr)
	a.stats.InUse -= size
	a.free[size] = append(a.free[size], b.Ptr)
	a.stats.Cached += size
	return nil
}

// EmptyCache gives every cached block back to the driver.
func (c *Ctx) EmptyCache() error {
	if err := c.check(); err != nil {
		return err
	}
	return c.alloc.releaseCached(c)
}

// MemStats returns the allocator's counters.
func (c *Ctx) MemStats() MemStats { return c.alloc.stats }

func (a *allocator) releaseCached(c *Ctx) error {
	// Work queued on streams may still use blocks freed by the caller.
	if err := c.cu.cuCtxSynchronize.check(); err != nil {
		return err
	}
	var first error
	for size, list := range a.free {
		for _, p := range list {
			if err := c.cu.cuMemFree.check(uintptr(p)); err != nil && first == nil {
				first = err
			}
			a.stats.DeviceFrees++
			a.stats.Cached -= size
		}
		delete(a.free, size)
	}
	return first
}

func (a *allocator) releaseAll(c *Ctx) {
	_ = a.releaseCached(c)
	for p, size := range a.sizes {
		c.cu.cuMemFree.call(uintptr(p))
		a.stats.DeviceFrees++
		a.stats.InUse -= size
	}
	clear(a.sizes)
}

// HostBuffer is page-locked host memory: copies from and to it run
// asynchronously at full bus speed. A mapped one (AllocMapped) is also
// addressable by kernels, at Dev.
type HostBuffer struct {
	ptr   uintptr
	Bytes []byte
	Dev   DevicePtr // the kernels' address of a mapped buffer; 0 otherwise
	view  bool      // a Sub of another buffer: not freed on its own
}

// cuMemHostAlloc flags.
const memHostAllocDeviceMap = 0x02

// AllocHost allocates n bytes of pinned host memory.
func (c *Ctx) AllocHost(n int64) (*HostBuffer, error) {
	return c.allocHost(n, 0)
}

// AllocMapped allocates n bytes of pinned host memory that kernels read
// and write at h.Dev, across the bus: for data that a kernel touches once
// a step, where keeping it in device memory would cost more than the
// transfer.
func (c *Ctx) AllocMapped(n int64) (*HostBuffer, error) {
	h, err := c.allocHost(n, memHostAllocDeviceMap)
	if err != nil {
		return nil, err
	}
	var d DevicePtr
	if err := c.cu.cuMemHostGetDevicePointer.check(uintptr(unsafe.Pointer(&d)), h.ptr, 0); err != nil {
		c.FreeHost(h)
		return nil, err
	}
	h.Dev = d
	return h, nil
}

func (c *Ctx) allocHost(n int64, flags uintptr) (*HostBuffer, error) {
	if err := c.check(); err != nil {
		return nil, err
	}
	if n <= 0 {
		return nil, fmt.Errorf("cuda: AllocHost(%d): size must be positive", n)
	}
	var p uintptr
	if err := c.cu.cuMemHostAlloc.check(uintptr(unsafe.Pointer(&p)), uintptr(n), flags); err != nil {
		return nil, err
	}
	ptr := *(*unsafe.Pointer)(unsafe.Pointer(&p))
	return &HostBuffer{ptr: p, Bytes: unsafe.Slice((*byte)(ptr), n)}, nil
}

// Sub returns the n bytes of h from byte off, for copies of part of a
// buffer. It shares h's memory and is not freed on its own.
func (h *HostBuffer) Sub(off, n int64) *HostBuffer {
	b := h.Bytes[off : off+n : off+n]
	s := &HostBuffer{ptr: h.ptr + uintptr(off), Bytes: b, view: true}
	if h.Dev != 0 {
		s.Dev = h.Dev.Add(off)
	}
	return s
}

// FreeHost releases pinned memory; h.Bytes must not be used afterwards.
func (c *Ctx) FreeHost(h *HostBuffer) error {
	if err := c.check(); err != nil {
		return err
	}
	if h == nil || h.ptr == 0 {
		return errors.New("cuda: FreeHost of a freed or nil buffer")
	}
	if h.view {
		return errors.New("cuda: FreeHost of a Sub view; free the buffer it came from")
	}
	err := c.cu.cuMemFreeHost.check(h.ptr)
	h.ptr, h.Bytes, h.Dev = 0, nil, 0
	return err
}

// CopyHtoDAsync copies src into device memory at dst, ordered on s (nil:
// the working stream). src must stay untouched until the copy completes.
func (c *Ctx) CopyHtoDAsync(dst DevicePtr, src *HostBuffer, s *Stream) error {
	if err := c.check(); err != nil {
		return err
	}
	return c.cu.cuMemcpyHtoDAsync.check(uintptr(dst), src.ptr, uintptr(len(src.Bytes)), c.streamOr(s).handle)
}

// CopyDtoHAsync copies len(dst.Bytes) bytes from device memory at src into
// dst, ordered on s.
func (c *Ctx) CopyDtoHAsync(dst *HostBuffer, src DevicePtr, s *Stream) error {
	if err := c.check(); err != nil {
		return err
	}
	return c.cu.cuMemcpyDtoHAsync.check(dst.ptr, uintptr(src), uintptr(len(dst.Bytes)), c.streamOr(s).handle)
}

// CopyDtoDAsync copies n bytes between device addresses, ordered on s.
func (c *Ctx) CopyDtoDAsync(dst, src DevicePtr, n int64, s *Stream) error {
	if err := c.check(); err != nil {
		return err
	}
	return c.cu.cuMemcpyDtoDAsync.check(uintptr(dst), uintptr(src), uintptr(n), c.streamOr(s).handle)
}

// MemsetD8Async sets n bytes at p to v, ordered on s.
func (c *Ctx) MemsetD8Async(p DevicePtr, v byte, n int64, s *Stream) error {
	if err := c.check(); err != nil {
		return err
	}
	return c.cu.cuMemsetD8Async.check(uintptr(p), uintptr(v), uintptr(n), c.streamOr(s).handle)
}

// MemsetD32Async sets n 32-bit words at p to v, ordered on s.
func (c *Ctx) MemsetD32Async(p DevicePtr, v uint32, n int64, s *Stream) error {
	if err := c.check(); err != nil {
		return err
	}
	return c.cu.cuMemsetD32Async.check(uintptr(p), uintptr(v), uintptr(n), c.streamOr(s).handle)
}

// Elem is an element type that Upload and Download move as raw bytes.
type Elem interface {
	~int8 | ~uint8 | ~int16 | ~uint16 | ~int32 | ~uint32 | ~int64 | ~uint64 | ~float32 | ~float64
}

// Upload copies src to device memory at dst on the working stream and
// waits for it.
func Upload[T Elem](c *Ctx, dst DevicePtr, src []T) error {
	if err := c.check(); err != nil {
		return err
	}
	if len(src) == 0 {
		return nil
	}
	n := uintptr(len(src)) * unsafe.Sizeof(src[0])
	err := c.cu.cuMemcpyHtoDAsync.check(uintptr(dst), uintptr(unsafe.Pointer(&src[0])), n, c.stream.handle)
	if err == nil {
		err = c.cu.cuStreamSynchronize.check(c.stream.handle)
	}
	runtime.KeepAlive(src)
	return err
}

// Download copies len(dst) elements from device memory at src on the
// working stream and waits for them. Work queued earlier on that stream
// finishes first.
func Download[T Elem](c *Ctx, dst []T, src DevicePtr) error {
	if err := c.check(); err != nil {
		return err
	}
	if len(dst) == 0 {
		return nil
	}
	n := uintptr(len(dst)) * unsafe.Sizeof(dst[0])
	err := c.cu.cuMemcpyDtoHAsync.check(uintptr(unsafe.Pointer(&dst[0])), uintptr(src), n, c.stream.handle)
	if err == nil {
		err = c.cu.cuStreamSynchronize.check(c.stream.handle)
	}
	runtime.KeepAlive(dst)
	return err
}
