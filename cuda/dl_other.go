//go:build !linux

package cuda

const dlSupported = false

func dlopen(string) (uintptr, error) { return 0, errNoDLSupport }
func dlclose(uintptr)                {}
func dlsym(uintptr, string) uintptr  { return 0 }
func loadedPath(string) string       { return "" }
