package cuda

import (
	"embed"
	"fmt"
	"io/fs"
	"strings"
)

//go:embed kernels/*.cu kernels/*.cuh
var kernelFiles embed.FS

// commonHeader is kernels/common.cuh: bfloat16 conversions and block
// reductions that any program may #include "common.cuh" to use.
func commonHeader() string {
	b, err := kernelFiles.ReadFile("kernels/common.cuh")
	if err != nil {
		panic("cuda: embedded common.cuh missing: " + err.Error()) // a broken build, not bad input
	}
	return string(b)
}

// WithCommonHeader returns src with the package's common.cuh available to
// #include, so other packages' kernels share its helpers.
func WithCommonHeader(src Source) Source {
	h := map[string]string{"common.cuh": commonHeader()}
	for k, v := range src.Headers {
		h[k] = v
	}
	src.Headers = h
	return src
}

// BuiltinKernels lists the package's own kernel files, e.g. "elementwise.cu".
func BuiltinKernels() []string {
	names, _ := fs.Glob(kernelFiles, "kernels/*.cu")
	for i, n := range names {
		names[i] = strings.TrimPrefix(n, "kernels/")
	}
	return names
}

// BuiltinSource returns one of the package's kernel files ready to compile.
func BuiltinSource(name string) (Source, error) {
	b, err := kernelFiles.ReadFile("kernels/" + name)
	if err != nil {
		return Source{}, fmt.Errorf("cuda: no built-in kernel file %q (have %v)", name, BuiltinKernels())
	}
	return WithCommonHeader(Source{Name: name, Code: string(b)}), nil
}
