// Package stages implements the stage kinds of the pipeline: each kind is a
// small file that wires a library package (dataset, chat, tokenizer, packer,
// trainer) into the engine's Kind and Runner interfaces.
package stages

import "gemmaft/pipeline"

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
