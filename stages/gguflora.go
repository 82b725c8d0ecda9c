package stages

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"gemmaft/gguf"
	"gemmaft/pipeline"
	"gemmaft/trainer"
)

const ggufLoRAKindName = "gguf_lora"

func init() { kinds[ggufLoRAKindName] = ggufLoRAKind{} }

// ggufLoRAKind writes a qlora stage's adapter as a GGUF LoRA file, which
// llama.cpp applies to a GGUF of the base the adapter was trained on
// (llama-cli --lora; llama-server loads several and switches between
// them): a nightly retrain ships its adapter, not a new model file.
type ggufLoRAKind struct{}

type ggufLoRAParams struct {
	// Model is the base checkpoint folder (or hf://); leave it empty when
	// a model stage is among the needs. Only its shapes are read.
	Model string `json:"model,omitempty"`
	// Type is the adapter's matrices' type: f32, f16 or bf16.
	Type string `json:"type"`
	// Name is the file's general.name and its file name.
	Name string `json:"name"`
}

func (ggufLoRAKind) Version() int       { return 1 }
func (ggufLoRAKind) Inputs() (int, int) { return 1, 2 }
func (ggufLoRAKind) Params() any        { return &ggufLoRAParams{Type: "f32", Name: "adapter"} }

func (p *ggufLoRAParams) Validate() error {
	typ, err := gguf.ParseFileType(p.Type)
	if err == nil && typ != gguf.AllF32 && typ != gguf.MostlyF16 && typ != gguf.MostlyBF16 {
		err = fmt.Errorf("%s is a model's type; a LoRA adapter is written in f32, f16 or bf16 (llama.cpp applies it to a base of any type)", p.Type)
	}
	if err != nil {
		return &pipeline.ParamError{Param: "type", Msg: strings.TrimPrefix(err.Error(), "gguf: "),
			Fix: "use f32 (the adapter as trained), f16 or bf16 (half the size)"}
	}
	p.Type = typ.String()
	if !ggufName.MatchString(p.Name) {
		return &pipeline.ParamError{Param: "name", Msg: fmt.Sprintf("%q is not a file name", p.Name), Fix: "letters, digits, '.', '_' and '-'"}
	}
	return nil
}

func (ggufLoRAKind) Prepare(params any, dir string) (pipeline.Runner, error) {
	p := params.(*ggufLoRAParams)
	m, err := modelParam(p.Model, dir, "point model at the checkpoint folder the adapter was trained on")
	if err != nil {
		return nil, err
	}
	return &ggufLoRAStage{p: p, model: m}, nil
}

type ggufLoRAStage struct {
	p     *ggufLoRAParams
	model modelArg
}

func (s *ggufLoRAStage) Files() []string { return s.model.files }

func (s *ggufLoRAStage) Resolve(ctx context.Context) ([]pipeline.Ref, error) {
	return resolveAll(ctx, s.model.hub)
}

func (s *ggufLoRAStage) Run(ctx context.Context, t *pipeline.Task) error {
	// llama.cpp applies the file to a GGUF of the base, which must be the
	// one the adapter was trained on.
	entry, _, base, err := adapterInputs(ctx, t, &s.model)
	if err != nil {
		return err
	}
	typ, _ := gguf.ParseFileType(s.p.Type)
	file := s.p.Name + "." + typ.String() + ".gguf"
	t.Report(0, 1, "files", "writing "+file)
	if err := gguf.Gemma3LoRA(ctx, base, filepath.Join(entry, trainer.AdapterDirName), filepath.Join(t.Dir, file), gguf.LoRAOptions{Type: typ, Name: s.p.Name}); err != nil {
		return err
	}
	t.Report(1, 1, "files", "written")
	st, err := os.Stat(filepath.Join(t.Dir, file))
	if err != nil {
		return err
	}
	t.Log.Info("llama.cpp applies it to a GGUF of the base: llama-cli -m BASE.gguf --lora " + file)
	t.SetStat("type", typ.String())
	t.SetStat("bytes", st.Size())
	return nil
}
