package stages

import (
	"context"
	"io/fs"
	"os"

	"gemmaft/dataset"
	"gemmaft/pipeline"
)

const questionsKindName = "mt_bench"

func init() { kinds[questionsKindName] = questionsKind{} }

// questionsKind reads MT-Bench question files (question_id, category,
// turns): multi-turn questions for a generate stage.
type questionsKind struct{}

type questionsParams struct {
	// Paths are files or glob patterns, relative to the spec's folder.
	Paths []string `json:"paths"`
	// Limit stops after this many questions; 0 reads them all.
	Limit int64 `json:"limit"`
}

func (questionsKind) Version() int       { return 1 }
func (questionsKind) Inputs() (int, int) { return 0, 0 }
func (questionsKind) Params() any        { return &questionsParams{} }

func (p *questionsParams) Validate() error {
	if len(p.Paths) == 0 {
		return &pipeline.ParamError{Param: "paths", Msg: "no question files",
			Fix: "list MT-Bench question files, e.g. paths: [../data/mt-bench-tr/question.jsonl]"}
	}
	if p.Limit < 0 {
		return &pipeline.ParamError{Param: "limit", Msg: "must not be negative", Fix: "0 reads every question"}
	}
	return nil
}

func (questionsKind) Prepare(params any, dir string) (pipeline.Runner, error) {
	p := params.(*questionsParams)
	files, err := dataset.ExpandGlobs(dir, p.Paths)
	if err != nil {
		return nil, &pipeline.ParamError{Param: "paths", Msg: err.Error(), Fix: "paths are relative to the spec's folder"}
	}
	for _, f := range files {
		if fi, err := os.Stat(f); err != nil || !fi.Mode().IsRegular() {
			return nil, &pipeline.ParamError{Param: "paths", Msg: f + " is not a readable file"}
		}
	}
	return &questionsStage{p: p, files: files}, nil
}

type questionsStage struct {
	p     *questionsParams
	files []string
}

func (s *questionsStage) Files() []string { return s.files }

func (s *questionsStage) Run(ctx context.Context, t *pipeline.Task) error {
	qs, err := dataset.ReadQuestions(s.files, s.p.Limit, func(path string) (fs.File, error) { return t.Open(path) })
	if err != nil {
		return err
	}
	rec := dataset.QuestionsRecord(qs, nil)
	defer rec.Release()
	out, err := t.Output(rec.Schema())
	if err != nil {
		return err
	}
	if err := out.Write(rec); err != nil {
		return err
	}
	turns := 0
	categories := map[string]int{}
	for _, q := range qs {
		turns += len(q.Turns)
		categories[q.Category]++
	}
	t.SetStat("questions", len(qs))
	t.SetStat("turns", turns)
	t.SetStat("categories", categories)
	t.SetStat("files", len(s.files))
	return nil
}
