package cuda

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestCacheKeyCoversEveryInput(t *testing.T) {
	base := Source{Name: "k.cu", Code: "extern \"C\" __global__ void k() {}", Headers: map[string]string{"a.cuh": "int a;"}}
	opts := []string{"--gpu-architecture=sm_90"}
	tgt := target{arch: "sm_90", cubin: true}
	k0 := cacheKey(base, opts, "13.0", tgt)
	if k0 != cacheKey(base, []string{"--gpu-architecture=sm_90"}, "13.0", tgt) {
		t.Fatal("the key is not deterministic")
	}
	changed := map[string][32]byte{
		"code":         cacheKey(Source{Name: base.Name, Code: base.Code + " ", Headers: base.Headers}, opts, "13.0", tgt),
		"name":         cacheKey(Source{Name: "j.cu", Code: base.Code, Headers: base.Headers}, opts, "13.0", tgt),
		"header":       cacheKey(Source{Name: base.Name, Code: base.Code, Headers: map[string]string{"a.cuh": "int b;"}}, opts, "13.0", tgt),
		"header name":  cacheKey(Source{Name: base.Name, Code: base.Code, Headers: map[string]string{"b.cuh": "int a;"}}, opts, "13.0", tgt),
		"option":       cacheKey(base, append(opts, "-DX=1"), "13.0", tgt),
		"nvrtc":        cacheKey(base, opts, "13.1", tgt),
		"architecture": cacheKey(base, opts, "13.0", target{arch: "sm_100", cubin: true}),
		// Length prefixes keep "ab"+"c" and "a"+"bc" apart.
		"field split": cacheKey(Source{Name: base.Name + base.Code[:1], Code: base.Code[1:], Headers: base.Headers}, opts, "13.0", tgt),
	}
	for what, k := range changed {
		if k == k0 {
			t.Errorf("changing the %s leaves the key unchanged", what)
		}
	}
}

func TestChooseTarget(t *testing.T) {
	got, err := chooseTarget(9, 0, []int{75, 80, 86, 89, 90, 100})
	if err != nil || got != (target{arch: "sm_90", cubin: true}) {
		t.Errorf("H100 with a current NVRTC: %+v, %v", got, err)
	}
	got, err = chooseTarget(12, 0, []int{75, 80, 90, 100})
	if err != nil || got != (target{arch: "compute_100"}) {
		t.Errorf("a device newer than NVRTC should get PTX: %+v, %v", got, err)
	}
	if _, err := chooseTarget(5, 0, []int{75, 80}); err == nil {
		t.Error("a device older than every NVRTC target should be an error")
	}
}

func TestCompilerStoreIsAtomic(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "kernels")
	comp, err := NewCompiler(dir)
	if err != nil {
		t.Fatal(err)
	}
	tgt := target{arch: "sm_90", cubin: true}
	path := comp.cachePath(cacheKey(Source{Code: "x"}, nil, "13.0", tgt), tgt)
	if !strings.HasSuffix(path, ".cubin") || filepath.Dir(path) != dir {
		t.Fatalf("cache path %s", path)
	}
	if err := comp.store(path, []byte("image")); err != nil {
		t.Fatal(err)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Errorf("temporary files left behind: %v", entries)
	}
	if b, _ := os.ReadFile(path); string(b) != "image" {
		t.Errorf("stored %q", b)
	}
}

func TestDefaultKernelCacheDirOverride(t *testing.T) {
	t.Setenv(KernelCacheEnv, "/tmp/somewhere")
	if d, err := DefaultKernelCacheDir(); err != nil || d != "/tmp/somewhere" {
		t.Errorf("got %q, %v", d, err)
	}
}

func TestBuiltinKernelsEmbedded(t *testing.T) {
	for _, name := range []string{"elementwise.cu", "reduce.cu"} {
		src, err := BuiltinSource(name)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(src.Code, `#include "common.cuh"`) || src.Headers["common.cuh"] == "" {
			t.Errorf("%s: common.cuh not attached", name)
		}
	}
	if _, err := BuiltinSource("nope.cu"); err == nil {
		t.Error("a missing kernel file should be an error")
	}
}
