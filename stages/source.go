package stages

import (
	"context"
	"fmt"
	"io"
	"os"

	"gemmaft/dataset"
	"gemmaft/hub"
	"gemmaft/pipeline"
)

const (
	parquetKindName = "parquet"
	jsonlKindName   = "jsonl"
)

func init() {
	kinds[parquetKindName] = sourceKind{format: dataset.FormatParquet}
	kinds[jsonlKindName] = sourceKind{format: dataset.FormatJSONL}
}

// sourceKind reads Alpaca-style records (instruction, input, output and an
// optional system text) from Parquet or JSON-lines files.
type sourceKind struct{ format dataset.Format }

// sourceParams are the `with:` of a parquet or jsonl stage.
type sourceParams struct {
	// Paths are files or glob patterns, relative to the spec's folder, or
	// hf://datasets/ORG/NAME@REV/PATH references (PATH a file or a glob
	// over the repository's files).
	Paths []string `json:"paths"`
	// Columns maps instruction, input and output to the file's column names.
	Columns map[string]string `json:"columns,omitempty"`
	// SystemColumn names a column holding a system text per record.
	SystemColumn string `json:"system_column,omitempty"`
	// System is a system text for every record.
	System string `json:"system,omitempty"`
	// Limit stops after this many records; 0 reads them all.
	Limit int64 `json:"limit"`
	// Shuffle delivers the records in an order drawn from Seed, which
	// nothing else uses.
	Shuffle bool   `json:"shuffle"`
	Seed    uint64 `json:"seed"`
}

func (sourceKind) Version() int       { return 1 }
func (sourceKind) Inputs() (int, int) { return 0, 0 }
func (sourceKind) Params() any        { return &sourceParams{} }

func (p *sourceParams) Validate() error {
	if len(p.Paths) == 0 {
		return &pipeline.ParamError{Param: "paths", Msg: "no input files",
			Fix: "list files or glob patterns, e.g. paths: [data/train-*.parquet]"}
	}
	for ours, theirs := range p.Columns {
		switch ours {
		case dataset.ColInstruction, dataset.ColInput, dataset.ColOutput:
		default:
			return &pipeline.ParamError{Param: "columns", Msg: fmt.Sprintf("cannot map %q", ours),
				Fix: "map instruction, input and output, e.g. columns: {instruction: instruction-turkish}"}
		}
		// Mapping a column to its own name is the default; drop it so that
		// writing it does not change the cache key.
		if theirs == ours || theirs == "" {
			delete(p.Columns, ours)
		}
	}
	if len(p.Columns) == 0 {
		p.Columns = nil
	}
	if p.SystemColumn != "" && p.System != "" {
		return &pipeline.ParamError{Param: "system", Msg: "both system and system_column are set", Fix: "keep one of them"}
	}
	if p.Limit < 0 {
		return &pipeline.ParamError{Param: "limit", Msg: "must not be negative", Fix: "0 reads every record"}
	}
	if p.Seed != 0 && !p.Shuffle {
		return &pipeline.ParamError{Param: "seed", Msg: "orders the records only when they are shuffled, and shuffle is false",
			Fix: "add shuffle: true, or remove seed"}
	}
	return nil
}

func (k sourceKind) Prepare(params any, dir string) (pipeline.Runner, error) {
	p := params.(*sourceParams)
	s := &sourceStage{format: k.format, p: p}
	for _, path := range p.Paths {
		if hub.IsRef(path) {
			h, err := parseHub("paths", path, hubFiles)
			if err != nil {
				return nil, err
			}
			s.parts = append(s.parts, sourcePart{hub: h})
			continue
		}
		files, err := dataset.ExpandGlobs(dir, []string{path})
		if err != nil {
			return nil, &pipeline.ParamError{Param: "paths", Msg: err.Error(), Fix: "paths are relative to the spec's folder, or hf://datasets/ORG/NAME@REV/PATH"}
		}
		for _, f := range files {
			if fi, err := os.Stat(f); err != nil || !fi.Mode().IsRegular() {
				return nil, &pipeline.ParamError{Param: "paths", Msg: f + " is not a readable file"}
			}
		}
		s.parts = append(s.parts, sourcePart{files: files})
		s.local = append(s.local, files...)
	}
	return s, nil
}

// A sourcePart is what one entry of paths gives: local files, or the
// files of an hf:// reference.
type sourcePart struct {
	files []string
	hub   *hubInput
}

type sourceStage struct {
	format dataset.Format
	p      *sourceParams
	parts  []sourcePart
	local  []string // the local files, whose digests enter the key
}

func (s *sourceStage) Files() []string { return s.local }

func (s *sourceStage) Resolve(ctx context.Context) ([]pipeline.Ref, error) {
	var hs []*hubInput
	for _, p := range s.parts {
		hs = append(hs, p.hub)
	}
	return resolveAll(ctx, hs...)
}

// files fetches the hf:// parts and returns every file in the order of
// paths.
func (s *sourceStage) files(ctx context.Context, t *pipeline.Task) ([]string, error) {
	var out []string
	fetched := false
	for _, p := range s.parts {
		if p.hub == nil {
			out = append(out, p.files...)
			continue
		}
		files, err := p.hub.fetch(ctx, t)
		if err != nil {
			return nil, err
		}
		out = append(out, files...)
		fetched = true
	}
	if fetched {
		t.Report(0, 0, "", "") // back to counting rows
	}
	return out, nil
}

func (s *sourceStage) Run(ctx context.Context, t *pipeline.Task) error {
	files, err := s.files(ctx, t)
	if err != nil {
		return err
	}
	src, err := dataset.Open(dataset.SourceOptions{
		Paths: files, Format: s.format, Columns: s.p.Columns,
		SystemColumn: s.p.SystemColumn, SystemText: s.p.System,
		Limit: s.p.Limit, Shuffle: s.p.Shuffle, Seed: s.p.Seed,
	})
	if err != nil {
		return err
	}
	defer src.Close()
	if n, ok := src.Rows(); ok {
		t.SetTotal(n)
	}
	out, err := t.Output(src.Schema())
	if err != nil {
		return err
	}
	for {
		rec, err := src.Next(ctx)
		if err == io.EOF {
			break
		}
		if err != nil {
			return err
		}
		err = out.Write(rec)
		rec.Release()
		if err != nil {
			return err
		}
	}
	t.SetStat("records", out.Rows())
	t.SetStat("files", len(files))
	return nil
}
