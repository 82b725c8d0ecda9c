package cuda

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// fakeMachine lays out files under a temporary root and returns an fsView
// whose environment points into it.
func fakeMachine(t *testing.T, files []string, env map[string]string) (fsView, string) {
	t.Helper()
	root := t.TempDir()
	for _, f := range files {
		p := filepath.Join(root, f)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte("not really a library"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	fs := realFS()
	fs.home = filepath.Join(root, "home")
	fs.getenv = func(k string) string { return strings.ReplaceAll(env[k], "$ROOT", root) }
	return fs, root
}

// under keeps the candidates inside root (the real machine's /usr/local
// may hold CUDA too) and makes them relative to it.
func under(cands []candidate, root string) []string {
	var out []string
	for _, c := range cands {
		if !strings.Contains(c.path, "/") {
			out = append(out, c.via+": "+c.path)
			continue
		}
		if rel, err := filepath.Rel(root, c.path); err == nil && !strings.HasPrefix(rel, "..") {
			out = append(out, c.via+": "+rel)
		}
	}
	return out
}

func TestCandidatesOrder(t *testing.T) {
	fs, root := fakeMachine(t, []string{
		"override/libnvrtc.so.12",
		"toolkit/lib64/libnvrtc.so.13",
		"venv/bin/python3",
		"venv/lib/python3.12/site-packages/nvidia/cu13/lib/libnvrtc.so.13",
		"venv/lib/python3.12/site-packages/nvidia/cuda_nvrtc/lib/libnvrtc.so.12",
		"home/.local/lib/python3.11/site-packages/nvidia/cuda_nvrtc/lib/libnvrtc.so.12",
		"venv/lib/python3.12/site-packages/nvidia/cublas/lib/libcublasLt.so.12",
	}, map[string]string{
		LibsEnv:     "$ROOT/override:$ROOT/missing",
		"CUDA_HOME": "$ROOT/toolkit",
		"PATH":      "/nonexistent:$ROOT/venv/bin",
	})
	got := under(candidates(fs, nvrtcLib.sonames), root)
	want := []string{
		ViaOverride + ": override/libnvrtc.so.12",
		ViaLoader + ": libnvrtc.so.13",
		ViaLoader + ": libnvrtc.so.12",
		ViaLoader + ": libnvrtc.so.11.2",
		ViaLoader + ": libnvrtc.so",
		ViaToolkit + ": toolkit/lib64/libnvrtc.so.13",
		ViaWheel + ": venv/lib/python3.12/site-packages/nvidia/cu13/lib/libnvrtc.so.13",
		ViaWheel + ": venv/lib/python3.12/site-packages/nvidia/cuda_nvrtc/lib/libnvrtc.so.12",
		ViaWheel + ": home/.local/lib/python3.11/site-packages/nvidia/cuda_nvrtc/lib/libnvrtc.so.12",
	}
	if !slices.Equal(got, want) {
		t.Errorf("candidates:\n got %q\nwant %q", got, want)
	}
}

func TestCandidatesVirtualEnvAndConda(t *testing.T) {
	fs, root := fakeMachine(t, []string{
		"conda/lib/python3.10/site-packages/nvidia/cublas/lib/libcublasLt.so.12",
		"venv/lib/python3.12/site-packages/nvidia/cu13/lib/libcublasLt.so.13",
		"pp/nvidia/cu13/lib/libcublasLt.so.13",
	}, map[string]string{
		"VIRTUAL_ENV":  "$ROOT/venv",
		"CONDA_PREFIX": "$ROOT/conda",
		"PYTHONPATH":   "$ROOT/pp",
	})
	got := under(candidates(fs, blasLtLib.sonames), root)
	var wheels []string
	for _, g := range got {
		if strings.HasPrefix(g, ViaWheel) {
			wheels = append(wheels, strings.TrimPrefix(g, ViaWheel+": "))
		}
	}
	want := []string{
		"venv/lib/python3.12/site-packages/nvidia/cu13/lib/libcublasLt.so.13",
		"conda/lib/python3.10/site-packages/nvidia/cublas/lib/libcublasLt.so.12",
		"pp/nvidia/cu13/lib/libcublasLt.so.13",
	}
	if !slices.Equal(wheels, want) {
		t.Errorf("wheel candidates:\n got %q\nwant %q", wheels, want)
	}
}

func TestSonamesUpToDriver(t *testing.T) {
	if got := sonamesUpTo(nvrtcLib, 12); !slices.Equal(got, []string{"libnvrtc.so.12", "libnvrtc.so.11.2", "libnvrtc.so"}) {
		t.Errorf("driver 12: %q", got)
	}
	if got := sonamesUpTo(blasLtLib, 0); len(got) != len(blasLtLib.sonames) {
		t.Errorf("unknown driver version should keep every name, got %q", got)
	}
	for name, want := range map[string]int{"libnvrtc.so.11.2": 11, "libcuda.so.1": 1, "libnvrtc.so": -1, "libx.so.abc": -1} {
		if got := majorOf(name); got != want {
			t.Errorf("majorOf(%q) = %d, want %d", name, got, want)
		}
	}
}

func TestCompareVersions(t *testing.T) {
	dirs := []string{"/usr/local/cuda-12.9", "/usr/local/cuda-12.10", "/usr/local/cuda-11.8", "/usr/local/cuda-13.0"}
	slices.SortFunc(dirs, func(a, b string) int { return compareVersions(b, a) })
	want := []string{"/usr/local/cuda-13.0", "/usr/local/cuda-12.10", "/usr/local/cuda-12.9", "/usr/local/cuda-11.8"}
	if !slices.Equal(dirs, want) {
		t.Errorf("got %q, want %q", dirs, want)
	}
}

// A file that exists but is not a loadable library is reported with the
// loader's reason, and the search goes on.
func TestLoadReportsBrokenFiles(t *testing.T) {
	if !dlSupported {
		t.Skip("no run-time loading on this OS")
	}
	fs, root := fakeMachine(t, []string{"override/libcublasLt.so.13"}, map[string]string{LibsEnv: "$ROOT/override"})
	var fn cfunc
	lib := load(blasLtLib, candidates(fs, []string{"libcublasLt.so.13"})[:1], []symbol{{fn: &fn, name: "cublasLtCreate"}}, nil)
	if lib.Found() || lib.Err == nil {
		t.Fatalf("a text file loaded as a library: %+v", lib)
	}
	if len(lib.Tried) != 1 || !strings.HasPrefix(lib.Tried[0], filepath.Join(root, "override", "libcublasLt.so.13")+": ") {
		t.Errorf("Tried = %q", lib.Tried)
	}
	if !strings.Contains(lib.Err.Error(), LibsEnv) {
		t.Errorf("the error should name the override variable: %v", lib.Err)
	}
}

// Without a GPU, Open must fail with ErrUnavailable (the CPU fallback
// signal), never crash; with one it must succeed.
func TestOpenWithoutGPUFallsBack(t *testing.T) {
	rep := Discover()
	if rep.Err == nil {
		t.Skip("this machine has a usable GPU")
	}
	d, err := Open(0)
	if err == nil {
		d.Close()
		t.Fatal("Open succeeded although Discover reported", rep.Err)
	}
	if !isUnavailable(err) {
		t.Errorf("Open error %v does not wrap ErrUnavailable", err)
	}
}

// A library that loads but fails the acceptance check (the driver stub) is
// skipped for the next candidate.
func TestLoadSkipsRejectedLibrary(t *testing.T) {
	if !dlSupported {
		t.Skip("no run-time loading on this OS")
	}
	libc := loadedPath("libc.so.6")
	if libc == "" {
		t.Skip("libc not found in the memory map")
	}
	var fn cfunc
	calls := 0
	lib := load(libSpec{name: "libc", sonames: []string{"libc.so.6"}},
		[]candidate{{libc, ViaToolkit}, {"libc.so.6", ViaLoader}},
		[]symbol{{fn: &fn, name: "strlen"}},
		func() error {
			calls++
			if calls == 1 {
				return errors.New("stub library")
			}
			return nil
		})
	if !lib.Found() || lib.Via != ViaLoader {
		t.Fatalf("second candidate not taken: %+v", lib)
	}
	if len(lib.Tried) != 1 || !strings.Contains(lib.Tried[0], "stub library") {
		t.Errorf("Tried = %q", lib.Tried)
	}
}
