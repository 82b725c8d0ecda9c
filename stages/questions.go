package stages

import (
	"context"
	"io/fs"

	"gemmaft/dataset"
	"gemmaft/pipeline"
)

const questionsKindName = "mt_bench"

func init() { kinds[questionsKindName] = questionsKind{} }

// questionsKind reads MT-Bench question files (question_id, category,
// turns; JSON lines or Parquet): multi-turn questions for a generate stage.
type questionsKind struct{}

type questionsParams struct {
	// Paths are files or glob patterns, relative to the spec's folder, or
	// hf:// references to files of a dataset repository.
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
	// The paths are found as a source finds its files: globs, and hf://
	// references fetched at the commit the plan resolved; JSON or Parquet
	// (no format to check).
	r, err := sourceKind{}.Prepare(&sourceParams{Paths: p.Paths}, dir)
	if err != nil {
		return nil, err
	}
	return &questionsStage{p: p, src: r.(*sourceStage)}, nil
}

type questionsStage struct {
	p   *questionsParams
	src *sourceStage
}

func (s *questionsStage) Files() []string { return s.src.Files() }

func (s *questionsStage) Resolve(ctx context.Context) ([]pipeline.Ref, error) {
	return s.src.Resolve(ctx)
}

func (s *questionsStage) Run(ctx context.Context, t *pipeline.Task) error {
	files, err := s.src.files(ctx, t)
	if err != nil {
		return err
	}
	qs, err := dataset.ReadQuestions(files, s.p.Limit, func(path string) (fs.File, error) { return t.Open(path) })
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
	t.SetStat("files", len(files))
	return nil
}
