package stages

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"

	"gemmaft/dataset"
	"gemmaft/eval"
	"gemmaft/hub"
	"gemmaft/internal/atomicfile"
	"gemmaft/packer"
	"gemmaft/pipeline"
	"gemmaft/tokenizer"
	"gemmaft/trainer"
)

const evalKindName = "eval"

func init() { kinds[evalKindName] = evalKind{} }

// Files of an eval stage's entry.
const (
	// EvalResultsFile holds the scores of the base model and the adapter.
	EvalResultsFile = "results.json"
	// EvalItemsFile holds each multiple-choice question's per-choice
	// log-likelihoods under each model, one JSON object a line.
	EvalItemsFile = "items.jsonl"
)

// Eval tasks.
const (
	taskLoss           = "loss"
	taskMultipleChoice = "multiple_choice"
)

// evalKind scores a qlora stage's adapter beside its base model: the mean
// token loss of held-out records (sources among the needs) and multiple-
// choice questions by log-likelihood (the `multiple_choice` set), in the
// same stage, side by side.
type evalKind struct{}

type evalParams struct {
	// Tasks are loss and/or multiple_choice.
	Tasks []string `json:"tasks"`
	// Model is the base checkpoint folder, when neither a model stage among
	// the needs nor the adapter's training names it.
	Model string `json:"model,omitempty"`
	// OtherBase applies the adapter to the base that `model:` or a model
	// stage among the needs names even where it is not the checkpoint the
	// adapter was trained on (an adapter trained on -pt, scored on -it);
	// the shapes must still fit. Left out of the key when unset.
	OtherBase bool `yaml:"other_base" json:"other_base,omitempty"`
	// Tokenizer is a tokenizer.json, when the adapter's lineage has no
	// tokenize stage (the one training used is the default).
	Tokenizer string `json:"tokenizer,omitempty"`
	// MultipleChoice is the question set of the multiple_choice task.
	MultipleChoice *mcParams `yaml:"multiple_choice" json:"multiple_choice,omitempty"`
	// BatchTokens is about how many tokens one forward pass takes; the
	// scores do not depend on it.
	BatchTokens int `yaml:"batch_tokens" json:"-"`
	// Backend scores on the CPU reference (cpu, the default: float32) or
	// on the GPU (cuda, in bf16 as the training ran; auto: the GPU when
	// one is usable). Validate resolves auto, and cpu is keyed as before.
	Backend string `json:"backend,omitempty"`
}

// mcParams are the `multiple_choice:` of an eval stage.
type mcParams struct {
	// Paths are the questions' JSONL or Parquet files (globs allowed).
	Paths []string `json:"paths"`
	// Dev are the files of the dev split the shots come from.
	Dev []string `json:"dev,omitempty"`
	// Shots is how many solved dev questions of the same subject precede
	// each question.
	Shots int `json:"shots"`
	// Columns maps question, choices (or A, B, C, …), answer and subject to
	// the files' column names.
	Columns map[string]string `json:"columns,omitempty"`
	// Limit scores the first questions only; 0 scores them all.
	Limit int `json:"limit"`
	// Prompt is the prompt layout: mmlu (lm-evaluation-harness's MMLU
	// tasks) or turkishmmlu (its TurkishMMLU task: "Soru: … Cevap:").
	Prompt string `json:"prompt"`
}

// Synonyms and ParamNotes map lm-evaluation-harness's names for the
// multiple-choice settings.
func (evalKind) Synonyms() map[string]string {
	return map[string]string{
		"multiple_choice.num_fewshot": "shots", "multiple_choice.n_shot": "shots",
		"multiple_choice.dev_split": "dev", "multiple_choice.doc_to_choice": "columns",
	}
}

func (evalKind) ParamNotes() map[string]string {
	inMC := func(p string) string { return "it is a setting of the question set: multiple_choice: {" + p + ": N}" }
	return map[string]string{
		"num_fewshot": inMC("shots"),
		"shots":       inMC("shots"),
		"limit":       inMC("limit"),
		"batch_size":  "batch_tokens is about how many tokens one forward pass takes (the scores do not depend on it)",
	}
}

func (evalKind) Version() int       { return 4 } // 2: scores as TensorBoard events in tb/; 3: a gap among the A, B, … columns is an error, no longer the end of the choices; 4: a question is never its own shot; questions without a subject beside ones with have their own row
func (evalKind) Inputs() (int, int) { return 1, -1 }
func (evalKind) Params() any        { return &evalParams{BatchTokens: 4096} }

// The multiple_choice block's defaults, filled in by Validate (the block
// is a pointer, absent when the task is not listed).
func (mc *mcParams) defaults() {
	if mc.Prompt == "" {
		mc.Prompt = eval.FormatMMLU.Name
	}
}

func (p *evalParams) Validate() error {
	bad := func(param, msg, fix string) error { return &pipeline.ParamError{Param: param, Msg: msg, Fix: fix} }
	if len(p.Tasks) == 0 {
		return bad("tasks", "no tasks", "list loss (held-out records among the needs) and/or multiple_choice")
	}
	seen := map[string]bool{}
	for _, task := range p.Tasks {
		switch task {
		case taskLoss, taskMultipleChoice:
		default:
			fix := "use loss and/or multiple_choice"
			if strings.Contains(strings.ToLower(task), "mmlu") {
				fix = "an MMLU-style set is the multiple_choice task: tasks: [multiple_choice] with multiple_choice: {paths: [...], prompt: mmlu or turkishmmlu}"
			}
			return bad("tasks", fmt.Sprintf("unknown task %q", task), fix)
		}
		if seen[task] {
			return bad("tasks", fmt.Sprintf("%s is listed twice", task), "")
		}
		seen[task] = true
	}
	// One order for the key, whatever order the spec lists them in.
	sort.Strings(p.Tasks)
	if err := resolveDevice(&p.Backend); err != nil {
		return bad("backend", err.Error(), "use cpu, cuda, or auto (the GPU when one is usable)")
	}
	if p.BatchTokens < 1 {
		return bad("batch_tokens", "must be at least 1", "4096 suits the CPU")
	}
	mc := p.MultipleChoice
	switch {
	case seen[taskMultipleChoice] && mc == nil:
		return bad("tasks", "multiple_choice needs its question set", "add multiple_choice: {paths: [questions.jsonl]}")
	case !seen[taskMultipleChoice] && mc != nil:
		return bad("multiple_choice", "is given but the task is not listed", "add multiple_choice to tasks")
	case mc == nil:
		return nil
	}
	mc.defaults()
	if _, err := eval.ParseFormat(mc.Prompt); err != nil {
		return bad("multiple_choice", err.Error(), "mmlu is lm-evaluation-harness's MMLU prompt, turkishmmlu its TurkishMMLU one")
	}
	switch {
	case len(mc.Paths) == 0:
		return bad("multiple_choice", "no question files (paths)", "list JSONL or Parquet files, e.g. paths: [../data/tr-mmlu/*.parquet]")
	case mc.Shots < 0:
		return bad("multiple_choice", fmt.Sprintf("shots %d is negative", mc.Shots), "0 asks each question alone")
	case mc.Shots > 0 && len(mc.Dev) == 0:
		return bad("multiple_choice", fmt.Sprintf("%d-shot needs a dev split to take the shots from", mc.Shots), "add dev: [dev.jsonl], or shots: 0")
	case mc.Shots == 0 && len(mc.Dev) > 0:
		return bad("multiple_choice", "a dev split is given but shots is 0", "set shots, or remove dev")
	case mc.Limit < 0:
		return bad("multiple_choice", "limit must not be negative", "0 scores every question")
	}
	if err := eval.CheckColumns(mc.Columns); err != nil {
		return bad("multiple_choice", "columns: "+err.Error(), "map our name to the file's: columns: {question: soru, answer: cevap, subject: bolum}")
	}
	for ours, theirs := range mc.Columns {
		// Mapping a column to its own name is the default.
		if theirs == ours || theirs == "" {
			delete(mc.Columns, ours)
		}
	}
	if len(mc.Columns) == 0 {
		mc.Columns = nil
	}
	return nil
}

func (evalKind) Prepare(params any, dir string) (pipeline.Runner, error) {
	p := params.(*evalParams)
	m, err := modelParam(p.Model, dir, "point model at the checkpoint folder the adapter was trained on")
	if err != nil {
		return nil, err
	}
	s := &evalStage{p: p, model: m}
	s.local = append(s.local, m.files...)
	if hub.IsRef(p.Tokenizer) {
		if s.tokHub, err = parseHub("tokenizer", p.Tokenizer, hubFile); err != nil {
			return nil, err
		}
	} else if p.Tokenizer != "" {
		if s.tokPath, err = pipeline.ResolvePath(dir, p.Tokenizer); err != nil {
			return nil, &pipeline.ParamError{Param: "tokenizer", Msg: err.Error(), Fix: "write the path in full"}
		}
		if err := pipeline.CheckReadableFile(s.tokPath); err != nil {
			return nil, &pipeline.ParamError{Param: "tokenizer", Msg: err.Error(), Fix: "give the path of the tokenizer.json training used"}
		}
		s.local = append(s.local, s.tokPath)
	}
	mc := p.MultipleChoice
	if mc == nil {
		return s, nil
	}
	format, _ := eval.ParseFormat(mc.Prompt)
	s.mc = eval.MCOptions{Shots: mc.Shots, Format: format}
	if s.set, err = setParts(dir, "paths", mc.Paths); err != nil {
		return nil, err
	}
	// The dev split may be the set itself: a question is never its own shot.
	if s.dev, err = setParts(dir, "dev", mc.Dev); err != nil {
		return nil, err
	}
	for _, parts := range [][]setPart{s.set, s.dev} {
		for _, part := range parts {
			s.local = append(s.local, part.files...)
		}
	}
	// Local sets are read now, so that a malformed one stops the run before
	// anything trains (the run reads them again, checked against the key);
	// those on the Hub are read once fetched.
	local := func(parts []setPart) bool {
		return !slices.ContainsFunc(parts, func(p setPart) bool { return p.hub != nil })
	}
	if local(s.set) && local(s.dev) {
		open := func(path string) (eval.File, error) { return os.Open(path) }
		if _, _, err := s.questions(open, s.set, s.dev); err != nil {
			return nil, &pipeline.ParamError{Param: "multiple_choice", Msg: err.Error(), Fix: setFix(err)}
		}
	}
	return s, nil
}

// setFix says what to do about a question set's error.
func setFix(err error) string {
	var row *eval.RowError
	var mend interface{ Fix() string }
	switch {
	case errors.As(err, &mend):
		return mend.Fix()
	case strings.Contains(err.Error(), "-shot needs"):
		return "add dev questions for every subject, or fewer shots"
	case strings.Contains(err.Error(), "which no row has"):
		return "give columns: the file's own column name"
	case errors.As(err, &row):
		return "a question needs question, choices (a list, or columns A, B, C, …) and answer (a letter or a 0-based index); map other names with columns:"
	}
	return ""
}

// A setPart is one entry of a question set's paths: local files, or the
// files of an hf:// reference.
type setPart struct {
	files []string
	hub   *hubInput
}

// setParts reads the paths (or dev: which) of multiple_choice, each local
// file once.
func setParts(dir, which string, paths []string) ([]setPart, error) {
	var parts []setPart
	seen := fileSet{param: "multiple_choice", what: which + ": "}
	for _, path := range paths {
		if hub.IsRef(path) {
			h, err := parseHub("multiple_choice", path, hubFiles)
			if err != nil {
				return nil, err
			}
			parts = append(parts, setPart{hub: h})
			continue
		}
		pattern, err := pipeline.ExpandHome(path)
		if err != nil {
			return nil, &pipeline.ParamError{Param: "multiple_choice", Msg: err.Error(), Fix: "write the path in full"}
		}
		files, err := dataset.ExpandGlobs(dir, []string{pattern})
		if err != nil {
			return nil, &pipeline.ParamError{Param: "multiple_choice", Msg: which + ": " + err.Error(),
				Fix: "a relative path starts at the spec's folder; files on the Hub are hf://datasets/ORG/NAME@REV/PATH"}
		}
		for _, f := range files {
			if err := pipeline.CheckReadableFile(f); err != nil {
				return nil, &pipeline.ParamError{Param: "multiple_choice", Msg: err.Error(), Fix: "list question files (.jsonl, .json, .parquet)"}
			}
			if err := seen.add(f); err != nil {
				return nil, err
			}
		}
		parts = append(parts, setPart{files: files})
	}
	return parts, nil
}

type evalStage struct {
	p       *evalParams
	model   modelArg
	tokPath string    // a local tokenizer.json given as tokenizer:
	tokHub  *hubInput // or one on the Hub
	set     []setPart // the questions
	dev     []setPart // and the solved ones the shots come from
	local   []string  // the local files, whose digests enter the key
	mc      eval.MCOptions
}

func (s *evalStage) Files() []string { return s.local }

func (s *evalStage) Resolve(ctx context.Context) ([]pipeline.Ref, error) {
	hs := []*hubInput{s.model.hub, s.tokHub}
	for _, parts := range [][]setPart{s.set, s.dev} {
		for _, p := range parts {
			hs = append(hs, p.hub)
		}
	}
	return resolveAll(ctx, hs...)
}

// questions reads the set and the dev split through open (the local
// files; hf:// parts must be fetched into files first), keeps the first
// `limit` questions and checks that the dev split has the shots.
func (s *evalStage) questions(open func(string) (eval.File, error), set, dev []setPart) ([]eval.Question, []eval.Question, error) {
	read := func(parts []setPart) ([]eval.Question, error) {
		var files []string
		for _, p := range parts {
			files = append(files, p.files...)
		}
		if len(files) == 0 {
			return nil, nil
		}
		return eval.ReadQuestionsFrom(open, files, s.p.MultipleChoice.Columns)
	}
	qs, err := read(set)
	if err != nil {
		return nil, nil, err
	}
	if l := s.p.MultipleChoice.Limit; l > 0 && l < len(qs) {
		qs = qs[:l]
	}
	ds, err := read(dev)
	if err != nil {
		return nil, nil, err
	}
	if _, err := eval.Shots(qs, eval.MCOptions{Shots: s.mc.Shots, Dev: ds}); err != nil {
		return nil, nil, err
	}
	return qs, ds, nil
}

// fetchSet fetches the hf:// parts of a set and returns all as local files.
func fetchSet(ctx context.Context, t *pipeline.Task, parts []setPart) ([]setPart, error) {
	out := make([]setPart, len(parts))
	for i, p := range parts {
		out[i] = p
		if p.hub == nil {
			continue
		}
		files, err := p.hub.fetch(ctx, t)
		if err != nil {
			return nil, err
		}
		out[i] = setPart{files: files}
	}
	return out, nil
}

// CheckInputs: an eval stage scores the adapter of one qlora stage, over
// the checkpoint of at most one model stage (not with `model:`), and reads
// held-out records from source stages exactly when the loss task is listed.
func (evalKind) CheckInputs(params any, needs []pipeline.Need) error {
	p := params.(*evalParams)
	var adapters, models, sources []string
	for _, n := range needs {
		switch n.Kind {
		case "qlora":
			adapters = append(adapters, n.Stage)
		case modelKindName:
			models = append(models, n.Stage)
		case parquetKindName, jsonlKindName, textKindName, mixKindName:
			sources = append(sources, n.Stage)
		default:
			return &pipeline.ParamError{Param: "needs",
				Msg: fmt.Sprintf("%q is a %s stage, but an eval stage reads the adapter of a qlora stage, the checkpoint of a model stage and the held-out records of parquet, jsonl or text stages or of a mix stage", n.Stage, n.Kind),
				Fix: "name the qlora stage (and a model stage, and for the loss task a source of held-out records) in needs"}
		}
	}
	hasLoss := slices.Contains(p.Tasks, taskLoss)
	switch {
	case len(adapters) == 0:
		return &pipeline.ParamError{Param: "needs", Msg: "no qlora stage: an eval stage scores an adapter beside its base",
			Fix: "add the qlora stage to needs, e.g. needs: [adapter]"}
	case len(adapters) > 1:
		return &pipeline.ParamError{Param: "needs", Msg: fmt.Sprintf("two qlora stages (%s): an eval stage scores one adapter", strings.Join(adapters, ", ")),
			Fix: "keep one qlora stage in needs; another eval stage scores the other"}
	case len(models) > 1:
		return &pipeline.ParamError{Param: "needs", Msg: fmt.Sprintf("two model stages (%s): an adapter has one base", strings.Join(models, ", ")),
			Fix: "keep the model stage the adapter was trained on"}
	case len(models) == 1 && p.Model != "":
		return twoBases(p.Model, models[0])
	case hasLoss && len(sources) == 0:
		return &pipeline.ParamError{Param: "needs", Msg: "the loss task has no held-out records",
			Fix: "add a jsonl, parquet or text stage of held-out records, or the mix stage that holds some out, to needs"}
	case !hasLoss && len(sources) > 0:
		return &pipeline.ParamError{Param: "needs", Msg: fmt.Sprintf("stage %q gives held-out records, but the loss task is not listed", sources[0]),
			Fix: "add loss to tasks, or remove the stage from needs"}
	}
	if err := otherBaseGiven(needs, p.Model, p.OtherBase); err != nil {
		return err
	}
	return missingTrainedBase(needs, p.Model)
}

// evalInputs are an eval stage's needs, told apart by kind (CheckInputs
// has checked them).
type evalInputs struct {
	adapter *pipeline.Input
	model   *pipeline.Input
	sources []*pipeline.Input
}

func evalInputsOf(t *pipeline.Task) (evalInputs, error) {
	var in evalInputs
	for _, i := range t.Inputs {
		switch i.Kind {
		case "qlora":
			in.adapter = i
		case modelKindName:
			in.model = i
		case parquetKindName, jsonlKindName, textKindName, mixKindName:
			in.sources = append(in.sources, i)
		}
	}
	if in.adapter == nil {
		return in, fmt.Errorf("no adapter: add the qlora stage to needs")
	}
	return in, nil
}

func (s *evalStage) Run(ctx context.Context, t *pipeline.Task) error {
	in, err := evalInputsOf(t)
	if err != nil {
		return err
	}
	adapterEntry, err := in.adapter.Dir(ctx)
	if err != nil {
		return err
	}
	lineage, err := in.adapter.Lineage(ctx)
	if err != nil {
		return err
	}
	prov := provenanceOf(lineage)
	base, err := s.base(ctx, t, in, prov)
	if err != nil {
		return err
	}
	tok, lossOpts, err := s.tokenizer(ctx, t, prov, base)
	if err != nil {
		return err
	}

	// The clock starts once the adapter's entry is there (the stage may
	// have waited for training to finish), so eval_seconds is the eval's.
	started := time.Now()
	// Everything is read, tokenized and checked before the model loads.
	var lossReqs []eval.Request
	var lossWhat func(req int) string // names a request's record
	records := 0
	if len(in.sources) > 0 {
		if err := warnTrainedOn(ctx, t, in.sources, lineage); err != nil {
			return err
		}
		if lossReqs, records, lossWhat, err = heldOutRequests(ctx, t.Log, tok, in.sources, lossOpts); err != nil {
			return err
		}
	}
	var prompts *eval.MCPrompts
	if s.p.MultipleChoice != nil {
		set, err := fetchSet(ctx, t, s.set)
		if err != nil {
			return err
		}
		dev, err := fetchSet(ctx, t, s.dev)
		if err != nil {
			return err
		}
		open := func(path string) (eval.File, error) { return t.Open(path) }
		qs, ds, err := s.questions(open, set, dev)
		if err != nil {
			return fmt.Errorf("multiple_choice: %w", err)
		}
		opts := s.mc
		opts.Dev = ds
		if prompts, err = eval.BuildMC(tok, qs, opts); err != nil {
			return fmt.Errorf("multiple choice: %w", err)
		}
	}

	t.Report(0, 1, "models", "loading "+filepath.Base(base))
	nf4 := params(prov.qlora)["quantize"] != "none"
	models, err := openScorers(ctx, s.p, base, filepath.Join(adapterEntry, trainer.AdapterDirName), nf4)
	if err != nil {
		if fe := (*adapterFitError)(nil); errors.As(err, &fe) {
			return fmt.Errorf("the adapter of stage %s does not fit the base %s: %w", in.adapter.Name, base, err)
		}
		return err
	}
	defer models.close()
	if err := t.CheckFiles(s.model.files...); err != nil {
		return err
	}

	total := 2 * (len(lossReqs) + mcRequests(prompts))
	done := 0
	res := evalResults{Models: map[string]string{}}
	for _, which := range []string{"base", "adapter"} {
		if which == "adapter" {
			res.Models["adapter"] = "stage " + in.adapter.Name + " on " + base
			if nf4 {
				// The weights the adapter was trained against.
				res.Models["adapter"] += " (NF4 round trip, as trained)"
			}
		} else {
			res.Models["base"] = base
		}
		scorer, err := models.open(which, func(n, _ int) {
			t.Report(int64(done+n), int64(total), "requests", "scoring the "+which)
		})
		if err != nil {
			return err
		}
		if which == "base" {
			if err := eval.CheckLengths(scorer, lossReqs, lossWhat); err != nil {
				return err
			}
			if prompts != nil {
				if err := prompts.CheckLengths(scorer); err != nil {
					return err
				}
			}
		}
		if lossReqs != nil {
			l, err := eval.Loss(ctx, scorer, lossReqs, records)
			if err != nil {
				return err
			}
			done += len(lossReqs)
			res.setLoss(which, l)
		}
		if prompts != nil {
			t0 := time.Now()
			items, err := eval.ScoreMC(ctx, scorer, prompts)
			if err != nil {
				return err
			}
			done += mcRequests(prompts)
			res.setMC(which, items, s.mc.Shots, s.mc.Format)
			res.MultipleChoice.ItemsPerSecond[which] = float64(len(items)) / time.Since(t0).Seconds()
		}
	}
	if err := res.checkFinite(); err != nil {
		return err
	}
	if err := res.write(t.Dir); err != nil {
		return err
	}
	// At the adapter's last step, so that TensorBoard shows the scores at
	// the end of the training curve of the same run.
	var step int64
	if prov.qlora != nil {
		// A statistic is a number of any Go type, or float64 once read back.
		b, _ := json.Marshal(prov.qlora.Stats["steps"])
		json.Unmarshal(b, &step)
	}
	settings := append(paramRows(&s.p), [2]string{"adapter", res.Models["adapter"]}, [2]string{"base", res.Models["base"]})
	if err := writeScoreEvents(filepath.Join(t.Dir, EventsDir), "eval", step, res.scalars(), settings, started); err != nil {
		return fmt.Errorf("writing TensorBoard events: %w", err)
	}
	res.stats(t)
	t.SetStat("eval_seconds", time.Since(started).Seconds())
	t.SetStat("cores", runtime.GOMAXPROCS(0))
	return nil
}

func mcRequests(p *eval.MCPrompts) int {
	if p == nil {
		return 0
	}
	n := 0
	for i := range p.Questions {
		n += len(p.Letters[i]) + len(p.Texts[i])
	}
	return n
}

// warnTrainedOn warns when a source of held-out records is one the adapter
// was trained on (the same entry in its lineage): its loss is then a
// training loss. A mix stage's held-out examples were kept out of training.
func warnTrainedOn(ctx context.Context, t *pipeline.Task, sources []*pipeline.Input, lineage []*pipeline.Manifest) error {
	for _, in := range sources {
		if in.Kind == mixKindName {
			continue
		}
		own, err := in.Lineage(ctx)
		if err != nil {
			return err
		}
		for _, m := range lineage {
			if m.Key == own[0].Key {
				t.Log.Warn("the held-out records are records the adapter was trained on: the loss task's score is a training loss",
					"stage", in.Name, "trained_through", m.Stage, "fix", "hold records out with a mix stage's heldout, or read a source the training did not")
				break
			}
		}
	}
	return nil
}

// warnEmptyAnswers warns of held-out records whose answer is empty: each
// is scored on <end_of_turn> alone, a score of how readily the model says
// nothing, which pulls the mean loss away from what the answers measure.
func warnEmptyAnswers(log *slog.Logger, recs []eval.ChatRecord, where []string) {
	n, first := int64(0), -1
	for i, r := range recs {
		empty := !r.Plain && r.Messages == nil && strings.TrimSpace(r.Output) == ""
		for _, m := range r.Messages {
			empty = empty || m.Role == "assistant" && strings.TrimSpace(m.Content) == ""
		}
		if empty {
			if n++; first < 0 {
				first = i
			}
		}
	}
	if n > 0 {
		log.Warn(fmt.Sprintf("%s an empty (or white space) answer, scored on <end_of_turn> alone; the first is the held-out %s",
			counted(n, "record has", "records have"), where[first]), "fix", "remove such records from the held-out data")
	}
}

// heldOutRequests reads the held-out records of the source stages (and
// the held-out examples of mix stages, tokenized as training tokenized
// them) and makes the requests that score them; it also returns how many
// records there were, and names the record of each request ("row 12 of
// stage heldout") for messages.
func heldOutRequests(ctx context.Context, log *slog.Logger, tok *tokenizer.Tokenizer, sources []*pipeline.Input, opts eval.LossOptions) ([]eval.Request, int, func(req int) string, error) {
	var mixes, others []*pipeline.Input
	for _, in := range sources {
		if in.Kind == mixKindName {
			mixes = append(mixes, in)
		} else {
			others = append(others, in)
		}
	}
	var reqs []eval.Request
	var names []string // of each request's record
	records := 0
	// placed says which record an error of LossRequests or LabelRequests is.
	placed := func(err error, name func(rec int) string) error {
		var re *eval.RecordError
		if errors.As(err, &re) {
			return fmt.Errorf("held-out %s: %w", name(re.Record), re.Err)
		}
		return err
	}
	if len(others) > 0 {
		recs, where, err := heldOut(ctx, others)
		if err != nil {
			return nil, 0, nil, err
		}
		warnEmptyAnswers(log, recs, where)
		r, recOf, err := eval.LossRequests(tok, recs, opts)
		if err != nil {
			return nil, 0, nil, placed(err, func(i int) string { return where[i] })
		}
		reqs = r
		for _, i := range recOf {
			names = append(names, where[i])
		}
		records += len(recs)
	}
	for _, in := range mixes {
		ids, labels, err := mixHeldOut(ctx, in)
		if err != nil {
			return nil, 0, nil, err
		}
		example := func(i int) string { return fmt.Sprintf("example %d of stage %s", i, in.Name) }
		r, recOf, err := eval.LabelRequests(ids, labels)
		if err != nil {
			return nil, 0, nil, placed(err, example)
		}
		reqs = append(reqs, r...)
		for _, i := range recOf {
			names = append(names, example(i))
		}
		records += len(ids)
	}
	return reqs, records, func(i int) string { return "the held-out " + names[i] }, nil
}

// mixHeldOut reads the held-out examples of a mix stage.
func mixHeldOut(ctx context.Context, in *pipeline.Input) (ids, labels [][]int32, err error) {
	err = eachBatch(ctx, in, func(rec arrow.RecordBatch) error {
		idl, err := int32Lists(in, rec, packer.ColInputIDs, mixKindName)
		if err != nil {
			return err
		}
		lab, err := int32Lists(in, rec, packer.ColLabels, mixKindName)
		if err != nil {
			return err
		}
		held, err := boolColumn(in, rec, ColHeldOut, mixKindName)
		if err != nil {
			return err
		}
		for r := 0; r < int(rec.NumRows()); r++ {
			if held.Value(r) {
				ids = append(ids, dataset.Int32Row(idl, r))
				labels = append(labels, dataset.Int32Row(lab, r))
			}
		}
		return nil
	})
	if err == nil && len(ids) == 0 {
		err = fmt.Errorf("mix stage %s holds no examples out: set its heldout", in.Name)
	}
	return ids, labels, err
}

// heldOut reads the records of the source stages: Alpaca records,
// conversations or plain texts, and where each is ("row 3 of stage
// heldout": the table's third row, which inspect --rows 3 shows last).
func heldOut(ctx context.Context, sources []*pipeline.Input) ([]eval.ChatRecord, []string, error) {
	var recs []eval.ChatRecord
	var where []string
	const want = parquetKindName + ", " + jsonlKindName + " or " + textKindName
	for _, in := range sources {
		first := 0 // the table's row of the batch's first
		add := func(r eval.ChatRecord, i int) {
			recs = append(recs, r)
			where = append(where, fmt.Sprintf("row %d of stage %s", first+i+1, in.Name)) // as inspect --rows N shows it last
		}
		err := eachBatch(ctx, in, func(rec arrow.RecordBatch) error {
			defer func() { first += int(rec.NumRows()) }()
			schema := rec.Schema()
			switch {
			case len(schema.FieldIndices(dataset.ColMessages)) == 1:
				col, err := dataset.NewMessagesColumn(rec.Column(schema.FieldIndices(dataset.ColMessages)[0]))
				if err != nil {
					return fmt.Errorf("stage %s: %w", in.Name, err)
				}
				for i := 0; i < int(rec.NumRows()); i++ {
					add(eval.ChatRecord{Messages: col.Row(i)}, i)
				}
				return nil
			case in.Kind == textKindName:
				c, err := stringColumn(in, rec, dataset.ColText, want)
				if err != nil {
					return err
				}
				for i := 0; i < int(rec.NumRows()); i++ {
					if c.Value(i) != "" { // left out of training too
						add(eval.ChatRecord{Text: c.Value(i), Plain: true}, i)
					}
				}
				return nil
			}
			var cols [4]*array.String
			for i, name := range []string{dataset.ColInstruction, dataset.ColInput, dataset.ColOutput} {
				c, err := stringColumn(in, rec, name, want)
				if err != nil {
					return err
				}
				cols[i] = c
			}
			if len(schema.FieldIndices(dataset.ColSystem)) == 1 {
				c, err := stringColumn(in, rec, dataset.ColSystem, want)
				if err != nil {
					return err
				}
				cols[3] = c
			}
			for i := 0; i < int(rec.NumRows()); i++ {
				r := eval.ChatRecord{Instruction: cols[0].Value(i), Input: cols[1].Value(i), Output: cols[2].Value(i)}
				if cols[3] != nil {
					r.System = cols[3].Value(i)
				}
				add(r, i)
			}
			return nil
		})
		if err != nil {
			return nil, nil, err
		}
	}
	if len(recs) == 0 {
		return nil, nil, fmt.Errorf("the held-out stages (%s) have no records", sources[0].Name)
	}
	return recs, where, nil
}

// base finds the adapter's base checkpoint (see adapterBase).
func (s *evalStage) base(ctx context.Context, t *pipeline.Task, in evalInputs, prov provenance) (string, error) {
	dir, err := adapterBase(ctx, t, in.adapter.Name, prov, in.model, &s.model, s.p.OtherBase)
	return dir, otherBaseHint(err)
}

// tokenizer loads the tokenizer to use (see adapterTokenizer). It also
// says which tokens training learned (the tokenize stage's loss_on and
// eos).
func (s *evalStage) tokenizer(ctx context.Context, t *pipeline.Task, prov provenance, base string) (*tokenizer.Tokenizer, eval.LossOptions, error) {
	path, err := adapterTokenizer(ctx, t, prov, base, s.tokPath, s.tokHub)
	if err != nil {
		return nil, eval.LossOptions{}, err
	}
	tok, err := load(t, path)
	p := params(prov.tokenize)
	lossOn, _ := p["loss_on"].(string)
	newline, _ := p["loss_on_newline"].(bool)
	eos, _ := p["eos"].(bool)
	return tok, eval.LossOptions{LossOn: lossOn, Newline: newline, EOS: eos}, err
}

// evalResults is results.json: what was scored, and each model's scores.
type evalResults struct {
	// Models says what "base" and "adapter" are.
	Models         map[string]string `json:"models"`
	Loss           *lossResults      `json:"loss,omitempty"`
	MultipleChoice *mcResults        `json:"multiple_choice,omitempty"`
	// Table is the scores side by side, as `pipeline inspect` prints them.
	Table *resultsTable `json:"table,omitempty"`

	items map[string][]eval.MCItem
}

type lossResults struct {
	Records int                        `json:"records"`
	Tokens  int                        `json:"tokens"`
	Scores  map[string]eval.LossResult `json:"scores"`
}

type mcResults struct {
	Questions int    `json:"questions"`
	Shots     int    `json:"shots"`
	Format    string `json:"format"`
	// Scores and Subjects are keyed by model (base, adapter).
	Scores   map[string]eval.MCScores            `json:"scores"`
	Subjects map[string]map[string]eval.MCScores `json:"subjects,omitempty"`
	// ItemsPerSecond is how fast each model's questions were scored.
	ItemsPerSecond map[string]float64 `json:"items_per_second"`
}

type resultsTable struct {
	Columns []string `json:"columns"`
	Rows    [][]any  `json:"rows"`
}

func (r *evalResults) setLoss(which string, l eval.LossResult) {
	if r.Loss == nil {
		r.Loss = &lossResults{Records: l.Records, Tokens: l.Tokens, Scores: map[string]eval.LossResult{}}
	}
	r.Loss.Scores[which] = l
}

func (r *evalResults) setMC(which string, items []eval.MCItem, shots int, f eval.Format) {
	format := "lm-evaluation-harness's mmlu prompt (acc: answer letters) and mmlu_continuation prompt (acc_norm: choice texts, per UTF-8 byte)"
	if f.Name == eval.FormatTurkishMMLU.Name {
		format = "lm-evaluation-harness's turkishmmlu prompt (acc: answer letters) and its continuation form (acc_norm: choice texts, per UTF-8 byte)"
	}
	all, subjects := eval.Summarize(items)
	if r.MultipleChoice == nil {
		r.MultipleChoice = &mcResults{Questions: all.Questions, Shots: shots,
			Format: format,
			Scores: map[string]eval.MCScores{}, ItemsPerSecond: map[string]float64{}}
	}
	r.MultipleChoice.Scores[which] = all
	if len(subjects) > 0 {
		if r.MultipleChoice.Subjects == nil {
			r.MultipleChoice.Subjects = map[string]map[string]eval.MCScores{}
		}
		for name, sc := range subjects {
			if r.MultipleChoice.Subjects[name] == nil {
				r.MultipleChoice.Subjects[name] = map[string]eval.MCScores{}
			}
			r.MultipleChoice.Subjects[name][which] = sc
		}
	}
	if r.items == nil {
		r.items = map[string][]eval.MCItem{}
	}
	r.items[which] = items
}

// table lays the scores out side by side: one row per score, the base's
// and the adapter's value and their difference.
func (r *evalResults) table() *resultsTable {
	t := &resultsTable{Columns: []string{"score", "base", "adapter", "change"}}
	row := func(name string, b, a float64) {
		t.Rows = append(t.Rows, []any{name, round6(b), round6(a), round6(a - b)})
	}
	if l := r.Loss; l != nil {
		row("loss", l.Scores["base"].Loss, l.Scores["adapter"].Loss)
		row("perplexity", l.Scores["base"].Perplexity, l.Scores["adapter"].Perplexity)
	}
	if mc := r.MultipleChoice; mc != nil {
		row("acc", mc.Scores["base"].Acc, mc.Scores["adapter"].Acc)
		t.Rows = append(t.Rows, []any{"acc_stderr", round6(mc.Scores["base"].AccStderr), round6(mc.Scores["adapter"].AccStderr), ""})
		row("acc_norm", mc.Scores["base"].AccNorm, mc.Scores["adapter"].AccNorm)
		t.Rows = append(t.Rows, []any{"acc_norm_stderr", round6(mc.Scores["base"].AccNormStderr), round6(mc.Scores["adapter"].AccNormStderr), ""})
		names := make([]string, 0, len(mc.Subjects))
		for n := range mc.Subjects {
			names = append(names, n)
		}
		sort.Strings(names)
		for _, n := range names {
			sc := mc.Subjects[n]
			row(fmt.Sprintf("acc %s (%d)", n, sc["base"].Questions), sc["base"].Acc, sc["adapter"].Acc)
			row(fmt.Sprintf("acc_norm %s (%d)", n, sc["base"].Questions), sc["base"].AccNorm, sc["adapter"].AccNorm)
		}
	}
	return t
}

// round6 keeps six significant digits, and no more than six decimals: a
// table of scores, not of the float's noise (a random model's perplexity
// in the hundreds of thousands has no use for its decimals).
func round6(v float64) float64 {
	if v == 0 || math.IsNaN(v) || math.IsInf(v, 0) {
		return v
	}
	decimals := 6
	if whole := int(math.Floor(math.Log10(math.Abs(v)))) + 1; whole > 0 {
		decimals = max(6-whole, 0)
	}
	scale := math.Pow(10, float64(decimals))
	r := math.Round(v*scale) / scale
	if r == 0 {
		return 0 // not -0, which JSON would show
	}
	return r
}

// write writes results.json and, with multiple choice, items.jsonl.
func (r *evalResults) write(dir string) error {
	r.Table = r.table()
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	if err := atomicfile.WriteFile(filepath.Join(dir, EvalResultsFile), append(b, '\n')); err != nil {
		return err
	}
	if r.items == nil {
		return nil
	}
	// One line a question: what it is (its text and choices too), then
	// each model's log-likelihoods and picks (letters), as
	// scripts/reference/mc_reference.py prints them.
	type scores struct {
		LetterLogLik []float64 `json:"letter_loglik"`
		ChoiceLogLik []float64 `json:"choice_loglik"`
		Pred         string    `json:"pred"`
		PredNorm     string    `json:"pred_norm"`
	}
	var lines strings.Builder
	for i, it := range r.items["base"] {
		line := struct {
			Index       int               `json:"index"`
			Subject     string            `json:"subject,omitempty"`
			Question    string            `json:"question"`
			Choices     []string          `json:"choices"`
			Answer      string            `json:"answer"`
			ChoiceBytes []int             `json:"choice_bytes"`
			Models      map[string]scores `json:"models"`
		}{Index: it.Index, Subject: it.Subject, Question: it.Question, Choices: it.Choices, Answer: eval.Letter(it.Answer),
			ChoiceBytes: it.ChoiceBytes, Models: map[string]scores{}}
		for _, which := range []string{"base", "adapter"} {
			if items := r.items[which]; i < len(items) {
				m := items[i]
				line.Models[which] = scores{m.LetterLogLik, m.ChoiceLogLik, eval.Letter(m.Pred), eval.Letter(m.PredNorm)}
			}
		}
		b, err := json.Marshal(line)
		if err != nil {
			return err
		}
		lines.Write(b)
		lines.WriteByte('\n')
	}
	return atomicfile.WriteFile(filepath.Join(dir, EvalItemsFile), []byte(lines.String()))
}

// checkFinite refuses scores that are not numbers, which results.json and
// the manifest cannot hold: a NaN loss says that a model's weights hold
// values that are not finite; an infinite perplexity, a loss past what exp
// can take.
func (r *evalResults) checkFinite() error {
	sc := r.scalars()
	for _, name := range slices.Sorted(maps.Keys(sc)) { // the loss before its perplexity
		if v := sc[name]; math.IsNaN(v) || math.IsInf(v, 0) {
			return fmt.Errorf("%s is %v, which results.json cannot hold: a model whose weights are not finite, or a loss too large to exponentiate", name, v)
		}
	}
	return nil
}

// scalars are the scores by name (loss_adapter, acc_norm_base, ...), as
// TensorBoard shows them under eval/.
func (r *evalResults) scalars() map[string]float64 {
	out := map[string]float64{}
	for _, which := range []string{"base", "adapter"} {
		if l := r.Loss; l != nil {
			out["loss_"+which] = l.Scores[which].Loss
			out["perplexity_"+which] = l.Scores[which].Perplexity
		}
		if mc := r.MultipleChoice; mc != nil {
			out["acc_"+which] = mc.Scores[which].Acc
			out["acc_norm_"+which] = mc.Scores[which].AccNorm
		}
	}
	return out
}

// stats records the scores in the manifest: each score of each model as a
// number (which the report charts), the per-subject accuracies and the
// counts as maps.
func (r *evalResults) stats(t *pipeline.Task) {
	for name, v := range r.scalars() {
		t.SetStat(name, v)
	}
	counts := map[string]any{}
	if l := r.Loss; l != nil {
		counts["loss_records"], counts["loss_tokens"] = l.Records, l.Tokens
	}
	if mc := r.MultipleChoice; mc != nil {
		counts["questions"], counts["shots"] = mc.Questions, mc.Shots
		if len(mc.Subjects) > 0 {
			subjects := map[string]map[string]float64{}
			for name, sc := range mc.Subjects {
				subjects[name] = map[string]float64{
					"acc_base": sc["base"].Acc, "acc_adapter": sc["adapter"].Acc,
					"acc_norm_base": sc["base"].AccNorm, "acc_norm_adapter": sc["adapter"].AccNorm,
				}
			}
			t.SetStat("subjects", subjects)
		}
	}
	t.SetStat("counts", counts)
}
