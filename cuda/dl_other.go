//go:build !linux

package cuda

import "errors"

const dlSupported = false

var errNoDL = errors.New("loading CUDA at run time is implemented for Linux only")

func dlopen(string) (uintptr, error) { return 0, errNoDL }
func dlclose(uintptr)                {}
func dlsym(uintptr, string) uintptr  { return 0 }
func loadedPath(string) string       { return "" }
