//go:build linux

package cuda

import (
	"bufio"
	"os"
	"path/filepath"
	"strings"

	"github.com/ebitengine/purego"
)

const dlSupported = true

func dlopen(path string) (uintptr, error) {
	return purego.Dlopen(path, purego.RTLD_NOW|purego.RTLD_GLOBAL)
}

func dlclose(h uintptr) { _ = purego.Dlclose(h) }

// dlsym returns 0 when the symbol is missing.
func dlsym(h uintptr, name string) uintptr {
	p, err := purego.Dlsym(h, name)
	if err != nil {
		return 0
	}
	return p
}

// loadedPath finds the file a library opened by bare name came from, by
// reading this process's memory map: the loader knows, but dlinfo is not
// reachable without cgo.
func loadedPath(soname string) string {
	prefix, _, _ := strings.Cut(soname, ".so")
	prefix += ".so"
	f, err := os.Open("/proc/self/maps")
	if err != nil {
		return ""
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 6 {
			continue
		}
		p := fields[len(fields)-1]
		if strings.HasPrefix(filepath.Base(p), prefix) {
			return p
		}
	}
	return ""
}
