package stages

import (
	"context"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"slices"
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
// optional system text), or conversations in ShareGPT's or OpenAI's
// layout, from Parquet or JSON-lines files.
type sourceKind struct{ format dataset.Format }

// sourceParams are the `with:` of a parquet or jsonl stage.
type sourceParams struct {
	// Paths are files or glob patterns, relative to the spec's folder, or
	// hf://datasets/ORG/NAME@REV/PATH references (PATH a file or a glob
	// over the repository's files).
	Paths []string `json:"paths"`
	// Format is what a record holds: alpaca (instruction, input, output;
	// the default, kept out of the key), sharegpt (a list "conversations"
	// of {"from", "value"}) or openai (a list "messages" of {"role",
	// "content"}).
	Format string `json:"format,omitempty"`
	// Columns maps instruction, input and output (or, for conversations,
	// the list and its role and content fields) to the file's names.
	Columns map[string]string `json:"columns,omitempty"`
	// Roles maps a conversation's role names to system, user or assistant;
	// human, gpt, system, user and assistant are known already.
	Roles map[string]string `json:"roles,omitempty"`
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
	// Invalid is what a conversation the chat template refuses (roles out
	// of turn, an unknown or null role, a part that is not text, nothing to
	// learn) does: error (the
	// default) stops the stage at the first; drop drops and counts them.
	Invalid string `json:"invalid,omitempty"`
}

func (sourceKind) Version() int       { return 1 }
func (sourceKind) Inputs() (int, int) { return 0, 0 }
func (sourceKind) Params() any        { return &sourceParams{} }

// Revision 1: a JSON record without the system_column field has no system
// text; it read as a null system, which nulls: drop dropped.
func (p *sourceParams) Revision() int {
	if p.SystemColumn != "" && p.Nulls == string(dataset.NullsDrop) {
		return 1
	}
	return 0
}

// keyNeutralRoles are the role mappings kept out of a source's key: those
// dataset.DefaultRoles held when keys were first made. A mapping it has
// since gained (model) stays in the key of the specs that write it, so
// that their entries keep their keys.
var keyNeutralRoles = map[string]string{
	"system": "system", "user": "user", "assistant": "assistant",
	"human": "user", "gpt": "assistant",
}

// checkColumns checks that columns maps only the layout's names.
func checkColumns(columns map[string]string, layout dataset.Layout) error {
	names := layout.ColumnNames()
	for ours := range columns {
		if !slices.Contains(names, ours) {
			return &pipeline.ParamError{Param: "columns", Msg: fmt.Sprintf("cannot map %q", ours),
				Fix: fmt.Sprintf("map %s, e.g. columns: {%s: %s-turkish}", strings.Join(names, ", "), names[0], names[0])}
		}
	}
	return nil
}

// canonicalColumns drops the columns mapped to their own name, the
// default, so that writing them does not change the cache key.
func canonicalColumns(columns map[string]string) map[string]string {
	for ours, theirs := range columns {
		if theirs == ours || theirs == "" {
			delete(columns, ours)
		}
	}
	if len(columns) == 0 {
		return nil
	}
	return columns
}

func (p *sourceParams) Validate() error {
	if len(p.Paths) == 0 {
		return &pipeline.ParamError{Param: "paths", Msg: "no input files",
			Fix: "list files or glob patterns, e.g. paths: [data/train-*.parquet]"}
	}
	layout, err := dataset.ParseLayout(p.Format)
	if err != nil || layout == dataset.LayoutText {
		fix := "use alpaca (instruction, input, output), sharegpt (conversations of from/value) or openai (messages of role/content)"
		if layout == dataset.LayoutText {
			fix = "plain texts are read by a stage of kind text"
		}
		return &pipeline.ParamError{Param: "format", Msg: fmt.Sprintf("unknown format %q", p.Format), Fix: fix}
	}
	p.Format = string(layout) // alpaca is the default, kept out of the key
	if err := checkColumns(p.Columns, layout); err != nil {
		return err
	}
	p.Columns = canonicalColumns(p.Columns)
	if len(p.Roles) > 0 && !layout.Conversational() {
		return &pipeline.ParamError{Param: "roles", Msg: "roles are mapped only in conversations",
			Fix: "add format: sharegpt or format: openai, or remove roles"}
	}
	for theirs, ours := range p.Roles {
		switch ours {
		case "system", "user", "assistant":
		default:
			return &pipeline.ParamError{Param: "roles", Msg: fmt.Sprintf("%s maps to %q", theirs, ours),
				Fix: "map each of the file's role names to system, user or assistant, e.g. roles: {insan: user, asistan: assistant}"}
		}
		// A role known already changes nothing; keep it out of the key.
		if keyNeutralRoles[theirs] == ours {
			delete(p.Roles, theirs)
		}
	}
	if len(p.Roles) == 0 {
		p.Roles = nil
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
	switch p.Invalid {
	case "error":
		p.Invalid = "" // the default: writing it leaves the key as it was
	case "":
	case "drop":
		if !layout.Conversational() {
			return &pipeline.ParamError{Param: "invalid", Msg: "drops conversations, and this source reads Alpaca records",
				Fix: "add format: sharegpt or format: openai, or remove invalid"}
		}
	default:
		return &pipeline.ParamError{Param: "invalid", Msg: fmt.Sprintf("unknown policy %q", p.Invalid),
			Fix: "use error (stop at the first conversation the template refuses) or drop (drop and count them)"}
	}
	if p.Seed != 0 && !p.Shuffle {
		return &pipeline.ParamError{Param: "seed", Msg: "orders the records only when they are shuffled, and shuffle is false",
			Fix: "add shuffle: true, or remove seed"}
	}
	return nil
}

func (k sourceKind) Prepare(params any, dir string) (pipeline.Runner, error) {
	p := params.(*sourceParams)
	return prepareSource(dir, p.Paths, dataset.SourceOptions{
		Format: k.format, Layout: dataset.Layout(p.Format), Columns: p.Columns, Roles: p.Roles,
		SystemColumn: p.SystemColumn, SystemText: p.System,
		Limit: p.Limit, Shuffle: p.Shuffle, Seed: p.Seed,
		Nulls: dataset.NullPolicy(p.Nulls), DropInvalid: p.Invalid == "drop",
	})
}

// prepareSource finds the files of paths (local ones now; those on the Hub
// are resolved by the plan) for a stage that reads them with opts.
func prepareSource(dir string, paths []string, opts dataset.SourceOptions) (*sourceStage, error) {
	s := &sourceStage{opts: opts}
	seen := fileSet{param: "paths"}
	for i, path := range paths {
		if strings.TrimSpace(path) == "" { // paths: [""], or [null]: the spec's folder would be read as a file
			return nil, &pipeline.ParamError{Param: "paths", Msg: fmt.Sprintf("entry %d is empty", i+1), Fix: "list data files or globs; remove the empty entry"}
		}
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
					Fix: "list data files (.parquet, .jsonl, .jsonl.gz; .txt for a text stage), or globs that match only files"}
			}
			if err := checkFormat(f, opts.Format); err != nil {
				return nil, err
			}
			if err := seen.add(f); err != nil {
				return nil, err
			}
			s.local = append(s.local, f)
		}
		s.parts = append(s.parts, sourcePart{files: files})
	}
	return s, nil
}

// fileSet gathers the local files of a parameter listing paths, refusing
// a file listed twice: almost always two patterns that overlap (a glob and
// a name, or a link), and its records would be read twice.
type fileSet struct {
	param string // the parameter, where its errors are placed
	what  string // what the paths are within it ("dev: "), for messages
	files []string
	infos []os.FileInfo
}

func (fs *fileSet) add(f string) error {
	fi, err := os.Stat(f)
	if err != nil {
		return &pipeline.ParamError{Param: fs.param, Msg: err.Error()}
	}
	for j, prev := range fs.infos {
		if os.SameFile(prev, fi) {
			also := ""
			if fs.files[j] != f { // a link, or another spelling of the path
				also = " (also as " + fs.files[j] + ")"
			}
			return &pipeline.ParamError{Param: fs.param, Msg: fmt.Sprintf("%s%s is listed twice%s: its records would be read twice", fs.what, f, also),
				Fix: "list each file once; check for a glob that also matches a file named on its own"}
		}
	}
	fs.files, fs.infos = append(fs.files, f), append(fs.infos, fi)
	return nil
}

// checkFormat refuses a file whose first bytes show another format than the
// one its stage reads (a Parquet file in a jsonl stage, JSON in a parquet
// one), which would otherwise fail the run as a corrupt file.
func checkFormat(path string, want dataset.Format) error {
	if _, err := dataset.FormatOf(path, want); err != nil {
		return &pipeline.ParamError{Param: "paths", Msg: strings.TrimPrefix(err.Error(), "dataset: "),
			Fix: "rename the file for what it holds, or list only data files"}
	}
	got, err := dataset.SniffFormat(nil, path)
	if err != nil {
		return &pipeline.ParamError{Param: "paths", Msg: err.Error()}
	}
	switch {
	case want == dataset.FormatParquet && got == dataset.FormatJSONL:
		return &pipeline.ParamError{Param: "paths", Msg: path + " holds JSON, not Parquet", Fix: "read it with kind: " + jsonlKindName}
	case want == dataset.FormatJSONL && got == dataset.FormatParquet:
		return &pipeline.ParamError{Param: "paths", Msg: path + " is a Parquet file, not JSON lines", Fix: "read it with kind: " + parquetKindName}
	}
	return nil
}

// A sourcePart is what one entry of paths gives: local files, or the
// files of an hf:// reference.
type sourcePart struct {
	files []string
	hub   *hubInput
}

type sourceStage struct {
	opts  dataset.SourceOptions // all but the paths and how files open
	parts []sourcePart
	local []string // the local files, whose digests enter the key
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
	opts := s.opts
	opts.Paths = files
	opts.Open = func(path string) (fs.File, error) { return t.Open(path) }
	opts.SpillDir = t.Dir // the cache's disk; the spill is unlinked at once
	src, err := dataset.Open(opts)
	if err != nil {
		return err
	}
	defer src.Close()
	unreadInput := src.UnreadInput()
	for _, file := range slices.Sorted(maps.Keys(unreadInput)) {
		col := unreadInput[file]
		t.Log.Warn(fmt.Sprintf("%s has no input field, and its %q looks like one: it is not read", file, col),
			"fix", fmt.Sprintf("columns: {input: %s} reads it as the input", col))
		t.SetStat("unread_input", col)
	}
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
	if n := src.Unweighted(); n > 0 {
		t.Log.Warn(fmt.Sprintf("%s marked weight: 0, which is not read here: those model turns train as the others do", counted(n, "message is", "messages are")),
			"fix", "remove the turns that should not train from the data, or end the conversations before them")
		t.SetStat("unread_weights", n)
	}
	if n := src.ToolCalls(); n > 0 {
		t.Log.Warn(fmt.Sprintf("%s OpenAI tool_calls, which are not read here: those turns train on their content alone", counted(n, "message carries", "messages carry")),
			"fix", "leave conversations with tool calls out of the data, or write the calls into the content")
		t.SetStat("unread_tool_calls", n)
	}
	// Known once every record is read: JSON lines may carry a system
	// text in later records only. A text source reads its one column and
	// makes no conversations: the file's other columns are not its.
	if unread := src.UnreadSystem(); len(unread) > 0 && s.opts.Layout != dataset.LayoutText {
		fix := "system_column: system reads each record's own"
		if s.opts.SystemText != "" {
			fix += " (in place of system:)"
		}
		t.Log.Warn(fmt.Sprintf("the records of %s have a system text that this source leaves out of their conversations", strings.Join(unread, ", ")), "fix", fix)
		t.SetStat("unread_system", len(unread))
	}
	nulls := src.Nulls()
	reportNulls(t, nulls, s.opts.Layout, string(s.opts.Nulls))
	if nulls.Dropped > 0 && out.Rows() == 0 {
		// As an empty file fails here, not at the stage that needs a row.
		return fmt.Errorf("every record had a null and was dropped (%d, nulls: drop); the first: %s", nulls.Dropped, firstNull(nulls))
	}
	if inv := src.Invalid(); inv.Dropped > 0 {
		t.SetStat("invalid_dropped", inv.Dropped)
		if out.Rows() == 0 {
			return fmt.Errorf("every conversation was invalid (%d); the first: %s", inv.Dropped, inv.First[0])
		}
		t.Log.Warn(fmt.Sprintf("dropped %s the chat template refuses; the first: %s", counted(inv.Dropped, "conversation", "conversations"), strings.Join(inv.First, "; ")))
	}
	return nil
}

// firstNull says where the first null of a report's first column was.
func firstNull(rep dataset.NullReport) string {
	cols := slices.Sorted(maps.Keys(rep.First))
	if len(cols) == 0 {
		return "not recorded"
	}
	return fmt.Sprintf("%s in column %s", rep.First[cols[0]], cols[0])
}

// reportNulls puts the nulls a source met into the stage's statistics and
// the log, so that no null silently becomes an empty answer.
func reportNulls(t *pipeline.Task, rep dataset.NullReport, layout dataset.Layout, policy string) {
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
	alpaca := layout == dataset.LayoutAlpaca
	switch {
	case policy == string(dataset.NullsDrop) && alpaca:
		t.SetStat("null_rows_dropped", rep.Dropped)
		t.Log.Warn(fmt.Sprintf("dropped %d rows with a null instruction, output or system; nulls by column: %s (a null input reads as \"\")",
			rep.Dropped, strings.Join(parts, ", ")))
	case policy == string(dataset.NullsDrop):
		t.SetStat("null_rows_dropped", rep.Dropped)
		t.Log.Warn(fmt.Sprintf("dropped %d rows with a null value; nulls by column: %s", rep.Dropped, strings.Join(parts, ", ")))
	default:
		msg := "null values read as empty text: " + strings.Join(parts, ", ")
		if alpaca && len(cols) == 1 && cols[0] == dataset.ColInput {
			t.Log.Info(msg) // a null input is an empty one in Alpaca data
			return
		}
		fix := "set nulls: drop in the stage's with: to drop rows with a null instruction or output, or nulls: error to stop"
		if !alpaca {
			fix = "set nulls: drop in the stage's with: to drop rows with a null value, or nulls: error to stop"
		}
		t.Log.Warn(msg, "fix", fix)
	}
}
