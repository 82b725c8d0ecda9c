package cuda

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"unsafe"

	"github.com/ebitengine/purego"
)

// Library reports how one CUDA library was searched for and what was found.
type Library struct {
	Name    string   // "CUDA driver", "NVRTC", "cuBLASLt"
	Path    string   // the file loaded; empty when none was
	Via     string   // how it was found: ViaOverride, ViaLoader, ViaToolkit, ViaWheel
	Version string   // the library's own version, e.g. "13.0"
	Tried   []string // candidates that failed, each "path: reason"
	Err     error    // why none was loaded; nil on success
}

// Found reports whether the library was loaded.
func (l *Library) Found() bool { return l.Err == nil && l.Path != "" }

// cfunc is one C function resolved from a library.
type cfunc struct {
	name string
	ptr  uintptr
}

// call runs the function; callers convert r to the library's status type.
//
// Arguments are often Go pointers converted to uintptr in the call
// expression. uintptrescapes moves what they point to onto the heap:
// without it a pointer to a stack variable goes stale when the stack is
// copied to grow on the way into C, and the C side writes to the old copy.
//
//go:uintptrescapes
func (f *cfunc) call(args ...uintptr) uintptr {
	r, _, _ := purego.SyscallN(f.ptr, args...)
	return r
}

// check runs a driver function and turns a failing CUresult into an error.
//
//go:uintptrescapes
func (f *cfunc) check(args ...uintptr) error {
	r, _, _ := purego.SyscallN(f.ptr, args...)
	if Result(int32(r)) != 0 {
		return &DriverError{Call: f.name, Result: Result(int32(r))}
	}
	return nil
}

// symbol is one entry of a library's binding table.
type symbol struct {
	fn       *cfunc
	name     string
	alt      string // an older name to fall back on
	optional bool   // absent on older versions; callers test fn.ptr
}

// bind resolves every symbol of the table in the library h, failing on the
// first required one that is missing (a stub or a foreign file of the same
// name).
func bind(h uintptr, table []symbol) error {
	for _, s := range table {
		s.fn.name = s.name
		s.fn.ptr = dlsym(h, s.name)
		if s.fn.ptr == 0 && s.alt != "" {
			s.fn.name = s.alt
			s.fn.ptr = dlsym(h, s.alt)
		}
		if s.fn.ptr == 0 && !s.optional {
			return fmt.Errorf("symbol %s missing", s.name)
		}
	}
	return nil
}

// load tries each candidate in order and keeps the first that opens, binds
// and passes accept (nil accepts all); a candidate that fails is closed and
// listed in Tried, and the search moves on.
func load(spec libSpec, cands []candidate, table []symbol, accept func() error) *Library {
	lib := &Library{Name: spec.name}
	if !dlSupported {
		lib.Err = fmt.Errorf("%w: %s: %v", ErrUnavailable, spec.name, errNoDLSupport)
		return lib
	}
	for _, c := range cands {
		h, err := dlopen(c.path)
		if err != nil {
			// A bare name the loader does not know is the common case, not
			// worth listing; a file that exists but fails to load is.
			if strings.Contains(c.path, "/") {
				lib.Tried = append(lib.Tried, c.path+": "+shortDLError(err))
			}
			continue
		}
		err = bind(h, table)
		if err == nil && accept != nil {
			err = accept()
		}
		if err != nil {
			dlclose(h)
			lib.Tried = append(lib.Tried, c.path+": "+err.Error())
			continue
		}
		lib.Path, lib.Via = c.path, c.via
		if !strings.Contains(c.path, "/") {
			if p := loadedPath(c.path); p != "" {
				lib.Path = p
			}
		}
		return lib
	}
	lib.Err = &NotFoundError{Name: spec.name, File: spec.sonames[0]}
	return lib
}

// Searched is where libraries are looked for, in order.
const Searched = LibsEnv + ", the system loader, CUDA's folders and pip nvidia-* wheels"

// A NotFoundError is a library's error when no candidate loaded: an
// ErrUnavailable naming the file looked for.
type NotFoundError struct {
	Name string // "CUDA driver"
	File string // the file looked for: libcuda.so.1
}

func (e *NotFoundError) Error() string {
	return ErrUnavailable.Error() + ": " + e.Name + " not found" + SearchHint(e.File)
}

func (e *NotFoundError) Unwrap() error { return ErrUnavailable }

// SearchHint is a NotFoundError's parenthesis: where the search went, and
// how to point it at file.
func SearchHint(file string) string {
	return fmt.Sprintf(" (searched %s; set %s to a folder holding %s)", Searched, LibsEnv, file)
}

var errNoDLSupport = errors.New("loading libraries at run time is implemented for Linux only")

func shortDLError(err error) string {
	s := err.Error()
	if i := strings.LastIndex(s, ": "); i >= 0 && strings.Contains(s[:i], "/") {
		return s[i+2:]
	}
	return s
}

// cString copies a NUL-terminated C string.
func cString(p uintptr) string {
	if p == 0 {
		return ""
	}
	ptr := *(*unsafe.Pointer)(unsafe.Pointer(&p))
	n := 0
	for *(*byte)(unsafe.Add(ptr, n)) != 0 {
		n++
	}
	return string(unsafe.Slice((*byte)(ptr), n))
}

// cBytes returns s as a NUL-terminated byte slice for C.
func cBytes(s string) []byte {
	b := make([]byte, len(s)+1)
	copy(b, s)
	return b
}

// runtimeLibs holds the three libraries once loaded.
type runtimeLibs struct {
	driver, nvrtc, blasLt *Library
	driverVersion         int // e.g. 13000 for CUDA 13.0
	initErr               error
	cu                    driverAPI
	nv                    nvrtcAPI
	lt                    blasLtAPI
}

var (
	libsOnce sync.Once
	libs     *runtimeLibs
)

// loadLibs loads the driver, initialises it, then loads NVRTC and cuBLASLt
// no newer than the driver supports. It runs once per process.
func loadLibs() *runtimeLibs {
	libsOnce.Do(func() {
		fs := realFS()
		l := &runtimeLibs{}
		// The toolkit's stub libcuda (for linking only) loads and binds
		// but refuses cuInit; a real driver may come later in the search.
		l.driver = load(driverLib, candidates(fs, driverLib.sonames), l.cu.table(), func() error {
			var de *DriverError
			if err := l.cu.cuInit.check(0); errors.As(err, &de) && de.Result == 34 { // CUDA_ERROR_STUB_LIBRARY
				return err
			}
			return nil
		})
		maxMajor := 0
		if l.driver.Found() {
			var v int32
			if err := l.cu.cuDriverGetVersion.check(uintptr(unsafe.Pointer(&v))); err == nil {
				l.driverVersion = int(v)
				maxMajor = int(v) / 1000
				l.driver.Version = fmt.Sprintf("%d.%d", v/1000, v%1000/10)
			}
			if err := l.cu.cuInit.check(0); err != nil {
				l.initErr = err
			}
		}
		l.nvrtc = load(nvrtcLib, candidates(fs, sonamesUpTo(nvrtcLib, maxMajor)), l.nv.table(), nil)
		if l.nvrtc.Found() {
			var major, minor int32
			if l.nv.nvrtcVersion.call(uintptr(unsafe.Pointer(&major)), uintptr(unsafe.Pointer(&minor))) == 0 {
				l.nvrtc.Version = fmt.Sprintf("%d.%d", major, minor)
			}
		}
		l.blasLt = load(blasLtLib, candidates(fs, sonamesUpTo(blasLtLib, maxMajor)), l.lt.table(), nil)
		if l.blasLt.Found() {
			v := l.lt.cublasLtGetVersion.call()
			l.blasLt.Version = fmt.Sprintf("%d.%d.%d", v/10000, v%10000/100, v%100)
		}
		libs = l
	})
	return libs
}

// usable returns nil when every library loaded and the driver started, or
// an error wrapping ErrUnavailable that says what is missing.
func (l *runtimeLibs) usable() error {
	for _, lib := range []*Library{l.driver, l.nvrtc, l.blasLt} {
		if lib.Err != nil {
			return lib.Err
		}
	}
	if l.initErr != nil {
		return fmt.Errorf("%w: the driver did not start: %v", ErrUnavailable, l.initErr)
	}
	return nil
}

func driverErrorName(r Result) string {
	if libs == nil || libs.cu.cuGetErrorName.ptr == 0 {
		return ""
	}
	var p uintptr
	if libs.cu.cuGetErrorName.call(uintptr(r), uintptr(unsafe.Pointer(&p))) != 0 {
		return ""
	}
	return cString(p)
}

func driverErrorString(r Result) string {
	if libs == nil || libs.cu.cuGetErrorString.ptr == 0 {
		return ""
	}
	var p uintptr
	if libs.cu.cuGetErrorString.call(uintptr(r), uintptr(unsafe.Pointer(&p))) != 0 {
		return ""
	}
	return cString(p)
}
