package stages

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"

	"gemmaft/internal/dirsum"
	"gemmaft/pipeline"
	"gemmaft/trainer"
)

const mergeKindName = "merge"

func init() { kinds[mergeKindName] = mergeKind{} }

// MergedModelDir is the folder of a merge stage's entry that holds the
// merged Hugging Face checkpoint.
const MergedModelDir = "model"

// mergeKind merges a qlora stage's adapter into its base checkpoint and
// writes the result as a Hugging Face checkpoint folder with a model card.
type mergeKind struct{}

type mergeParams struct {
	// Model is the base checkpoint folder; leave it empty when a model
	// stage is among the needs.
	Model string `json:"model,omitempty"`
	// Base is dequantized (the NF4 round trip of the weights, which the
	// adapter was trained against) or original.
	Base string `json:"base"`
	// MaxShardGB splits the weights into shards of at most this size.
	MaxShardGB float64 `yaml:"max_shard_gb" json:"max_shard_gb"`
	// BaseModel, Datasets and Language are for the model card's header:
	// the Hub ids of the base model and the data, and ISO 639-1 codes.
	BaseModel string   `yaml:"base_model" json:"base_model,omitempty"`
	Datasets  []string `json:"datasets,omitempty"`
	Language  []string `json:"language,omitempty"`
}

func (mergeKind) Version() int       { return 1 }
func (mergeKind) Inputs() (int, int) { return 1, 2 }
func (mergeKind) Params() any {
	return &mergeParams{Base: string(trainer.MergeDequantized), MaxShardGB: 5}
}

func (p *mergeParams) Validate() error {
	switch trainer.MergeBase(p.Base) {
	case trainer.MergeDequantized, trainer.MergeOriginal:
	default:
		return &pipeline.ParamError{Param: "base", Msg: fmt.Sprintf("unknown %q", p.Base),
			Fix: "use dequantized (the weights a QLoRA adapter was trained against) or original"}
	}
	if !(p.MaxShardGB > 0) {
		return &pipeline.ParamError{Param: "max_shard_gb", Msg: "must be positive", Fix: "5 is what the Hub and transformers use"}
	}
	return nil
}

func (mergeKind) Prepare(params any, dir string) (pipeline.Runner, error) {
	p := params.(*mergeParams)
	m, err := modelParam(p.Model, dir, "point model at the checkpoint folder the adapter was trained on")
	if err != nil {
		return nil, err
	}
	return &mergeStage{p: p, model: m}, nil
}

type mergeStage struct {
	p     *mergeParams
	model modelArg
}

func (s *mergeStage) Files() []string { return s.model.files }

// UpstreamFiles are the files that ship with the merged model beside its
// weights, from folders whose other files alone are keyed: the tokenizer
// files and generation_config.json of the base folder (`model:`, or the
// one training read), and the tokenizer files beside the tokenizer.json
// the tokenize stage read. An edited chat template is then a new merge,
// not yesterday's served from the cache.
func (s *mergeStage) UpstreamFiles(upstream []pipeline.UpstreamStage) []string {
	var dirs []string
	if len(s.model.files) > 0 {
		dirs = append(dirs, filepath.Dir(s.model.files[0]))
	}
	for _, st := range upstream {
		for _, f := range st.Files {
			if st.Kind == "qlora" && filepath.Base(f) == "config.json" || st.Kind == tokenizeKindName && filepath.Base(f) == "tokenizer.json" {
				dirs = append(dirs, filepath.Dir(f))
			}
		}
	}
	var files []string
	for _, dir := range dirs {
		for _, name := range append(slices.Clone(trainer.TokenizerFiles), "generation_config.json") {
			p := filepath.Join(dir, name)
			if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && !slices.Contains(files, p) {
				files = append(files, p)
			}
		}
	}
	return files
}

func (s *mergeStage) Resolve(ctx context.Context) ([]pipeline.Ref, error) {
	return resolveAll(ctx, s.model.hub)
}

func (s *mergeStage) Run(ctx context.Context, t *pipeline.Task) error {
	// Merged into another base than its own, the adapter would make a
	// model nobody trained.
	adapterEntry, lineage, model, err := adapterInputs(ctx, t, &s.model)
	if err != nil {
		return err
	}
	base := trainer.MergeBase(s.p.Base)
	if q := params(provenanceOf(lineage).qlora); q["quantize"] == "none" && base == trainer.MergeDequantized {
		// The adapter never saw NF4 weights; its base is the original.
		t.Log.Info("the adapter was trained on the unquantised base (quantize: none); merging into the original weights")
		base = trainer.MergeOriginal
	}
	// The base's own tokenizer ships when it has one; a model stage's random
	// checkpoint has none, and the tokenize stage's is the one training used
	// (an hf:// one fetched only then).
	tokDir, err := trainingTokenizer(t, provenanceOf(lineage).tokenize)
	if err != nil {
		return err
	}
	if tokDir == "" && !trainer.ShipsOwnTokenizer(model) {
		tok, err := hubTrainingTokenizer(ctx, t, provenanceOf(lineage).tokenize, true)
		if err != nil {
			return err
		}
		if tok != "" {
			tokDir = filepath.Dir(tok)
		}
	}
	out := filepath.Join(t.Dir, MergedModelDir)
	t.Report(0, 1, "models", "merging "+filepath.Base(model))
	err = trainer.MergeAdapter(ctx, model, filepath.Join(adapterEntry, trainer.AdapterDirName), out, trainer.MergeOptions{
		Base: base, TokenizerDir: tokDir, MaxShardBytes: int64(s.p.MaxShardGB * 1e9),
	})
	if err != nil {
		return err
	}
	t.Report(1, 1, "models", "merged")
	files, size, err := listFiles(out)
	if err != nil {
		return err
	}
	card := modelCard{Title: t.Name, Format: "Weights in bfloat16 safetensors; transformers and vLLM load the folder as it is",
		Files: files, Tags: []string{"merged"}, Merge: string(base), cardParams: cardParams{s.p.BaseModel, s.p.Datasets, s.p.Language}}
	if err := card.write(out, lineage); err != nil {
		return err
	}
	t.SetStat("base", string(base))
	t.SetStat("bytes", size)
	return nil
}

// listFiles describes a merged checkpoint's files for its card.
func listFiles(dir string) ([]cardFile, int64, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, 0, err
	}
	what := map[string]string{
		"config.json":                  "the model's configuration",
		"generation_config.json":       "generation defaults (stop tokens)",
		"model.safetensors":            "the weights",
		"model.safetensors.index.json": "which shard holds each weight",
		"tokenizer.json":               "the Gemma 3 tokenizer",
		"tokenizer_config.json":        "tokenizer settings and the chat template",
		"chat_template.jinja":          "the chat template",
	}
	var files []cardFile
	var size int64
	for _, e := range ents {
		info, err := e.Info()
		if err != nil {
			return nil, 0, err
		}
		size += info.Size()
		w := what[e.Name()]
		if w == "" && filepath.Ext(e.Name()) == ".safetensors" {
			w = "a shard of the weights"
		}
		if w == "" {
			w = "from the base checkpoint"
		}
		files = append(files, cardFile{e.Name(), w})
	}
	files = append(files, cardFile{"README.md", "this card"}, cardFile{"NOTICE", "the Gemma Terms of Use notice"})
	return files, size, nil
}

// trainingTokenizer is the folder of the tokenizer.json a tokenize stage
// used, checked to hold the same file still; "" without such a stage. The
// manifest names the file where the run that tokenized found it, which may
// have been another checkout sharing the cache: the same file (by digest)
// among this run's inputs is taken first, the recorded path then.
func trainingTokenizer(t *pipeline.Task, tokenize *pipeline.Manifest) (string, error) {
	f, ok := tokenizerRecord(tokenize)
	if !ok {
		return "", nil
	}
	if dir := inputDir(t, f); dir != "" {
		return dir, nil
	}
	return recordedTokenizer(tokenize, f)
}

// recordedTokenizer is the folder of f, the tokenizer.json the manifest of
// stage tokenize records, checked to hold that file still.
func recordedTokenizer(tokenize *pipeline.Manifest, f pipeline.FileRef) (string, error) {
	sum, err := dirsum.FileSum(f.Path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return "", fmt.Errorf("the tokenizer training used is gone: stage %s tokenized the training data with %s (sha256 %s), which no longer exists, and no input file of this run has that content; point stage %s's tokenizer at a copy of that file",
			tokenize.Stage, f.Path, f.SHA256, tokenize.Stage)
	case err != nil:
		return "", fmt.Errorf("the tokenizer training used: %w", err)
	case sum != f.SHA256:
		return "", fmt.Errorf("%s changed since stage %s tokenized the training data; the merged model would ship another tokenizer", f.Path, tokenize.Stage)
	}
	return filepath.Dir(f.Path), nil
}

// tokenizerRecord is the local tokenizer.json a tokenize stage's manifest
// records, if it read one (not an hf:// reference).
func tokenizerRecord(tokenize *pipeline.Manifest) (pipeline.FileRef, bool) {
	if tokenize != nil {
		for _, f := range tokenize.Files {
			if filepath.Base(f.Path) == "tokenizer.json" {
				return f, true
			}
		}
	}
	return pipeline.FileRef{}, false
}
