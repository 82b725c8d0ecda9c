package cuda

import (
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"

	"gemmaft/internal/userdir"
)

// LibsEnv names the override variable: a list of folders, separated by
// colons, searched for the CUDA libraries before anywhere else.
const LibsEnv = "PIPELINE_CUDA_LIBS"

// Where a candidate library was found, in search order.
const (
	ViaOverride = LibsEnv
	ViaLoader   = "system loader"
	ViaToolkit  = "CUDA folder"
	ViaWheel    = "pip wheel"
)

// libSpec says which files make up one library, newest major version first.
type libSpec struct {
	name     string   // human name, e.g. "cuBLASLt"
	sonames  []string // file names to try, e.g. libcublasLt.so.13
	required bool     // false: the GPU path works without it
}

var (
	driverLib = libSpec{name: "CUDA driver", sonames: []string{"libcuda.so.1", "libcuda.so"}, required: true}
	nvrtcLib  = libSpec{name: "NVRTC", sonames: []string{
		"libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so.11.2", "libnvrtc.so"}, required: true}
	blasLtLib = libSpec{name: "cuBLASLt", sonames: []string{
		"libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so.11", "libcublasLt.so"}, required: true}
)

// candidate is one place to try loading a library from. A path without a
// slash is handed to the system loader, which searches LD_LIBRARY_PATH, the
// ld.so cache and the default folders.
type candidate struct {
	path string
	via  string
}

// fsView is what discovery reads of the machine; tests replace it with fake
// folders.
type fsView struct {
	getenv func(string) string
	glob   func(string) ([]string, error)
	isFile func(string) bool
	home   string
	arch   string // GOARCH
}

func realFS() fsView {
	home, _ := userdir.Home()
	return fsView{
		getenv: os.Getenv,
		glob:   filepath.Glob,
		isFile: func(p string) bool {
			st, err := os.Stat(p)
			return err == nil && !st.IsDir()
		},
		home: home,
		arch: runtime.GOARCH,
	}
}

// majorOf returns the major version in a file name like libnvrtc.so.12 or
// libnvrtc.so.11.2, or -1 for an unversioned name.
func majorOf(soname string) int {
	_, ver, ok := strings.Cut(soname, ".so.")
	if !ok {
		return -1
	}
	major, _, _ := strings.Cut(ver, ".")
	n, err := strconv.Atoi(major)
	if err != nil {
		return -1
	}
	return n
}

// sonamesUpTo drops versions newer than maxMajor (the driver's CUDA major
// version): code built by a newer NVRTC or cuBLASLt needs a newer driver.
// maxMajor <= 0 keeps every name.
func sonamesUpTo(spec libSpec, maxMajor int) []string {
	var out []string
	for _, s := range spec.sonames {
		if m := majorOf(s); maxMajor > 0 && m > maxMajor {
			continue
		}
		out = append(out, s)
	}
	return out
}

// candidates lists, in order, every place to try for one library: the
// override folders, the system loader, CUDA's default folders, then the lib
// folders of pip-installed nvidia-* wheels. Only files that exist are
// listed, except the loader's bare names.
func candidates(fs fsView, sonames []string) []candidate {
	var out []candidate
	seen := map[string]bool{}
	add := func(dir, via string) {
		for _, s := range sonames {
			p := filepath.Join(dir, s)
			if seen[p] || !fs.isFile(p) {
				continue
			}
			seen[p] = true
			out = append(out, candidate{p, via})
		}
	}
	for _, dir := range filepath.SplitList(fs.getenv(LibsEnv)) {
		if dir != "" {
			add(dir, ViaOverride)
		}
	}
	for _, s := range sonames {
		out = append(out, candidate{s, ViaLoader})
	}
	for _, dir := range toolkitDirs(fs) {
		add(dir, ViaToolkit)
	}
	for _, dir := range wheelDirs(fs) {
		add(dir, ViaWheel)
	}
	return out
}

// toolkitDirs lists the folders where CUDA installs put libraries: the
// toolkit named by CUDA_HOME or CUDA_PATH, /usr/local/cuda and its
// versioned siblings (newest first), and the driver's usual homes.
func toolkitDirs(fs fsView) []string {
	target := "x86_64-linux"
	if fs.arch == "arm64" {
		target = "sbsa-linux"
	}
	var roots []string
	for _, v := range []string{"CUDA_HOME", "CUDA_PATH"} {
		if r := fs.getenv(v); r != "" {
			roots = append(roots, r)
		}
	}
	roots = append(roots, "/usr/local/cuda")
	versioned, _ := fs.glob("/usr/local/cuda-*")
	slices.SortFunc(versioned, func(a, b string) int { return compareVersions(b, a) })
	roots = append(roots, versioned...)
	roots = append(roots, "/opt/cuda")
	var dirs []string
	for _, r := range roots {
		dirs = append(dirs, filepath.Join(r, "lib64"), filepath.Join(r, "lib"),
			filepath.Join(r, "targets", target, "lib"))
	}
	libArch := "x86_64-linux-gnu"
	if fs.arch == "arm64" {
		libArch = "aarch64-linux-gnu"
	}
	return append(dirs,
		"/usr/local/nvidia/lib64", "/usr/local/nvidia/lib",
		"/usr/lib/"+libArch, "/usr/lib64", "/usr/lib/wsl/lib")
}

// compareVersions orders paths like /usr/local/cuda-12.10 and
// /usr/local/cuda-12.9 by their numeric suffixes.
func compareVersions(a, b string) int {
	va := strings.FieldsFunc(a, func(r rune) bool { return r < '0' || r > '9' })
	vb := strings.FieldsFunc(b, func(r rune) bool { return r < '0' || r > '9' })
	for i := 0; i < len(va) && i < len(vb); i++ {
		na, _ := strconv.Atoi(va[i])
		nb, _ := strconv.Atoi(vb[i])
		if na != nb {
			return na - nb
		}
	}
	return len(va) - len(vb)
}

// wheelDirs lists the lib folders of pip-installed nvidia-* wheels in every
// Python environment it can see: the active virtualenv or conda
// environment, each python on PATH (a venv's bin folder sits beside its
// lib folder), PYTHONPATH, the user's site and the system's. CUDA 12
// wheels use nvidia/<component>/lib, CUDA 13 wheels nvidia/cu13/lib; one
// glob covers both.
func wheelDirs(fs fsView) []string {
	var sites []string
	addPrefix := func(prefix string) {
		if prefix == "" {
			return
		}
		for _, pattern := range []string{"lib/python3*/site-packages", "lib/python3*/dist-packages", "lib/python3/dist-packages"} {
			m, _ := fs.glob(filepath.Join(prefix, pattern))
			sites = append(sites, m...)
		}
	}
	addPrefix(fs.getenv("VIRTUAL_ENV"))
	addPrefix(fs.getenv("CONDA_PREFIX"))
	for _, dir := range filepath.SplitList(fs.getenv("PATH")) {
		if dir == "" {
			continue
		}
		if fs.isFile(filepath.Join(dir, "python3")) || fs.isFile(filepath.Join(dir, "python")) {
			addPrefix(filepath.Dir(dir))
		}
	}
	for _, dir := range filepath.SplitList(fs.getenv("PYTHONPATH")) {
		if dir != "" {
			sites = append(sites, dir)
		}
	}
	if fs.home != "" {
		addPrefix(filepath.Join(fs.home, ".local"))
	}
	addPrefix("/usr/local")
	addPrefix("/usr")
	var dirs []string
	seen := map[string]bool{}
	for _, site := range sites {
		m, _ := fs.glob(filepath.Join(site, "nvidia", "*", "lib"))
		slices.Sort(m)
		// cu13 before cu12 and before per-component folders of older wheels.
		slices.SortStableFunc(m, func(a, b string) int {
			return compareVersions(filepath.Base(filepath.Dir(b)), filepath.Base(filepath.Dir(a)))
		})
		for _, d := range m {
			if !seen[d] {
				seen[d] = true
				dirs = append(dirs, d)
			}
		}
	}
	return dirs
}
