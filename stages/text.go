package stages

import (
	"fmt"

	"gemmaft/dataset"
	"gemmaft/pipeline"
)

const textKindName = "text"

func init() { kinds[textKindName] = textKind{} }

// textKind reads plain texts for continued pretraining: whole text files
// (.txt, .text, .md, optionally .gz), or a text column of JSON lines or
// Parquet. A tokenize stage reading it trains on every token, with no
// chat template.
type textKind struct{}

type textParams struct {
	// Paths are files or glob patterns, relative to the spec's folder, or
	// hf://datasets/ORG/NAME@REV/PATH references.
	Paths []string `json:"paths"`
	// Column is the text column of JSON lines and Parquet files; a text
	// file is one text.
	Column string `json:"column"`
	// Limit stops after this many texts; 0 reads them all.
	Limit int64 `json:"limit"`
	// Shuffle delivers the texts in an order drawn from Seed.
	Shuffle bool   `json:"shuffle"`
	Seed    uint64 `json:"seed"`
	// Nulls is what a null text becomes: empty (the default; an empty
	// text is left out by the tokenize stage), drop, or error.
	Nulls string `json:"nulls,omitempty"`
}

func (textKind) Version() int       { return 2 } // 2: a text file's CRLF and CR read as "\n"
func (textKind) Inputs() (int, int) { return 0, 0 }
func (textKind) Params() any        { return &textParams{Column: dataset.ColText} }

func (p *textParams) Validate() error {
	if len(p.Paths) == 0 {
		return &pipeline.ParamError{Param: "paths", Msg: "no input files",
			Fix: "list text files or glob patterns, e.g. paths: [corpus/*.txt], or JSON lines or Parquet with a text column"}
	}
	if p.Column == "" {
		return &pipeline.ParamError{Param: "column", Msg: "is empty", Fix: "name the text column of the JSON lines or Parquet files (text by default)"}
	}
	if p.Limit < 0 {
		return &pipeline.ParamError{Param: "limit", Msg: "must not be negative", Fix: "0 reads every text"}
	}
	switch p.Nulls {
	case "empty":
		p.Nulls = ""
	case "", string(dataset.NullsDrop), string(dataset.NullsError):
	default:
		return &pipeline.ParamError{Param: "nulls", Msg: fmt.Sprintf("unknown policy %q", p.Nulls),
			Fix: "use empty (a null reads as \"\"), drop (the row) or error"}
	}
	if p.Seed != 0 && !p.Shuffle {
		return &pipeline.ParamError{Param: "seed", Msg: "orders the texts only when they are shuffled, and shuffle is false",
			Fix: "add shuffle: true, or remove seed"}
	}
	return nil
}

func (textKind) Prepare(params any, dir string) (pipeline.Runner, error) {
	p := params.(*textParams)
	var columns map[string]string
	if p.Column != dataset.ColText {
		columns = map[string]string{dataset.ColText: p.Column}
	}
	return prepareSource(dir, p.Paths, dataset.SourceOptions{
		Layout: dataset.LayoutText, Columns: columns,
		Limit: p.Limit, Shuffle: p.Shuffle, Seed: p.Seed, Nulls: dataset.NullPolicy(p.Nulls),
	})
}
