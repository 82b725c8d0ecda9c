// Package stages implements the stage kinds of the pipeline: each kind is a
// small file that wires a library package (dataset, chat, tokenizer, packer,
// trainer) into the engine's Kind and Runner interfaces.
package stages

import (
	"fmt"

	"gemmaft/pipeline"
)

// Registry returns a registry holding every stage kind.
func Registry() *pipeline.Registry {
	r := pipeline.NewRegistry()
	for name, k := range kinds {
		r.Register(name, k)
	}
	return r
}

// kinds is filled by each kind's file.
var kinds = map[string]pipeline.Kind{}

// counted is n with the words for one or many: "1 answer is", "3 answers are".
func counted(n int64, one, many string) string {
	if n == 1 {
		return "1 " + one
	}
	return fmt.Sprintf("%d %s", n, many)
}
