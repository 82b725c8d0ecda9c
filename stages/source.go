package stages

import (
	"context"
	"fmt"
	"io"
	"io/fs"
	"os"
	"sort"
	"strings"

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
	// Nulls is what a null value becomes: empty (the default: ""), drop
	// (the row, when the null is in instruction, output or system; a null
	// input is Alpaca's "no input"), or error. Nulls are counted and
	// reported either way.
	Nulls string `json:"nulls,omitempty"`
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
	switch p.Nulls {
	case "empty":
		p.Nulls = "" // the default: writing it leaves the key as it was
	case "", string(dataset.NullsDrop), string(dataset.NullsError):
	default:
		return &pipeline.ParamError{Param: "nulls", Msg: fmt.Sprintf("unknown policy %q", p.Nulls),
			Fix: "use empty (a null reads as \"\"), drop (the row) or error"}
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
	var seen []os.FileInfo
	for _, path := range p.Paths {
		if hub.IsRef(path) {
			h, err := parseHub("paths", path, hubFiles)
			if err != nil {
				return nil, err
			}
			s.parts = append(s.parts, sourcePart{hub: h})
			continue
		}
		pattern, err := pipeline.ExpandHome(path)
		if err != nil {
			return nil, &pipeline.ParamError{Param: "paths", Msg: err.Error(), Fix: "write the path in full"}
		}
		files, err := dataset.ExpandGlobs(dir, []string{pattern})
		if err != nil {
			return nil, &pipeline.ParamError{Param: "paths", Msg: err.Error(), Fix: "paths are relative to the spec's folder, or hf://datasets/ORG/NAME@REV/PATH"}
		}
		for _, f := range files {
			if err := pipeline.CheckReadableFile(f); err != nil {
				return nil, &pipeline.ParamError{Param: "paths", Msg: err.Error(),
					Fix: "list data files (.parquet, .jsonl, .jsonl.gz), or globs that match only files"}
			}
			fi, err := os.Stat(f)
			if err != nil {
				return nil, &pipeline.ParamError{Param: "paths", Msg: err.Error()}
			}
			// Reading a file twice would repeat its records: almost always
			// two patterns that overlap (a glob and a name, or a link).
			for j, prev := range seen {
				if os.SameFile(prev, fi) {
					return nil, &pipeline.ParamError{Param: "paths", Msg: fmt.Sprintf("%s is listed twice (also as %s): its records would be read twice", f, s.local[j]),
						Fix: "list each file once; check for a glob that also matches a file named on its own"}
				}
			}
			seen = append(seen, fi)
			s.local = append(s.local, f)
		}
		s.parts = append(s.parts, sourcePart{files: files})
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
		Open:  func(path string) (fs.File, error) { return t.Open(path) },
		Nulls: dataset.NullPolicy(s.p.Nulls),
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
	reportNulls(t, src.Nulls(), s.p.Nulls)
	return nil
}

// reportNulls puts the nulls a source met into the stage's statistics and
// the log, so that no null silently becomes an empty answer.
func reportNulls(t *pipeline.Task, rep dataset.NullReport, policy string) {
	if len(rep.Columns) == 0 {
		return
	}
	t.SetStat("null_values", rep.Columns)
	cols := make([]string, 0, len(rep.Columns))
	for c := range rep.Columns {
		cols = append(cols, c)
	}
	sort.Strings(cols)
	var parts []string
	for _, c := range cols {
		parts = append(parts, fmt.Sprintf("%s %d (first: %s)", c, rep.Columns[c], rep.First[c]))
	}
	switch policy {
	case string(dataset.NullsDrop):
		t.SetStat("null_rows_dropped", rep.Dropped)
		t.Log.Warn(fmt.Sprintf("dropped %d rows with a null instruction, output or system; nulls by column: %s (a null input reads as \"\")",
			rep.Dropped, strings.Join(parts, ", ")))
	default:
		msg := "null values read as empty text: " + strings.Join(parts, ", ")
		if len(cols) == 1 && cols[0] == dataset.ColInput {
			t.Log.Info(msg) // a null input is an empty one in Alpaca data
			return
		}
		t.Log.Warn(msg, "fix", "set nulls: drop in the stage's with: to drop rows with a null instruction or output, or nulls: error to stop")
	}
}
