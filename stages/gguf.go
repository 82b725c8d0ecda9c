package stages

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"

	"gemmaft/gguf"
	"gemmaft/internal/atomicfile"
	"gemmaft/pipeline"
)

const ggufKindName = "gguf"

func init() { kinds[ggufKindName] = ggufKind{} }

// ggufKind converts a Hugging Face Gemma 3 checkpoint (a merge stage's, a
// model stage's, or a folder) into a GGUF file for llama.cpp and Ollama,
// with an Ollama Modelfile and a model card beside it.
type ggufKind struct{}

type ggufParams struct {
	// Model is a checkpoint folder to convert, when no merge or model stage
	// is among the needs.
	Model string `json:"model,omitempty"`
	// Type is a llama.cpp file type this package writes: q8_0, q4_k_m,
	// f16, … (gguf.FileTypeNames).
	Type string `json:"type"`
	// Name is the model's name: the file's general.name and its file name.
	Name string `json:"name"`
	// BaseModel, Datasets and Language are for the model card's header:
	// the Hub ids of the base model and the data, and ISO 639-1 codes.
	BaseModel string   `yaml:"base_model" json:"base_model,omitempty"`
	Datasets  []string `json:"datasets,omitempty"`
	Language  []string `json:"language,omitempty"`
}

var ggufName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]*$`)

// Version 2: files are typed tensor by tensor as llama-quantize types them
// (a q4_0 file's embedding is q6_K where its rows fill q6_K blocks).
// Version 3: the vocabulary's runs of spaces are written with spaces, as
// llama.cpp prints them.
func (ggufKind) Version() int       { return 3 }
func (ggufKind) Inputs() (int, int) { return 0, 1 }
func (ggufKind) Params() any        { return &ggufParams{Type: "q8_0", Name: "model"} }

func (p *ggufParams) Validate() error {
	typ, err := gguf.ParseFileType(p.Type)
	if err != nil {
		return &pipeline.ParamError{Param: "type", Msg: strings.TrimPrefix(err.Error(), "gguf: "),
			Fix: "use q8_0 (near-lossless, half of bf16's size), q6_k, q5_k_m, q4_k_m (under a third), f16 or bf16"}
	}
	p.Type = typ.String() // Q8_0 keys as q8_0
	if !ggufName.MatchString(p.Name) {
		return &pipeline.ParamError{Param: "name", Msg: fmt.Sprintf("%q is not a file name", p.Name), Fix: "letters, digits, '.', '_' and '-'"}
	}
	return nil
}

func (ggufKind) Prepare(params any, dir string) (pipeline.Runner, error) {
	p := params.(*ggufParams)
	m, err := modelParam(p.Model, dir, "point model at a Hugging Face Gemma 3 checkpoint folder")
	if err != nil {
		return nil, err
	}
	s := &ggufStage{p: p, model: m, files: m.files}
	// The tokenizer goes into the file, so it is part of what made it (of
	// an hf:// model, the commit holds it).
	for _, f := range []string{"tokenizer.json", "tokenizer_config.json"} {
		if _, err := os.Stat(filepath.Join(m.dir, f)); m.dir != "" && err == nil {
			s.files = append(s.files, filepath.Join(m.dir, f))
		}
	}
	return s, nil
}

type ggufStage struct {
	p     *ggufParams
	model modelArg
	files []string
}

func (s *ggufStage) Files() []string { return s.files }

func (s *ggufStage) Resolve(ctx context.Context) ([]pipeline.Ref, error) {
	return resolveAll(ctx, s.model.hub)
}

func (s *ggufStage) Run(ctx context.Context, t *pipeline.Task) error {
	model, err := s.model.path(ctx, t)
	if err != nil {
		return err
	}
	// The model is `model:` or the one stage in needs (CheckInputs).
	var lineage []*pipeline.Manifest
	var from *pipeline.Input
	for _, in := range t.Inputs {
		from = in
		dir, err := in.Dir(ctx)
		if err != nil {
			return err
		}
		model = dir
		if in.Kind == mergeKindName {
			model = filepath.Join(dir, MergedModelDir)
		}
		if lineage, err = in.Lineage(ctx); err != nil {
			return err
		}
	}
	if err := tokenizerConfigFor(t, model, from, lineage); err != nil {
		return err
	}
	typ, _ := gguf.ParseFileType(s.p.Type)
	file := s.p.Name + "." + typ.String() + ".gguf"
	t.Report(0, 0, "tensors", "converting to "+file)
	progress := func(done, total int) { t.Report(int64(done), int64(total), "tensors", "converting to "+file) }
	if err := gguf.Gemma3(ctx, model, filepath.Join(t.Dir, file), gguf.Options{Type: typ, Name: s.p.Name, Progress: progress}); err != nil {
		return err
	}
	p := provenanceOf(lineage)
	mf, err := gguf.Modelfile(gguf.ModelfileOptions{GGUF: file, System: p.trainingSystem(), ModelDir: model})
	if err != nil {
		return err
	}
	if err := atomicfile.WriteFile(filepath.Join(t.Dir, "Modelfile"), []byte(mf)); err != nil {
		return err
	}
	card := modelCard{
		Title: s.p.Name,
		Format: fmt.Sprintf("A GGUF file (%s) for llama.cpp and Ollama: `llama-cli -m %s -cnv`, or "+
			"`ollama create %s -f Modelfile`", typ, file, s.p.Name),
		Files: []cardFile{
			{file, fmt.Sprintf("the model for llama.cpp (gemma3), %s", typ)},
			{"Modelfile", "Ollama: the file, Gemma 3's turns as training rendered them, <end_of_turn> as stop"},
			{"README.md", "this card"}, {"NOTICE", "the Gemma Terms of Use notice"},
		},
		Tags:       []string{"gguf", "llama.cpp", "ollama"},
		cardParams: cardParams{s.p.BaseModel, s.p.Datasets, s.p.Language},
	}
	if err := card.write(t.Dir, lineage); err != nil {
		return err
	}
	st, err := os.Stat(filepath.Join(t.Dir, file))
	if err != nil {
		return err
	}
	t.SetStat("type", typ.String())
	t.SetStat("bytes", st.Size())
	return nil
}

// tokenizerConfigFor checks that the checkpoint to convert has the
// tokenizer_config.json the GGUF's special tokens and chat template come
// from. A merge stage copies it from the folder of the tokenizer training
// read; where that folder lacked it, the fix is there, then a new merge.
func tokenizerConfigFor(t *pipeline.Task, model string, from *pipeline.Input, lineage []*pipeline.Manifest) error {
	if _, err := os.Stat(filepath.Join(model, "tokenizer_config.json")); err == nil {
		return nil
	}
	if from == nil || from.Kind != mergeKindName {
		return nil // the converter says what the folder lacks
	}
	where := "the folder of the tokenizer.json training read"
	if f, ok := tokenizerRecord(provenanceOf(lineage).tokenize); ok {
		where = filepath.Dir(f.Path)
		if dir := inputDir(t, f); dir != "" {
			where = dir // this run's copy, as merge took it
		}
	}
	return fmt.Errorf("stage %s merged a model without tokenizer_config.json (special tokens and the chat template), because %s has none: "+
		"put the model's tokenizer_config.json there, then run again with --force %s", from.Name, where, from.Name)
}
