package cuda

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"unsafe"

	"github.com/ebitengine/purego"
)

// NCCL, for data parallelism over several GPUs, is loaded like the other
// libraries (PIPELINE_CUDA_LIBS, the system loader, CUDA's folders, pip's
// nvidia/nccl wheel), on first use only: a single-GPU run never needs it.
// Nothing here creates multicast objects; NVLink SHARP stays as the
// environment (NCCL_NVLS_ENABLE) sets it.

var ncclLib = libSpec{name: "NCCL", sonames: []string{"libnccl.so.2", "libnccl.so"}}

// NCCLUniqueID is what rank 0 makes and every rank passes to NewComm: the
// address of NCCL's own bootstrap, 128 bytes (ncclUniqueId).
type NCCLUniqueID struct {
	Internal [128]byte
}

type ncclAPI struct {
	ncclGetVersion, ncclGetUniqueId, ncclCommDestroy, ncclCommAbort    cfunc
	ncclAllReduce, ncclBroadcast, ncclGetErrorString, ncclGetLastError cfunc
	ncclCommGetAsyncError                                              cfunc
	// ncclCommInitRank takes the 128-byte id by value, which purego passes
	// on the stack as the C ABI does.
	initRank func(comm *uintptr, nranks int32, id NCCLUniqueID, rank int32) int32
}

func (a *ncclAPI) table() []symbol {
	return []symbol{
		{fn: &a.ncclGetVersion, name: "ncclGetVersion"},
		{fn: &a.ncclGetUniqueId, name: "ncclGetUniqueId"},
		{fn: &a.ncclCommDestroy, name: "ncclCommDestroy"},
		{fn: &a.ncclCommAbort, name: "ncclCommAbort"},
		{fn: &a.ncclAllReduce, name: "ncclAllReduce"},
		{fn: &a.ncclBroadcast, name: "ncclBroadcast"},
		{fn: &a.ncclGetErrorString, name: "ncclGetErrorString"},
		{fn: &a.ncclGetLastError, name: "ncclGetLastError", optional: true},
		{fn: &a.ncclCommGetAsyncError, name: "ncclCommGetAsyncError"},
	}
}

var (
	ncclOnce   sync.Once
	ncclLoaded *Library
	nccl       ncclAPI
)

// LoadNCCL finds and loads NCCL once; the Library says where from, or why
// not.
func LoadNCCL() *Library {
	ncclOnce.Do(func() {
		var initRank cfunc
		table := append(nccl.table(), symbol{fn: &initRank, name: "ncclCommInitRank"})
		ncclLoaded = load(ncclLib, candidates(realFS(), ncclLib.sonames), table, nil)
		if !ncclLoaded.Found() {
			return
		}
		purego.RegisterFunc(&nccl.initRank, initRank.ptr)
		var v int32
		if nccl.ncclGetVersion.call(uintptr(unsafe.Pointer(&v))) == 0 {
			// 22703 for 2.27.3 (versions from 2.9 on: major·10000 + minor·100 + patch).
			ncclLoaded.Version = fmt.Sprintf("%d.%d.%d", v/10000, v%10000/100, v%100)
		}
	})
	return ncclLoaded
}

// NCCLError is a failed NCCL call.
type NCCLError struct {
	Call   string
	Result int    // ncclResult_t
	Detail string // ncclGetLastError, when NCCL said more
}

func (e *NCCLError) Error() string {
	msg := fmt.Sprintf("nccl: %s: %s (%d)", e.Call, cString(nccl.ncclGetErrorString.call(uintptr(e.Result))), e.Result)
	if e.Detail != "" {
		msg += ": " + e.Detail
	}
	return msg
}

func ncclCheck(call string, r uintptr, comm uintptr) error {
	if int32(r) == 0 {
		return nil
	}
	e := &NCCLError{Call: call, Result: int(int32(r))}
	if nccl.ncclGetLastError.ptr != 0 {
		e.Detail = cString(nccl.ncclGetLastError.call(comm))
	}
	return e
}

// NewNCCLUniqueID makes the id of a new communicator; rank 0 makes it and
// sends it to the others.
func NewNCCLUniqueID() (NCCLUniqueID, error) {
	var id NCCLUniqueID
	if lib := LoadNCCL(); !lib.Found() {
		return id, lib.Err
	}
	return id, ncclCheck("ncclGetUniqueId", nccl.ncclGetUniqueId.call(uintptr(unsafe.Pointer(&id))), 0)
}

// Comm is one rank's NCCL communicator, on its device; use it inside Do,
// except Abort, which another goroutine may call to end an operation that
// waits on a rank that went away.
type Comm struct {
	h atomic.Uintptr
}

// NewComm joins rank of size ranks to the communicator id names. Every
// rank must call it; it returns once all have.
func (c *Ctx) NewComm(id NCCLUniqueID, rank, size int) (*Comm, error) {
	if err := c.check(); err != nil {
		return nil, err
	}
	if lib := LoadNCCL(); !lib.Found() {
		return nil, lib.Err
	}
	var h uintptr
	if err := ncclCheck("ncclCommInitRank", uintptr(uint32(nccl.initRank(&h, int32(size), id, int32(rank)))), 0); err != nil {
		return nil, err
	}
	m := &Comm{}
	m.h.Store(h)
	return m, nil
}

// NCCL's data types and reduction.
const (
	ncclFloat32  = 7
	ncclBfloat16 = 9
	ncclSum      = 0
)

// AllReduceSumF32 sums n float32 values at buf over the ranks, in place,
// on stream s (nil: the context's working stream).
func (m *Comm) AllReduceSumF32(c *Ctx, s *Stream, buf DevicePtr, n int64) error {
	return m.allReduce(c, s, buf, n, ncclFloat32)
}

// AllReduceSumBF16 is AllReduceSumF32 for bfloat16 values.
func (m *Comm) AllReduceSumBF16(c *Ctx, s *Stream, buf DevicePtr, n int64) error {
	return m.allReduce(c, s, buf, n, ncclBfloat16)
}

func (m *Comm) allReduce(c *Ctx, s *Stream, buf DevicePtr, n int64, dtype uintptr) error {
	if err := c.check(); err != nil {
		return err
	}
	h, err := m.handle()
	if err != nil {
		return err
	}
	r := nccl.ncclAllReduce.call(uintptr(buf), uintptr(buf), uintptr(n), dtype, ncclSum, h, c.streamOr(s).handle)
	return ncclCheck("ncclAllReduce", r, h)
}

// BroadcastF32 copies root's n float32 values at buf to every rank's buf.
func (m *Comm) BroadcastF32(c *Ctx, buf DevicePtr, n int64, root int) error {
	if err := c.check(); err != nil {
		return err
	}
	h, err := m.handle()
	if err != nil {
		return err
	}
	r := nccl.ncclBroadcast.call(uintptr(buf), uintptr(buf), uintptr(n), ncclFloat32, uintptr(root), h, c.stream.handle)
	return ncclCheck("ncclBroadcast", r, h)
}

// handle is the live communicator's handle, or an error once aborted.
func (m *Comm) handle() (uintptr, error) {
	if h := m.h.Load(); h != 0 {
		return h, nil
	}
	return 0, errors.New("nccl: the communicator was aborted")
}

// AsyncError reports an error NCCL met in the background (a peer that went
// away, a network failure), which a pending operation may otherwise wait
// on for ever.
func (m *Comm) AsyncError() error {
	h, err := m.handle()
	if err != nil {
		return err
	}
	var r int32
	if err := ncclCheck("ncclCommGetAsyncError", nccl.ncclCommGetAsyncError.call(h, uintptr(unsafe.Pointer(&r))), h); err != nil {
		return err
	}
	return ncclCheck("the communicator", uintptr(uint32(r)), h)
}

// Abort ends the communicator at once, without waiting for the other
// ranks: NCCL's kernels stop and whatever waits on them returns.
func (m *Comm) Abort() error {
	h := m.h.Swap(0)
	if h == 0 {
		return nil
	}
	return ncclCheck("ncclCommAbort", nccl.ncclCommAbort.call(h), 0)
}

// Destroy frees the communicator once its work is done.
func (m *Comm) Destroy() error {
	h := m.h.Swap(0)
	if h == 0 {
		return nil
	}
	return ncclCheck("ncclCommDestroy", nccl.ncclCommDestroy.call(h), 0)
}
