package dataset

import (
	"embed"
	"io/fs"
)

// DemoPath is the name of the demo dataset in Demo's file system.
const DemoPath = "alpaca-tr-demo.jsonl"

//go:embed demo/alpaca-tr-demo.jsonl
var demoFiles embed.FS

// Demo returns a file system holding the demo dataset at DemoPath: Turkish
// Alpaca-style records (instruction, input, output) written for this
// project, so that the demo runs without downloading anything. Read it with
// SourceOptions{FS: Demo(), Paths: []string{DemoPath}}.
func Demo() fs.FS {
	sub, err := fs.Sub(demoFiles, "demo")
	if err != nil {
		panic(err) // the embedded directory is fixed at build time
	}
	return sub
}

// DemoJSONL returns a copy of the demo dataset's bytes, for hashing into
// cache keys.
func DemoJSONL() []byte {
	data, err := fs.ReadFile(Demo(), DemoPath)
	if err != nil {
		panic(err)
	}
	return data
}
