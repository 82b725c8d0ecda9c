package cuda

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"
	"unsafe"

	"gemmaft/internal/atomicfile"
	"gemmaft/internal/userdir"
)

// KernelCacheEnv overrides the folder where compiled kernels are kept.
const KernelCacheEnv = "PIPELINE_KERNEL_CACHE"

// Source is a CUDA C++ program for NVRTC. Kernels meant to be launched by
// name are declared extern "C".
type Source struct {
	Name    string            // shown in compiler messages, e.g. "elementwise.cu"
	Code    string            // the program text
	Headers map[string]string // files the program may #include, by name
	Options []string          // extra NVRTC options, e.g. "-DBLOCK=256"
}

// Compiler compiles with NVRTC and keeps the results on disk.
type Compiler struct {
	dir string // "" disables the disk cache
}

// DefaultKernelCacheDir returns $PIPELINE_KERNEL_CACHE, else the user's
// cache folder's pipeline/kernels.
func DefaultKernelCacheDir() (string, error) {
	if d := os.Getenv(KernelCacheEnv); d != "" {
		return d, nil
	}
	base, err := userdir.Cache()
	if err != nil {
		return "", fmt.Errorf("cuda: no folder for the kernel cache (set %s): %w", KernelCacheEnv, err)
	}
	return filepath.Join(base, "pipeline", "kernels"), nil
}

// NewCompiler returns a compiler caching into dir, or into
// DefaultKernelCacheDir when dir is empty.
func NewCompiler(dir string) (*Compiler, error) {
	if dir == "" {
		d, err := DefaultKernelCacheDir()
		if err != nil {
			return nil, err
		}
		dir = d
	}
	return &Compiler{dir: dir}, nil
}

// Dir returns the cache folder ("" when there is none).
func (c *Compiler) Dir() string { return c.dir }

// SetCompiler replaces the context's compiler, e.g. to use another cache
// folder.
func (c *Ctx) SetCompiler(comp *Compiler) error {
	if err := c.check(); err != nil {
		return err
	}
	c.compiler = comp
	return nil
}

// target is what NVRTC is asked to produce for a device.
type target struct {
	arch  string // "sm_90" for a cubin, "compute_89" for PTX
	cubin bool
}

// chooseTarget picks a cubin for the device's own architecture when NVRTC
// knows it, else PTX for the newest architecture NVRTC knows below it (the
// driver compiles that for the device at load time).
func chooseTarget(major, minor int, supported []int) (target, error) {
	want := major*10 + minor
	best := -1
	for _, a := range supported {
		if a == want {
			return target{arch: fmt.Sprintf("sm_%d", want), cubin: true}, nil
		}
		if a < want && a > best {
			best = a
		}
	}
	if best < 0 {
		return target{}, fmt.Errorf("cuda: this NVRTC cannot compile for sm_%d or any older architecture (it supports %v)", want, supported)
	}
	return target{arch: fmt.Sprintf("compute_%d", best)}, nil
}

// cacheKey is the SHA-256 of everything that determines the compiled
// image: the source and its headers, the options, NVRTC's version and the
// target. Each field is length-prefixed so no two inputs collide.
func cacheKey(src Source, options []string, nvrtcVersion string, t target) [32]byte {
	h := sha256.New()
	field := func(s string) {
		var n [8]byte
		binary.LittleEndian.PutUint64(n[:], uint64(len(s)))
		h.Write(n[:])
		h.Write([]byte(s))
	}
	field("gemmaft-kernel-v1")
	field(nvrtcVersion)
	field(t.arch)
	field(fmt.Sprint(len(options)))
	for _, o := range options {
		field(o)
	}
	field(src.Name)
	field(src.Code)
	names := make([]string, 0, len(src.Headers))
	for n := range src.Headers {
		names = append(names, n)
	}
	slices.Sort(names)
	field(fmt.Sprint(len(names)))
	for _, n := range names {
		field(n)
		field(src.Headers[n])
	}
	var key [32]byte
	h.Sum(key[:0])
	return key
}

// cachePath is where an image with this key lives.
func (comp *Compiler) cachePath(key [32]byte, t target) string {
	ext := ".cubin"
	if !t.cubin {
		ext = ".ptx"
	}
	return filepath.Join(comp.dir, hex.EncodeToString(key[:])+ext)
}

// store writes the image atomically: a reader sees no file or all of it.
func (comp *Compiler) store(path string, image []byte) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	return atomicfile.WriteFile(path, image)
}

// Compiler returns the context's compiler.
func (c *Ctx) Compiler() *Compiler { return c.compiler }

// nvrtcTarget returns the compile target for the context's device.
func (c *Ctx) nvrtcTarget() (target, error) {
	nv := &c.libs.nv
	var n int32
	if r := NVRTCResult(nv.nvrtcGetNumSupportedArchs.call(uintptr(unsafe.Pointer(&n)))); r != 0 {
		return target{}, &NVRTCError{Call: "nvrtcGetNumSupportedArchs", Result: r}
	}
	archs := make([]int32, max(n, 1))
	if r := NVRTCResult(nv.nvrtcGetSupportedArchs.call(uintptr(unsafe.Pointer(&archs[0])))); r != 0 {
		return target{}, &NVRTCError{Call: "nvrtcGetSupportedArchs", Result: r}
	}
	supported := make([]int, n)
	for i := range supported {
		supported[i] = int(archs[i])
	}
	return chooseTarget(c.dev.Info.Major, c.dev.Info.Minor, supported)
}

// compileImage runs NVRTC on src and returns the cubin or PTX.
func (c *Ctx) compileImage(src Source, options []string, t target) ([]byte, error) {
	return nvrtcCompile(&c.libs.nv, src, options, t)
}

// nvrtcCompile runs NVRTC on src and returns the cubin or PTX. It needs
// NVRTC only, no driver or device.
func nvrtcCompile(nv *nvrtcAPI, src Source, options []string, t target) ([]byte, error) {
	var keep [][]byte // C strings stay referenced until NVRTC is done
	cstr := func(s string) uintptr {
		b := cBytes(s)
		keep = append(keep, b)
		return uintptr(unsafe.Pointer(&b[0]))
	}
	names := make([]string, 0, len(src.Headers))
	for n := range src.Headers {
		names = append(names, n)
	}
	slices.Sort(names)
	hdrs := make([]uintptr, len(names)+1)
	incs := make([]uintptr, len(names)+1)
	for i, n := range names {
		hdrs[i] = cstr(src.Headers[n])
		incs[i] = cstr(n)
	}
	var prog uintptr
	r := NVRTCResult(nv.nvrtcCreateProgram.call(uintptr(unsafe.Pointer(&prog)), cstr(src.Code), cstr(src.Name),
		uintptr(len(names)), uintptr(unsafe.Pointer(&hdrs[0])), uintptr(unsafe.Pointer(&incs[0]))))
	if r != 0 {
		return nil, &NVRTCError{Call: "nvrtcCreateProgram", Result: r, Source: src.Name}
	}
	defer nv.nvrtcDestroyProgram.call(uintptr(unsafe.Pointer(&prog)))
	opts := make([]uintptr, len(options)+1)
	for i, o := range options {
		opts[i] = cstr(o)
	}
	r = NVRTCResult(nv.nvrtcCompileProgram.call(prog, uintptr(len(options)), uintptr(unsafe.Pointer(&opts[0]))))
	runtime.KeepAlive(keep)
	runtime.KeepAlive(hdrs)
	runtime.KeepAlive(incs)
	if r != 0 {
		return nil, &NVRTCError{Call: "nvrtcCompileProgram", Result: r, Source: src.Name, Log: programLog(nv, prog)}
	}
	sizeFn, getFn := nv.nvrtcGetCUBINSize, nv.nvrtcGetCUBIN
	if !t.cubin {
		sizeFn, getFn = nv.nvrtcGetPTXSize, nv.nvrtcGetPTX
	}
	var size uintptr
	if r := NVRTCResult(sizeFn.call(prog, uintptr(unsafe.Pointer(&size)))); r != 0 {
		return nil, &NVRTCError{Call: sizeFn.name, Result: r, Source: src.Name}
	}
	image := make([]byte, size)
	if size > 0 {
		if r := NVRTCResult(getFn.call(prog, uintptr(unsafe.Pointer(&image[0])))); r != 0 {
			return nil, &NVRTCError{Call: getFn.name, Result: r, Source: src.Name}
		}
	}
	return image, nil
}

// CompileForArch compiles src for arch (e.g. "sm_86") with NVRTC alone,
// without a driver or a device, and returns the cubin. It checks that
// kernels build for architectures the machine does not have; running them
// goes through Ctx.Compile.
func CompileForArch(src Source, arch string) ([]byte, error) {
	l := loadLibs()
	if l.nvrtc.Err != nil {
		return nil, l.nvrtc.Err
	}
	options := append([]string{"--gpu-architecture=" + arch, "--std=c++17"}, src.Options...)
	return nvrtcCompile(&l.nv, src, options, target{arch: arch, cubin: true})
}

func programLog(nv *nvrtcAPI, prog uintptr) string {
	var size uintptr
	if nv.nvrtcGetProgramLogSize.call(prog, uintptr(unsafe.Pointer(&size))) != 0 || size <= 1 {
		return ""
	}
	buf := make([]byte, size)
	if nv.nvrtcGetProgramLog.call(prog, uintptr(unsafe.Pointer(&buf[0]))) != 0 {
		return ""
	}
	return strings.TrimRight(string(buf), "\x00\n")
}

// Compile returns src compiled for this device and loaded as a module.
// Modules are kept per context, and images on disk under the SHA-256 of
// the source, headers, options, NVRTC version and target, so only the
// first use on a machine pays for NVRTC. A compile error carries NVRTC's
// log.
func (c *Ctx) Compile(src Source) (*Module, error) {
	if err := c.check(); err != nil {
		return nil, err
	}
	t, err := c.nvrtcTarget()
	if err != nil {
		return nil, err
	}
	options := append([]string{"--gpu-architecture=" + t.arch, "--std=c++17"}, src.Options...)
	key := cacheKey(src, options, c.libs.nvrtc.Version, t)
	if m, ok := c.modules[key]; ok {
		return m, nil
	}
	start := time.Now()
	var image []byte
	fromDisk := false
	path := ""
	if c.compiler != nil && c.compiler.dir != "" {
		path = c.compiler.cachePath(key, t)
		if b, err := os.ReadFile(path); err == nil && len(b) > 0 {
			image, fromDisk = b, true
		}
	}
	if image == nil {
		image, err = c.compileImage(src, options, t)
		if err != nil {
			return nil, err
		}
	}
	m, err := c.loadModule(src.Name, image, t)
	if err != nil && fromDisk {
		// A damaged cache file: drop it and compile afresh.
		os.Remove(path)
		fromDisk = false
		if image, err = c.compileImage(src, options, t); err == nil {
			m, err = c.loadModule(src.Name, image, t)
		}
	}
	if err != nil {
		return nil, err
	}
	if !fromDisk && path != "" {
		// A read-only or full disk costs only the next compile.
		_ = c.compiler.store(path, image)
	}
	m.Key, m.FromCache, m.LoadTime, m.Target = key, fromDisk, time.Since(start), t.arch
	c.modules[key] = m
	return m, nil
}

func (c *Ctx) loadModule(name string, image []byte, t target) (*Module, error) {
	if !t.cubin && (len(image) == 0 || image[len(image)-1] != 0) {
		image = append(image, 0) // PTX is loaded as a C string
	}
	var h uintptr
	err := c.cu.cuModuleLoadData.check(uintptr(unsafe.Pointer(&h)), uintptr(unsafe.Pointer(&image[0])))
	runtime.KeepAlive(image)
	if err != nil {
		return nil, fmt.Errorf("loading %s: %w", name, err)
	}
	return &Module{ctx: c, handle: h, Name: name, funcs: map[string]*Function{}}, nil
}
