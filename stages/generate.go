package stages

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math"
	"math/big"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/memory"

	"gemmaft/converse"
	"gemmaft/dataset"
	"gemmaft/hub"
	"gemmaft/pipeline"
	"gemmaft/trainer"
)

const generateKindName = "generate"

func init() { kinds[generateKindName] = generateKind{} }

// AnswersDir is the folder of a generate stage's entry that holds the
// answer file, model_answer/MODEL_ID.jsonl: FastChat's
// data/BENCH/model_answer/ layout, so the folder can be copied there for
// its judge.
const AnswersDir = "model_answer"

// generateKind answers questions with a model: single questions from a
// source's instruction and input, or MT-Bench's multi-turn questions, each
// later turn asked after the model's own earlier answers. The model is a
// qlora stage's adapter on its base, a merge stage's checkpoint, or a base
// alone.
type generateKind struct{}

type generateParams struct {
	// Model is a base checkpoint folder, when no model or merge stage is
	// among the needs and the qlora stage's lineage does not name one.
	Model string `json:"model,omitempty"`
	// OtherBase applies the adapter to the base that `model:` or a model
	// stage among the needs names even where it is not the checkpoint the
	// adapter was trained on (an adapter trained on -pt, scored on -it);
	// the shapes must still fit. Left out of the key when unset.
	OtherBase bool `yaml:"other_base" json:"other_base,omitempty"`
	// Tokenizer is a tokenizer.json; by default the one training used
	// (the qlora stage's tokenize stage), else the model folder's.
	Tokenizer string `json:"tokenizer,omitempty"`
	// Quantize is auto (nf4 for an adapter trained on an NF4 base, which
	// is what it learned to correct; none otherwise), nf4 or none.
	Quantize     string  `json:"quantize"`
	MaxNewTokens int     `yaml:"max_new_tokens" json:"max_new_tokens"`
	Temperature  float64 `json:"temperature"`
	TopK         int     `yaml:"top_k" json:"top_k"`
	TopP         float64 `yaml:"top_p" json:"top_p"`
	Seed         uint64  `json:"seed"`
	// System is a system text put before every conversation's first turn;
	// empty leaves the source's system column (if any) in charge.
	System string `json:"system,omitempty"`
	// ModelID names the model in the answer file (and names the file),
	// as FastChat's --model-id does.
	ModelID string `yaml:"model_id" json:"model_id"`
	// BatchSize is how many questions are decoded together. Each sequence
	// attends only to its own cache, and each question's turn draws from a
	// stream of its own, so the answers do not depend on it; it stays out
	// of the key.
	BatchSize int `yaml:"batch_size" json:"-"`
	// Backend decodes on the CPU reference (cpu, the default) or on the GPU
	// (cuda; auto: the GPU when one is usable). Validate resolves auto, and
	// cpu is keyed as before.
	Backend string `json:"backend,omitempty"`
}

var modelIDPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]*$`)

// Synonyms and ParamNotes map the names of transformers' generate and
// FastChat's answer script.
func (generateKind) Synonyms() map[string]string {
	return map[string]string{"max_tokens": "max_new_tokens", "max_new_token": "max_new_tokens", "model_path": "model", "system_prompt": "system"}
}

func (generateKind) ParamNotes() map[string]string {
	return map[string]string{
		"do_sample":  "temperature: 0 decodes greedily, a positive temperature samples",
		"max_length": "max_new_tokens bounds each answer; the prompt's length is the question's",
		"num_beams":  "decoding is greedy or sampled, without beam search",
	}
}

func (generateKind) Version() int       { return 1 }
func (generateKind) Inputs() (int, int) { return 1, 3 }
func (generateKind) Params() any {
	return &generateParams{Quantize: "auto", MaxNewTokens: 1024, TopP: 1, ModelID: "model", BatchSize: 8}
}

func (p *generateParams) Validate() error {
	bad := func(param, msg, fix string) error { return &pipeline.ParamError{Param: param, Msg: msg, Fix: fix} }
	switch p.Quantize {
	case "auto", "nf4", "none":
	default:
		return bad("quantize", fmt.Sprintf("unknown %q", p.Quantize),
			"use auto (nf4 for an adapter trained on an NF4 base), nf4 or none")
	}
	if err := resolveDevice(&p.Backend); err != nil {
		return bad("backend", err.Error(), "use cpu, cuda, or auto (the GPU when one is usable)")
	}
	switch {
	case p.MaxNewTokens < 1:
		return bad("max_new_tokens", "must be at least 1", "FastChat's MT-Bench answers take up to 1024")
	case p.Temperature < 0 || math.IsNaN(p.Temperature) || math.IsInf(p.Temperature, 0):
		return bad("temperature", fmt.Sprintf("%v must be 0 (greedy) or a positive finite number", p.Temperature), "0 decodes greedily; Gemma 3 ships sampling at 1")
	case p.TopK < 0:
		return bad("top_k", "must not be negative", "0 keeps every token")
	case p.TopP == 0: // transformers keeps the most likely token alone there; the decoders read 0 as no cut
		return bad("top_p", "0 would keep only the most likely token", "top_k: 1 says that; 1 keeps every token")
	case p.TopP < 0 || p.TopP > 1 || math.IsNaN(p.TopP):
		return bad("top_p", fmt.Sprintf("%v must be in (0, 1]", p.TopP), "1 keeps every token")
	case p.BatchSize < 1:
		return bad("batch_size", "must be at least 1", "questions decoded together (8 by default); the answers do not depend on it")
	case !modelIDPattern.MatchString(p.ModelID):
		return bad("model_id", fmt.Sprintf("%q is not a file name", p.ModelID), "letters, digits, '.', '_' and '-'")
	}
	if p.Temperature == 0 {
		for _, c := range []struct {
			param string
			set   bool
		}{{"top_k", p.TopK != 0}, {"top_p", p.TopP != 1}, {"seed", p.Seed != 0}} {
			if c.set {
				return bad(c.param, "applies only when sampling, and temperature is 0 (greedy)",
					"set temperature (e.g. 0.7, with top_k 64 and top_p 0.95 as Gemma 3 ships), or remove "+c.param)
			}
		}
	}
	return nil
}

func (generateKind) Prepare(params any, dir string) (pipeline.Runner, error) {
	p := params.(*generateParams)
	m, err := modelParam(p.Model, dir, "point model at a Hugging Face Gemma 3 checkpoint folder")
	if err != nil {
		return nil, err
	}
	s := &generateStage{p: p, model: m, files: m.files}
	if m.dir != "" {
		// Its tokenizer, when it has one, may be the one the stage reads
		// (of an hf:// model, the commit holds it).
		if _, err := os.Stat(filepath.Join(m.dir, "tokenizer.json")); err == nil {
			s.files = append(s.files, filepath.Join(m.dir, "tokenizer.json"))
		}
	}
	switch {
	case p.Tokenizer == "":
	case hub.IsRef(p.Tokenizer):
		if s.tokHub, err = parseHub("tokenizer", p.Tokenizer, hubFile); err != nil {
			return nil, err
		}
	default:
		path, err := pipeline.ResolvePath(dir, p.Tokenizer)
		if err != nil {
			return nil, &pipeline.ParamError{Param: "tokenizer", Msg: err.Error(), Fix: "write the path in full"}
		}
		if err := pipeline.CheckReadableFile(path); err != nil {
			fix := "give the path of the model's tokenizer.json, relative to the spec's folder, or hf://ORG/NAME@REV/tokenizer.json"
			fix = withHubHint(fix, "tokenizer", p.Tokenizer, path, "tokenizer.json")
			return nil, &pipeline.ParamError{Param: "tokenizer", Msg: err.Error(), Fix: fix}
		}
		s.tokenizer = path
		s.files = append(s.files, path)
	}
	return s, nil
}

// CheckInputs: a generate stage answers the questions of one source
// (mt_bench, jsonl or parquet) with one model: a qlora stage's adapter (on
// its base: from its lineage, a model stage or `model:`), a merge stage's
// checkpoint, or a base alone (a model stage or `model:`).
func (generateKind) CheckInputs(params any, needs []pipeline.Need) error {
	p := params.(*generateParams)
	byKind := map[string][]string{}
	var sources []string
	for _, n := range needs {
		switch n.Kind {
		case questionsKindName, jsonlKindName, parquetKindName:
			if sp, ok := n.Params.(*sourceParams); ok && dataset.Layout(sp.Format) != dataset.LayoutAlpaca {
				return &pipeline.ParamError{Param: "needs",
					Msg: fmt.Sprintf("%q reads %s conversations, but a generate stage asks instructions (a jsonl or parquet stage's instruction and input) or MT-Bench questions (an %s stage)", n.Stage, sp.Format, questionsKindName),
					Fix: "name a source of instructions, or write the questions as MT-Bench's question.jsonl ({\"question_id\": 1, \"turns\": [...]}) for an " + questionsKindName + " stage"}
			}
			sources = append(sources, n.Stage)
		case "qlora", mergeKindName, modelKindName:
			byKind[n.Kind] = append(byKind[n.Kind], n.Stage)
		default:
			return &pipeline.ParamError{Param: "needs",
				Msg: fmt.Sprintf("%q is a %s stage, but a generate stage reads questions (an %s, jsonl or parquet stage) and a model (a qlora, merge or model stage)", n.Stage, n.Kind, questionsKindName),
				Fix: "name the questions' source and the model's stage in needs"}
		}
	}
	needsErr := func(msg, fix string) error { return &pipeline.ParamError{Param: "needs", Msg: msg, Fix: fix} }
	switch {
	case len(sources) == 0:
		return needsErr("no questions", "add a source to needs: an mt_bench stage for MT-Bench questions, or a jsonl or parquet stage of instructions")
	case len(sources) > 1:
		return needsErr(fmt.Sprintf("two sources of questions (%s)", strings.Join(sources, ", ")), "keep one source in needs")
	}
	for _, k := range []string{"qlora", mergeKindName, modelKindName} {
		if len(byKind[k]) > 1 {
			return needsErr(fmt.Sprintf("two %s stages (%s): a generate stage answers with one model", k, strings.Join(byKind[k], ", ")),
				"keep one in needs")
		}
	}
	qlora, merge, model := len(byKind["qlora"]) == 1, len(byKind[mergeKindName]) == 1, len(byKind[modelKindName]) == 1
	switch {
	case merge && (qlora || model || p.Model != ""):
		return needsErr(fmt.Sprintf("merge stage %q holds a whole model, its adapter merged in, and a qlora or model stage or `model:` names another", byKind[mergeKindName][0]),
			"give either the merge stage, or the qlora stage with its base")
	case model && p.Model != "":
		return twoBases(p.Model, byKind[modelKindName][0])
	case !qlora && !merge && !model && p.Model == "":
		return needsErr("no model", "add a qlora, merge or model stage to needs, or set `model:` to a checkpoint folder")
	case model && !qlora && p.Tokenizer == "":
		// No training to take the tokenizer from, and a model stage's
		// random-init checkpoint ships none.
		return &pipeline.ParamError{Param: "tokenizer", Msg: fmt.Sprintf("model stage %q writes no tokenizer, and no qlora stage in needs says which one training used", byKind[modelKindName][0]),
			Fix: "set tokenizer: to the model's tokenizer.json (a file, or hf://ORG/NAME@REV/tokenizer.json)"}
	}
	if err := otherBaseGiven(needs, p.Model, p.OtherBase); err != nil {
		return err
	}
	return missingTrainedBase(needs, p.Model)
}

type generateStage struct {
	p         *generateParams
	model     modelArg
	tokenizer string    // a local tokenizer.json,
	tokHub    *hubInput // or one on the Hub
	files     []string
}

func (s *generateStage) Files() []string { return s.files }

func (s *generateStage) Resolve(ctx context.Context) ([]pipeline.Ref, error) {
	return resolveAll(ctx, s.model.hub, s.tokHub)
}

// generateSetup is what a generate stage's inputs resolve to.
type generateSetup struct {
	prompts   []prompt
	intIDs    bool
	model     string // checkpoint folder
	adapter   string // PEFT adapter folder; "" for the model alone
	quantize  string // nf4 or none
	tokenizer string // tokenizer.json
}

// ResumePoint counts the questions an interrupted attempt answered (its
// whole lines; the resume reads them as it does).
func (s *generateStage) ResumePoint(scratch string) string {
	data, _ := os.ReadFile(filepath.Join(scratch, answeredFile))
	if n := bytes.Count(data, []byte("\n")); n > 0 {
		return counted(int64(n), "question", "questions") + " answered"
	}
	return ""
}

func (s *generateStage) Run(ctx context.Context, t *pipeline.Task) error {
	setup, err := s.setup(ctx, t)
	if err != nil {
		return err
	}
	prompts, intIDs := setup.prompts, setup.intIDs
	totalTurns, uncategorized := 0, 0
	for _, q := range prompts {
		totalTurns += len(q.Turns)
		if q.Category == "" {
			uncategorized++
		}
	}
	if uncategorized > 0 {
		// The answers are fine without one; judging them is not.
		t.Log.Warn("questions without a category: FastChat's judge reads each question's category from its question file", "questions", uncategorized, "of", len(prompts))
	}
	tok, err := load(t, setup.tokenizer)
	if err != nil {
		return err
	}
	what := filepath.Base(setup.model)
	if setup.adapter != "" {
		what = "the adapter on " + what
	}
	t.Log.Info("loading the model", "model", setup.model, "adapter", setup.adapter, "quantize", setup.quantize, "tokenizer", setup.tokenizer)
	t.Report(0, int64(totalTurns), "turns", "loading "+what)
	dec, err := trainer.OpenDecoder(trainer.DecoderConfig{Model: setup.model, Adapter: setup.adapter, Quantize: setup.quantize, Backend: s.p.Backend})
	if err != nil {
		return err
	}
	defer dec.Close()
	// The tokenizer and the checkpoint were read by their paths: check that
	// they were the files the key holds.
	if err := t.CheckFiles(s.files...); err != nil {
		return err
	}
	gen, err := converse.New(dec, tok)
	if err != nil {
		return err
	}
	opts := trainer.GenerateOptions{MaxNewTokens: s.p.MaxNewTokens, Temperature: s.p.Temperature, TopK: s.p.TopK, TopP: s.p.TopP, Seed: s.p.Seed}
	// Every first turn's prompt must fit before hours go into the others,
	// and so must every last turn's after empty earlier answers (the
	// shortest they can be). A prompt that fits with less room than
	// max_new_tokens is answered in the room left (replyWithinContext).
	for _, q := range prompts {
		turns := []int{0}
		if n := len(q.Turns); n > 1 {
			turns = append(turns, n-1)
		}
		for _, turn := range turns {
			text, err := turnConversation(q, make([]string, turn)).Prompt()
			if err != nil {
				return fmt.Errorf("question %v: %w", q.ID, err)
			}
			ids, err := gen.Encode(text)
			if err != nil {
				return fmt.Errorf("question %v: %w", q.ID, err)
			}
			if len(ids) >= gen.Context() {
				return contextErr(q, turn, &converse.ContextError{PromptTokens: len(ids), MaxNewTokens: opts.MaxNewTokens, Context: gen.Context()}, true)
			}
		}
	}

	schema := answerSchema(intIDs)
	out, err := t.Output(schema)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Join(t.Dir, AnswersDir), 0o755); err != nil {
		return err
	}
	answerPath := filepath.Join(t.Dir, AnswersDir, s.p.ModelID+".jsonl")
	af, err := os.Create(answerPath)
	if err != nil {
		return err
	}
	defer af.Close()
	aw := bufio.NewWriter(af)
	enc := json.NewEncoder(aw)
	enc.SetEscapeHTML(false)

	// Batches answered by an interrupted attempt at this entry are kept:
	// the same key, so the same questions, batches and draws.
	done, err := openAnswered(t, len(prompts))
	if err != nil {
		return err
	}
	defer done.close()
	kept := 0 // turns
	for _, g := range done.answers {
		kept += len(g.texts)
	}
	if n := len(done.answers); n > 0 {
		t.Log.Info("resuming: the last attempt answered some questions; their whole batches are kept", "questions", n)
	}
	// The rate and ETA time this attempt's answers, not the model's loading
	// nor the kept ones.
	t.StartCount(int64(kept), int64(totalTurns), "turns", "answering")
	started := time.Now()
	// keptTokens are the kept batches': out of this attempt's rate.
	var doneTurns, newTokens, keptTokens, truncated int
	for lo := 0; lo < len(prompts); lo += s.p.BatchSize {
		batch := prompts[lo:min(lo+s.p.BatchSize, len(prompts))]
		answers, ok := done.batch(lo, batch)
		if ok {
			for _, a := range answers {
				doneTurns += len(a.texts)
				for k, n := range a.tokens {
					keptTokens += int(n)
					if a.truncated[k] {
						truncated++
					}
				}
			}
		}
		for turn := 0; !ok; turn++ {
			var convs []converse.Conversation
			var which []int
			for i, q := range batch {
				if turn < len(q.Turns) {
					convs = append(convs, turnConversation(q, answers[i].texts))
					which = append(which, i)
				}
			}
			if len(convs) == 0 {
				break
			}
			// Each question and turn draws from a stream of its own, so
			// that sampled answers do not depend on the batching either.
			o := opts
			for _, i := range which {
				o.Streams = append(o.Streams, uint64(lo+i)<<20|uint64(turn))
			}
			replies, err := replyWithinContext(ctx, gen, convs, o)
			var ce *converse.ContextError
			if errors.As(err, &ce) {
				return contextErr(batch[which[ce.Conversation]], turn, ce, false)
			}
			if err != nil {
				return err
			}
			for k, r := range replies {
				a := &answers[which[k]]
				a.texts = append(a.texts, r.Text)
				a.tokens = append(a.tokens, int32(len(r.Tokens)))
				a.truncated = append(a.truncated, !r.Stopped)
				newTokens += len(r.Tokens)
				if !r.Stopped {
					truncated++
				}
			}
			doneTurns += len(convs)
			rate := float64(newTokens) / time.Since(started).Seconds()
			t.Report(int64(doneTurns), int64(totalTurns), "turns", fmt.Sprintf("%.1f tokens/s", rate))
		}
		if !ok {
			if err := done.add(lo, answers); err != nil {
				return err
			}
		}
		rec := answerRecord(schema, batch, answers)
		err := out.Write(rec)
		rec.Release()
		if err != nil {
			return err
		}
		for i, q := range batch {
			if err := enc.Encode(answerLine(q, answers[i].texts, s.p.ModelID, time.Now())); err != nil {
				return err
			}
		}
	}
	if err := aw.Flush(); err != nil {
		return err
	}
	if err := af.Close(); err != nil {
		return err
	}
	secs := time.Since(started).Seconds()
	t.SetStat("questions", len(prompts))
	t.SetStat("turns", totalTurns)
	t.SetStat("new_tokens", newTokens+keptTokens)
	t.SetStat("truncated_turns", truncated)
	t.SetStat("tokens_per_second", float64(newTokens)/secs) // this attempt's
	t.SetStat("generate_seconds", secs)
	t.SetStat("model_id", s.p.ModelID)
	t.SetStat("quantize", setup.quantize)
	t.SetStat("adapter", setup.adapter != "")
	t.SetStat("answer_file", filepath.Join(AnswersDir, s.p.ModelID+".jsonl"))
	return nil
}

// replyWithinContext answers convs as gen.Reply does, except that a turn
// whose prompt, grown by the model's own earlier answers, leaves less room
// than max_new_tokens is answered in the room left, as chat and
// transformers' generate do, and so marked truncated (no stop ended it),
// where Reply would refuse the batch. Each conversation keeps its stream,
// so the answers are those of any batching.
func replyWithinContext(ctx context.Context, gen *converse.Generator, convs []converse.Conversation, o trainer.GenerateOptions) ([]converse.Reply, error) {
	replies, err := gen.Reply(ctx, convs, o, nil)
	var ce *converse.ContextError
	if !errors.As(err, &ce) || ce.PromptTokens >= ce.Context {
		return replies, err
	}
	i := ce.Conversation
	alone, rest := o, o
	alone.MaxNewTokens = ce.Context - ce.PromptTokens
	if len(o.Streams) == len(convs) {
		alone.Streams = o.Streams[i : i+1]
		rest.Streams = slices.Concat(o.Streams[:i], o.Streams[i+1:])
	}
	cut, err := gen.Reply(ctx, convs[i:i+1], alone, nil)
	if err != nil {
		return nil, err
	}
	others, err := replyWithinContext(ctx, gen, slices.Concat(convs[:i], convs[i+1:]), rest)
	if err != nil {
		return nil, err
	}
	return slices.Insert(others, i, cut[0]), nil
}

// contextErr says which turn's prompt does not fit the context and what
// would make it fit; upFront says that the check came before any answer,
// with every earlier answer taken as empty. (A prompt that fits with less
// room than max_new_tokens is answered in the room left.)
func contextErr(q prompt, turn int, ce *converse.ContextError, upFront bool) error {
	note, fix := "", "shorten the question" // no answer of the model's is in the prompt
	switch {
	case upFront && turn > 0:
		note = " with every earlier answer empty"
	case turn > 0: // the model's own earlier answers filled the context
		fix = "lower max_new_tokens, which the model's earlier answers in the prompt took, or shorten the questions"
	}
	return fmt.Errorf("question %v, turn %d%s: %w; %s", q.ID, turn+1, note, ce, fix)
}

// setup tells the stage's needs apart and resolves the model, adapter,
// quantisation and tokenizer they and the parameters name.
func (s *generateStage) setup(ctx context.Context, t *pipeline.Task) (*generateSetup, error) {
	var src, qlora, merge, modelIn *pipeline.Input
	for _, in := range t.Inputs {
		var slot **pipeline.Input
		switch in.Kind {
		case "qlora":
			slot = &qlora
		case mergeKindName:
			slot = &merge
		case modelKindName:
			slot = &modelIn
		default:
			slot = &src
		}
		if *slot != nil {
			return nil, fmt.Errorf("stages %s and %s both in needs; a generate stage takes one source of questions, and one model: a qlora stage (with its base), a merge stage or a model stage",
				(*slot).Name, in.Name)
		}
		*slot = in
	}
	if src == nil {
		return nil, fmt.Errorf("no questions: add a source stage to needs (mt_bench for MT-Bench questions, or jsonl or parquet for single instructions)")
	}
	// The questions first: a source that holds none fails before a model
	// is looked for.
	st := &generateSetup{quantize: s.p.Quantize}
	var err error
	if st.prompts, st.intIDs, err = readPrompts(ctx, src, s.p.System); err != nil {
		return nil, err
	}
	given := s.model.set()
	if merge != nil && (qlora != nil || modelIn != nil || given) {
		return nil, fmt.Errorf("stage %s (merge) holds a whole model, its adapter merged in; give either it, or a qlora stage with its base, not both", merge.Name)
	}
	if modelIn != nil && given {
		return nil, fmt.Errorf("two base models (model: %s, and stage %s); give one", s.model.param, modelIn.Name)
	}
	var prov provenance
	switch {
	case qlora != nil:
		dir, err := qlora.Dir(ctx)
		if err != nil {
			return nil, err
		}
		st.adapter = filepath.Join(dir, trainer.AdapterDirName)
		lineage, err := qlora.Lineage(ctx)
		if err != nil {
			return nil, err
		}
		prov = provenanceOf(lineage)
		if st.model, err = adapterBase(ctx, t, qlora.Name, prov, modelIn, &s.model, s.p.OtherBase); err != nil {
			return nil, otherBaseHint(err)
		}
		if st.quantize == "auto" && params(prov.qlora)["quantize"] == "nf4" {
			st.quantize = "nf4"
		}
	case merge != nil:
		dir, err := merge.Dir(ctx)
		if err != nil {
			return nil, err
		}
		st.model = filepath.Join(dir, MergedModelDir)
	case modelIn != nil:
		if st.model, err = modelIn.Dir(ctx); err != nil {
			return nil, err
		}
	case given:
		if st.model, err = s.model.path(ctx, t); err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("no model: add a qlora, merge or model stage to needs, or set `model:` to a checkpoint folder")
	}
	if st.quantize == "auto" {
		st.quantize = "none"
	}
	if st.tokenizer, err = adapterTokenizer(ctx, t, prov, st.model, s.tokenizer, s.tokHub); err != nil {
		return nil, err
	}
	return st, nil
}

// prompt is one question to answer: one turn for a single instruction,
// several for an MT-Bench question.
type prompt struct {
	ID       any // int64 or string
	Category string
	System   string
	Turns    []string
}

// turnConversation is question q asked up to the turn after answers: the
// earlier turns with the model's own answers to them, then the next turn.
func turnConversation(q prompt, answers []string) converse.Conversation {
	return converse.Conversation{System: q.System, Turns: q.Turns[:len(answers)+1], Answers: answers}
}

// readPrompts reads the questions of a source: the turns of MT-Bench
// questions (question_id, category, turns), or single instructions from
// an Alpaca-style table (instruction, then a blank line and the input when
// there is one, as the chat_template stage builds the user turn; the
// question_id is the row's number from 1). system, when not empty, is the
// system text of every question; else a system column gives it. intIDs
// says the ids are integers.
func readPrompts(ctx context.Context, in *pipeline.Input, system string) (qs []prompt, intIDs bool, err error) {
	intIDs = true
	row := int64(0)
	err = eachBatch(ctx, in, func(rec arrow.RecordBatch) error {
		sch := rec.Schema()
		col := func(name string) arrow.Array {
			if idx := sch.FieldIndices(name); len(idx) == 1 {
				return rec.Column(idx[0])
			}
			return nil
		}
		strCol := func(name string) (*array.String, error) {
			c := col(name)
			if c == nil {
				return nil, nil
			}
			s, ok := c.(*array.String)
			if !ok {
				return nil, fmt.Errorf("column %q of stage %s is %s, want utf8", name, in.Name, c.DataType())
			}
			return s, nil
		}
		idCol, turnsCol, instrCol := col(dataset.ColQuestionID), col(dataset.ColTurns), col(dataset.ColInstruction)
		if turnsCol == nil && instrCol == nil {
			var names []string
			for _, f := range sch.Fields() {
				names = append(names, f.Name)
			}
			return fmt.Errorf("stage %s (%s) has the columns %s; a generate stage asks the %q of MT-Bench questions (an %s stage) or the %q and %q of a jsonl or parquet stage",
				in.Name, in.Kind, strings.Join(names, ", "), dataset.ColTurns, questionsKindName, dataset.ColInstruction, dataset.ColInput)
		}
		if idCol != nil {
			if _, ok := idCol.(*array.String); ok {
				intIDs = false
			}
		}
		category, err := strCol(dataset.ColCategory)
		if err != nil {
			return err
		}
		sys, err := strCol(dataset.ColSystem)
		if err != nil {
			return err
		}
		var turns *array.List
		var turnText *array.String
		var instr, input *array.String
		if turnsCol != nil {
			l, ok := turnsCol.(*array.List)
			if ok {
				turnText, ok = l.ListValues().(*array.String)
			}
			if !ok {
				return fmt.Errorf("column %q of stage %s is %s, want list<utf8>", dataset.ColTurns, in.Name, turnsCol.DataType())
			}
			turns = l
		} else {
			if instr, err = strCol(dataset.ColInstruction); err != nil {
				return err
			}
			if input, err = strCol(dataset.ColInput); err != nil {
				return err
			}
		}
		for i := 0; i < int(rec.NumRows()); i++ {
			row++
			q := prompt{ID: row, System: system}
			if idCol != nil {
				if q.ID, err = dataset.QuestionIDAt(idCol, i); err != nil {
					return fmt.Errorf("stage %s: %w", in.Name, err)
				}
			}
			if category != nil {
				q.Category = category.Value(i)
			}
			if q.System == "" && sys != nil {
				q.System = sys.Value(i)
			}
			if turns != nil {
				lo, hi := turns.ValueOffsets(i)
				for j := lo; j < hi; j++ {
					q.Turns = append(q.Turns, turnText.Value(int(j)))
				}
			} else {
				text := instr.Value(i)
				if input != nil && input.Value(i) != "" {
					text += "\n\n" + input.Value(i)
				}
				q.Turns = []string{text}
			}
			if len(q.Turns) == 0 || strings.TrimSpace(q.Turns[0]) == "" {
				return fmt.Errorf("stage %s, row %d (question %v): no question to ask", in.Name, row, q.ID)
			}
			qs = append(qs, q)
		}
		return nil
	})
	if err == nil && len(qs) == 0 {
		err = fmt.Errorf("stage %s has no rows: nothing to answer", in.Name)
	}
	return qs, intIDs, err
}

// generated is one question's answers, turn by turn.
type generated struct {
	texts     []string
	tokens    []int32
	truncated []bool
}

// answered keeps, in the stage's scratch folder, the answers of each batch
// as it is done, one JSON line per question, so that an interrupted stage
// (a signal, a lost machine) resumes after its last whole batch.
type answered struct {
	f       *os.File
	answers map[int]generated // by question index
}

type answeredLine struct {
	Question  int      `json:"question"`
	Texts     []string `json:"texts"`
	Tokens    []int32  `json:"tokens"`
	Truncated []bool   `json:"truncated"`
}

const answeredFile = "answered.jsonl"

func openAnswered(t *pipeline.Task, questions int) (*answered, error) {
	dir, err := t.Scratch()
	if err != nil {
		return nil, err
	}
	path := filepath.Join(dir, answeredFile)
	a := &answered{answers: map[int]generated{}}
	data, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	valid := 0 // bytes of whole lines: a torn last line is dropped
	for _, line := range bytes.SplitAfter(data, []byte("\n")) {
		var l answeredLine
		if !bytes.HasSuffix(line, []byte("\n")) || json.Unmarshal(line, &l) != nil ||
			l.Question < 0 || l.Question >= questions || len(l.Tokens) != len(l.Texts) || len(l.Truncated) != len(l.Texts) {
			break
		}
		a.answers[l.Question] = generated{texts: l.Texts, tokens: l.Tokens, truncated: l.Truncated}
		valid += len(line)
	}
	if a.f, err = os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644); err != nil {
		return nil, err
	}
	if err := a.f.Truncate(int64(valid)); err != nil {
		a.f.Close()
		return nil, err
	}
	if _, err := a.f.Seek(int64(valid), io.SeekStart); err != nil {
		a.f.Close()
		return nil, err
	}
	return a, nil
}

// batch returns the answers of the questions of batch, the first at lo,
// when all were kept whole (an answer a turn).
func (a *answered) batch(lo int, batch []prompt) ([]generated, bool) {
	out := make([]generated, len(batch))
	for i, q := range batch {
		g, ok := a.answers[lo+i]
		if !ok || len(g.texts) != len(q.Turns) {
			return make([]generated, len(batch)), false
		}
		out[i] = g
	}
	return out, true
}

// add keeps a batch's answers, synced, before the stage goes on.
func (a *answered) add(lo int, answers []generated) error {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	for i, g := range answers {
		if err := enc.Encode(answeredLine{Question: lo + i, Texts: g.texts, Tokens: g.tokens, Truncated: g.truncated}); err != nil {
			return err
		}
	}
	if _, err := a.f.Write(buf.Bytes()); err != nil {
		return err
	}
	return a.f.Sync()
}

func (a *answered) close() { a.f.Close() }

// answerSchema is the generate stage's table: the questions and, turn by
// turn, the model's answers, their length in tokens (the stop token
// included) and whether max_new_tokens cut them.
func answerSchema(intIDs bool) *arrow.Schema {
	id := arrow.DataType(arrow.BinaryTypes.String)
	if intIDs {
		id = arrow.PrimitiveTypes.Int64
	}
	return arrow.NewSchema([]arrow.Field{
		{Name: dataset.ColQuestionID, Type: id},
		{Name: dataset.ColCategory, Type: arrow.BinaryTypes.String},
		{Name: dataset.ColTurns, Type: arrow.ListOf(arrow.BinaryTypes.String)},
		{Name: "answers", Type: arrow.ListOf(arrow.BinaryTypes.String)},
		{Name: "answer_tokens", Type: arrow.ListOf(arrow.PrimitiveTypes.Int32)},
		{Name: "truncated", Type: arrow.ListOf(arrow.FixedWidthTypes.Boolean)},
	}, nil)
}

func answerRecord(schema *arrow.Schema, qs []prompt, as []generated) arrow.RecordBatch {
	b := array.NewRecordBuilder(memory.NewGoAllocator(), schema)
	defer b.Release()
	cat := b.Field(1).(*array.StringBuilder)
	lists := func(f int) (*array.ListBuilder, array.Builder) {
		l := b.Field(f).(*array.ListBuilder)
		return l, l.ValueBuilder()
	}
	turns, tv := lists(2)
	answers, av := lists(3)
	toks, kv := lists(4)
	trunc, rv := lists(5)
	for i, q := range qs {
		dataset.AppendQuestionID(b.Field(0), q.ID)
		cat.Append(q.Category)
		turns.Append(true)
		for _, s := range q.Turns {
			tv.(*array.StringBuilder).Append(s)
		}
		answers.Append(true)
		for _, s := range as[i].texts {
			av.(*array.StringBuilder).Append(s)
		}
		toks.Append(true)
		kv.(*array.Int32Builder).AppendValues(as[i].tokens, nil)
		trunc.Append(true)
		rv.(*array.BooleanBuilder).AppendValues(as[i].truncated, nil)
	}
	return b.NewRecordBatch()
}

// Answer is one line of an MT-Bench answer file, as FastChat's
// gen_model_answer.py writes it and its judge (gen_judgment.py) reads it:
// the judge looks answers up by question_id and reads
// choices[0].turns[i].
type Answer struct {
	QuestionID any            `json:"question_id"`
	AnswerID   string         `json:"answer_id"`
	ModelID    string         `json:"model_id"`
	Choices    []AnswerChoice `json:"choices"`
	Tstamp     float64        `json:"tstamp"`
}

// AnswerChoice is one sampled conversation: the model's answer to each
// turn.
type AnswerChoice struct {
	Index int      `json:"index"`
	Turns []string `json:"turns"`
}

func answerLine(q prompt, answers []string, modelID string, at time.Time) Answer {
	return Answer{
		QuestionID: q.ID, AnswerID: answerID(modelID, q.ID, answers), ModelID: modelID,
		Choices: []AnswerChoice{{Index: 0, Turns: answers}},
		Tstamp:  float64(at.UnixNano()) / 1e9,
	}
}

// shortUUIDAlphabet is the alphabet of the shortuuid package FastChat
// draws answer ids from (22 characters, no look-alikes).
const shortUUIDAlphabet = "23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"

// answerID is an id of the shape FastChat's answer ids have, derived from
// what the answer is rather than drawn at random, so that equal answers
// carry equal ids.
func answerID(modelID string, qid any, answers []string) string {
	h := sha256.New()
	id, _ := json.Marshal(qid)
	fmt.Fprintf(h, "%s\x00%s", modelID, id)
	for _, a := range answers {
		fmt.Fprintf(h, "\x00%s", a)
	}
	n := new(big.Int).SetBytes(h.Sum(nil)[:16])
	base := big.NewInt(int64(len(shortUUIDAlphabet)))
	out := make([]byte, 22)
	for i := range out {
		var r big.Int
		n.DivMod(n, base, &r)
		out[len(out)-1-i] = shortUUIDAlphabet[r.Int64()]
	}
	return string(out)
}
