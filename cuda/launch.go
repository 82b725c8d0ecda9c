package cuda

import (
	"fmt"
	"math"
	"time"
	"unsafe"
)

// Module is compiled device code loaded into a context.
type Module struct {
	ctx    *Ctx
	handle uintptr
	funcs  map[string]*Function

	Name      string
	Key       [32]byte      // the compile cache key
	Target    string        // "sm_90" (cubin) or "compute_XX" (PTX)
	FromCache bool          // the image came from the disk cache
	LoadTime  time.Duration // compile (or cache read) plus module load
}

// Function is one kernel of a module.
type Function struct {
	m      *Module
	handle uintptr
	Name   string
	// Parameter sizes in bytes, read from the kernel when the driver can
	// tell (CUDA 12.4 and later); nil otherwise.
	ParamSizes []int
}

// Function looks up an extern "C" kernel by name.
func (m *Module) Function(name string) (*Function, error) {
	if err := m.ctx.check(); err != nil {
		return nil, err
	}
	if f, ok := m.funcs[name]; ok {
		return f, nil
	}
	cu := m.ctx.cu
	var h uintptr
	cname := cBytes(name)
	if err := cu.cuModuleGetFunction.check(uintptr(unsafe.Pointer(&h)), m.handle, uintptr(unsafe.Pointer(&cname[0]))); err != nil {
		return nil, fmt.Errorf("kernel %s in %s: %w", name, m.Name, err)
	}
	f := &Function{m: m, handle: h, Name: name}
	if cu.cuFuncGetParamInfo.ptr != 0 {
		// With the count known, only valid indices are asked for; older
		// drivers are probed until the first index past the end fails.
		count := uintptr(maxKernelArgs)
		if cu.cuFuncGetParamCount.ptr != 0 {
			var n uintptr
			if cu.cuFuncGetParamCount.call(h, uintptr(unsafe.Pointer(&n))) == 0 {
				count = min(n, maxKernelArgs)
			}
		}
		sizes := []int{}
		for i := uintptr(0); i < count; i++ {
			var off, size uintptr
			if cu.cuFuncGetParamInfo.call(h, i, uintptr(unsafe.Pointer(&off)), uintptr(unsafe.Pointer(&size))) != 0 {
				break
			}
			sizes = append(sizes, int(size))
		}
		f.ParamSizes = sizes
	}
	m.funcs[name] = f
	return f, nil
}

// SetMaxDynamicSharedMemory lets the kernel use more than 48 KiB of
// dynamic shared memory per block.
func (f *Function) SetMaxDynamicSharedMemory(bytes int) error {
	if err := f.m.ctx.check(); err != nil {
		return err
	}
	const maxDynamicShared = 8 // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
	return f.m.ctx.cu.cuFuncSetAttribute.check(f.handle, maxDynamicShared, uintptr(bytes))
}

// BlocksPerSM is how many blocks of blockSize threads and dynamicShared
// bytes of dynamic shared memory one multiprocessor runs at once (0: not
// even one; a cooperative launch needs every block resident).
func (f *Function) BlocksPerSM(blockSize, dynamicShared int) (int, error) {
	if err := f.m.ctx.check(); err != nil {
		return 0, err
	}
	var n int32
	err := f.m.ctx.cu.cuOccupancyMaxActiveBlocksPerMultiprocessor.check(uintptr(unsafe.Pointer(&n)), f.handle, uintptr(blockSize), uintptr(dynamicShared))
	return int(n), err
}

// Resources is what a compiled kernel takes from the multiprocessor, per
// thread: what bounds how many of its blocks run at once, and whether
// the compiler spilled registers to (slow) local memory.
type Resources struct {
	Registers   int // per thread
	LocalBytes  int // per thread: spills and local arrays
	StaticShare int // static shared memory per block, bytes
}

// Resources reads the kernel's register count and memory from the driver.
func (f *Function) Resources() (Resources, error) {
	if err := f.m.ctx.check(); err != nil {
		return Resources{}, err
	}
	get := func(attr uintptr) (int, error) {
		var v int32
		err := f.m.ctx.cu.cuFuncGetAttribute.check(uintptr(unsafe.Pointer(&v)), attr, f.handle)
		return int(v), err
	}
	var r Resources
	var err error
	// CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, _LOCAL_SIZE_BYTES, _NUM_REGS.
	if r.StaticShare, err = get(1); err != nil {
		return r, err
	}
	if r.LocalBytes, err = get(3); err != nil {
		return r, err
	}
	r.Registers, err = get(4)
	return r, err
}

// Dim3 is a grid or block shape; zero Y or Z mean 1.
type Dim3 struct{ X, Y, Z int }

// LaunchConfig is a kernel launch's shape.
type LaunchConfig struct {
	Grid, Block Dim3
	SharedMem   int     // dynamic shared memory per block, bytes
	Stream      *Stream // nil: the working stream
	// Cooperative launches every block at once or fails: a kernel whose
	// blocks wait for each other (a grid barrier) needs it.
	Cooperative bool
}

// Grid1D returns a launch config covering n items with blocks of
// blockSize threads.
func Grid1D(n, blockSize int) LaunchConfig {
	return LaunchConfig{Grid: Dim3{X: max(1, (n+blockSize-1)/blockSize)}, Block: Dim3{X: blockSize}}
}

// Launch queues kernel f with args, each one of: Buffer or DevicePtr (a
// pointer), int32, uint32, int64, uint64, uint16, float32, float64. A Go
// int is refused (its C width is ambiguous). When the driver reports the
// kernel's parameters, their count and sizes are checked first, so a
// mismatched call fails here instead of corrupting memory.
func (c *Ctx) Launch(f *Function, cfg LaunchConfig, args ...any) error {
	if err := c.check(); err != nil {
		return err
	}
	if len(args) > maxKernelArgs {
		return fmt.Errorf("kernel %s: %d arguments, at most %d", f.Name, len(args), maxKernelArgs)
	}
	if f.ParamSizes != nil && len(args) != len(f.ParamSizes) {
		return fmt.Errorf("kernel %s takes %d arguments, got %d", f.Name, len(f.ParamSizes), len(args))
	}
	for i, a := range args {
		var v uint64
		var size int
		switch x := a.(type) {
		case Buffer:
			v, size = uint64(x.Ptr), 8
		case DevicePtr:
			v, size = uint64(x), 8
		case int32:
			v, size = uint64(uint32(x)), 4
		case uint32:
			v, size = uint64(x), 4
		case int64:
			v, size = uint64(x), 8
		case uint64:
			v, size = x, 8
		case uint16:
			v, size = uint64(x), 2
		case float32:
			v, size = uint64(math.Float32bits(x)), 4
		case float64:
			v, size = math.Float64bits(x), 8
		case int:
			return fmt.Errorf("kernel %s: argument %d is a Go int; pass int32 or int64 to match the kernel", f.Name, i)
		default:
			return fmt.Errorf("kernel %s: argument %d has unsupported type %T", f.Name, i, a)
		}
		if f.ParamSizes != nil && f.ParamSizes[i] != size {
			return fmt.Errorf("kernel %s: argument %d is %T (%d bytes) but the kernel's parameter is %d bytes",
				f.Name, i, a, size, f.ParamSizes[i])
		}
		c.argVals[i] = v
	}
	g, b := cfg.Grid, cfg.Block
	g.Y, g.Z, b.Y, b.Z = max(g.Y, 1), max(g.Z, 1), max(b.Y, 1), max(b.Z, 1)
	if g.X < 1 || b.X < 1 {
		return fmt.Errorf("kernel %s: empty launch (grid %v, block %v)", f.Name, cfg.Grid, cfg.Block)
	}
	var params uintptr
	if len(args) > 0 {
		params = uintptr(unsafe.Pointer(&c.argPtrs[0]))
	}
	var err error
	if cfg.Cooperative {
		err = c.cu.cuLaunchCooperativeKernel.check(f.handle, uintptr(g.X), uintptr(g.Y), uintptr(g.Z),
			uintptr(b.X), uintptr(b.Y), uintptr(b.Z), uintptr(cfg.SharedMem), c.streamOr(cfg.Stream).handle, params)
	} else {
		err = c.cu.cuLaunchKernel.check(f.handle, uintptr(g.X), uintptr(g.Y), uintptr(g.Z),
			uintptr(b.X), uintptr(b.Y), uintptr(b.Z), uintptr(cfg.SharedMem), c.streamOr(cfg.Stream).handle, params, 0)
	}
	if err != nil {
		return fmt.Errorf("kernel %s: %w", f.Name, err)
	}
	return nil
}

// Unload releases the module; its Functions must not be launched again.
// A later Compile of the same source loads it afresh (from the disk cache
// when there is one).
func (m *Module) Unload() error {
	if err := m.ctx.check(); err != nil {
		return err
	}
	if m.handle == 0 {
		return fmt.Errorf("cuda: module %s already unloaded", m.Name)
	}
	delete(m.ctx.modules, m.Key)
	err := m.ctx.cu.cuModuleUnload.check(m.handle)
	m.handle = 0
	return err
}
