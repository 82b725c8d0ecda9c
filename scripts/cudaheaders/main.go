// Command cudaheaders writes the headers that the trainer's kernels get
// generated at load time (tables.cuh) into a folder, so that a standalone
// CUDA program can #include the kernels' headers and be built with nvcc on
// a machine without Go:
//
//	go run ./scripts/cudaheaders DIR
//	nvcc -I DIR -I cuda/kernels -I trainer/gpu/kernels -DHEAD_DIM=256 ...
package main

import (
	"fmt"
	"os"
	"path/filepath"

	"gemmaft/trainer/gpu/kernels"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: go run ./scripts/cudaheaders DIR")
		os.Exit(2)
	}
	dir := os.Args[1]
	if err := os.MkdirAll(dir, 0o755); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	if err := os.WriteFile(filepath.Join(dir, "tables.cuh"), []byte(kernels.TablesHeader()), 0o644); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
