package stages

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"

	"gemmaft/hub"
	"gemmaft/pipeline"
	"gemmaft/trainer"
)

// adapterBase finds the base checkpoint of the adapter of qlora stage
// adapter, whose lineage prov describes: `model:` (model), a model stage
// (modelIn), or the checkpoint the adapter was trained on, a folder or an
// hf:// model at the commit training read. It checks that the base is the
// one the adapter was trained on, where the cache still says which that
// was, unless other (other_base) asks for the base given whatever it is.
// The eval, generate and merge stages share it.
func adapterBase(ctx context.Context, t *pipeline.Task, adapter string, prov provenance, modelIn *pipeline.Input, model *modelArg, other bool) (string, error) {
	// What training read: its `model:` folder's files, its hf:// model at
	// a commit, or its model stage's entry.
	trained := map[string]string{}
	trainedDir, trainedStage := "", ""
	var trainedHub *hubInput
	if q := prov.qlora; q != nil {
		var files []pipeline.FileRef
		for _, f := range q.Files {
			if trainer.IsCheckpointFile(filepath.Base(f.Path)) {
				trained[filepath.Base(f.Path)] = f.SHA256
				trainedDir = filepath.Dir(f.Path)
				files = append(files, f)
			}
		}
		// The folder may have been another checkout's; this run's copy
		// of the same files is as good.
		if dir := inputDir(t, files...); dir != "" {
			trainedDir = dir
		}
		var err error
		if trainedHub, err = lineageHub(q, "model", hubFolder); err != nil {
			return "", err
		}
	}
	if len(trained) == 0 && trainedHub == nil && prov.model != nil {
		trainedStage, trained = prov.model.Stage, checkpointDigests(prov.model.Outputs)
	}
	var dir, base string // base names dir for messages: a stage's entry by its stage
	have := map[string]string{}
	switch {
	case modelIn != nil:
		d, err := modelIn.Dir(ctx)
		if err != nil {
			return "", err
		}
		m, err := modelIn.Manifest(ctx)
		if err != nil {
			return "", err
		}
		for _, f := range m.Outputs {
			have[f.Path] = f.SHA256
		}
		dir, base = d, "stage "+modelIn.Name+"'s checkpoint"
	case model.set():
		if h := model.hub; h != nil && trainedHub != nil && !other {
			if a, b := h.at(), trainedHub.at(); a != b {
				return "", &otherBaseError{fmt.Sprintf("the adapter of stage %s was trained on %s, and model: %s is %s: an adapter for another base",
					adapter, b, model.param, a)}
			}
		}
		d, err := model.path(ctx, t)
		if err != nil {
			return "", err
		}
		dir = d
	case trainedDir != "":
		dir = trainedDir
	case trainedHub != nil:
		if _, err := trainedHub.resolve(ctx); err != nil {
			return "", err
		}
		dirs, err := trainedHub.fetch(ctx, t)
		if err != nil {
			return "", err
		}
		dir = dirs[0]
	case trainedStage != "":
		return "", fmt.Errorf("no base model: the adapter was trained on stage %s; add it to needs", trainedStage)
	default:
		return "", fmt.Errorf("no base model: set `model:` to the checkpoint the adapter was trained on, or add its model stage to needs")
	}
	for _, name := range slices.Sorted(maps.Keys(trained)) {
		want := trained[name]
		got, ok := have[name]
		missing := false
		if !ok {
			path := filepath.Join(dir, name)
			if _, err := os.Stat(path); err != nil {
				missing = true
			} else if got, err = t.FileDigest(path); err != nil {
				return "", err
			}
		}
		if missing && dir == trainedDir && !model.set() {
			return "", fmt.Errorf("the adapter of stage %s was trained on the checkpoint in %s, which is gone (no %s there, sha256 %s), and no input file of this run is that checkpoint; set `model:` to a copy of it",
				adapter, dir, name, want)
		}
		if got != want {
			from := trainedDir
			if from == "" {
				from = "stage " + trainedStage
			}
			if other {
				t.Log.Warn("applying the adapter to another base than the one it was trained on, as other_base asks",
					"adapter", adapter, "trained_on", from, "base", dir)
				break
			}
			if base == "" {
				base = dir
			}
			return "", &otherBaseError{fmt.Sprintf("the adapter of stage %s was trained on %s, and %s is another checkpoint (its %s differs): an adapter for another base",
				adapter, from, base, name)}
		}
	}
	return dir, nil
}

// otherBaseError: the base given is not the checkpoint the adapter was
// trained on.
type otherBaseError struct{ msg string }

func (e *otherBaseError) Error() string { return e.msg }

// otherBaseHint adds, to an otherBaseError of a stage that has the
// parameter, how to apply the adapter there all the same.
func otherBaseHint(err error) error {
	if oe := (*otherBaseError)(nil); errors.As(err, &oe) {
		return fmt.Errorf("%w; if that base is meant, other_base: true applies the adapter to it", err)
	}
	return err
}

// inputDir is a folder among this run's input files that holds every one
// of files (recorded by an upstream manifest), by name and content: the
// recorded folder when it is among them; "" when none holds them all.
func inputDir(t *pipeline.Task, files ...pipeline.FileRef) string {
	var dirs []string
	for i, f := range files {
		var here []string
		for _, p := range t.FilesWithDigest(f.SHA256) {
			d := filepath.Dir(p)
			if filepath.Base(p) == filepath.Base(f.Path) && (i == 0 || slices.Contains(dirs, d)) {
				here = append(here, d)
			}
		}
		dirs = here
	}
	if len(dirs) == 0 {
		return ""
	}
	if recorded := filepath.Dir(files[0].Path); slices.Contains(dirs, recorded) {
		return recorded
	}
	return dirs[0]
}

// lineageHub is the hf:// reference a cached stage read as param, pinned
// to the commit its manifest records (what it read then); nil when the
// parameter is not a reference.
func lineageHub(m *pipeline.Manifest, param string, what hubWhat) (*hubInput, error) {
	ref, _ := params(m)[param].(string)
	if !hub.IsRef(ref) {
		return nil, nil
	}
	h, err := parseHub(param, ref, what)
	if err != nil {
		return nil, fmt.Errorf("stage %s: %w", m.Stage, err)
	}
	for _, r := range m.Refs {
		if r.Name == h.ref.RepoRef() {
			h.ref.Revision = r.Revision
			return h, nil
		}
	}
	return nil, fmt.Errorf("stage %s read %s but its manifest records no commit for it", m.Stage, ref)
}

// at names the repository and commit a resolved reference reads.
func (h *hubInput) at() string {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.resolved == nil {
		return h.ref.RepoRef()
	}
	return h.ref.Repo.String() + "@" + h.resolved.Commit
}

// hubTrainingTokenizer is the tokenizer.json a tokenize stage read by an
// hf:// reference, fetched (or found in the cache) at the commit training
// read; "" when the stage read a local file, or there is no such stage.
// With siblings, the tokenizer files beside it in the repository come too
// (trainer.TokenizerFiles: tokenizer_config.json holds the special tokens
// and the chat template), for a model folder that ships them.
func hubTrainingTokenizer(ctx context.Context, t *pipeline.Task, tokenize *pipeline.Manifest, siblings bool) (string, error) {
	if tokenize == nil {
		return "", nil
	}
	h, err := lineageHub(tokenize, "tokenizer", hubFile)
	if err != nil || h == nil {
		return "", err
	}
	if _, err := h.resolve(ctx); err != nil {
		return "", err
	}
	files, err := h.fetch(ctx, t)
	if err != nil {
		return "", err
	}
	if siblings {
		if err := h.fetchBeside(ctx, t, trainer.TokenizerFiles); err != nil {
			return "", fmt.Errorf("the tokenizer files to ship beside %s: %w", h.ref, err)
		}
	}
	return files[0], nil
}

// adapterTokenizer is the tokenizer.json to use with an adapter whose
// lineage prov describes, on base: `tokenizer:` (tokPath, or tokHub on the
// Hub), or the one the training data was tokenized with (a local file,
// checked to be unchanged, or an hf:// one at the commit training read),
// or else the base checkpoint's. The eval and generate stages share it.
func adapterTokenizer(ctx context.Context, t *pipeline.Task, prov provenance, base, tokPath string, tokHub *hubInput) (string, error) {
	fetch := func(h *hubInput) (string, error) {
		if _, err := h.resolve(ctx); err != nil {
			return "", err
		}
		files, err := h.fetch(ctx, t)
		if err != nil {
			return "", err
		}
		return files[0], nil
	}
	path := tokPath
	switch {
	case path != "":
	case tokHub != nil:
		p, err := fetch(tokHub)
		if err != nil {
			return "", err
		}
		path = p
	default:
		dir, err := trainingTokenizer(t, prov.tokenize)
		if err != nil {
			return "", err
		}
		if dir != "" {
			path = filepath.Join(dir, "tokenizer.json")
			break
		}
		if path, err = hubTrainingTokenizer(ctx, t, prov.tokenize, false); err != nil || path != "" {
			return path, err
		}
		if p := filepath.Join(base, "tokenizer.json"); pipeline.CheckReadableFile(p) == nil {
			path = p
			break
		}
		return "", fmt.Errorf("no tokenizer: no tokenize stage upstream in the cache, and %s has no tokenizer.json; set `tokenizer:` to the tokenizer.json training used (or the model's)", base)
	}
	return path, nil
}

// CheckCachedAdapter reads what the cache knows of an adapter given as a
// qlora stage's entry's adapter/ folder (nothing is known of other
// folders), for the commands that take folders (chat, merge, loss): the
// base it trained on, quantize ("nf4" or "none"; "" for an adapter the
// cache does not know), and whether the model is one it cannot go on: a
// merge that holds this very adapter already, or, unless otherBase, a
// checkpoint other than the one it was trained on (a model stage's entry,
// or any folder, whose checkpoint files' digests differ from those
// training read).
func CheckCachedAdapter(modelDir, adapterDir string, otherBase bool) (quantize string, err error) {
	modelDir, adapterDir = filepath.Clean(modelDir), filepath.Clean(adapterDir) // "adapter/" as a shell completes it
	am, err := pipeline.ReadManifest(filepath.Dir(adapterDir))                  // the entry's adapter/
	if err != nil || am.Kind != "qlora" {
		return "", nil
	}
	quantize, _ = params(am)["quantize"].(string)
	// The model's own entry: a model stage's folder, or a merge's model/.
	mm, err := pipeline.ReadManifest(modelDir)
	if err != nil {
		if mm, err = pipeline.ReadManifest(filepath.Dir(modelDir)); err != nil || mm.Kind != mergeKindName {
			if otherBase {
				return quantize, nil
			}
			return quantize, checkTrainedBase(modelDir, adapterDir, am)
		}
	}
	has := func(ins []pipeline.InputRef, key string) bool {
		return slices.ContainsFunc(ins, func(in pipeline.InputRef) bool { return in.Key == key })
	}
	switch {
	case mm.Kind == mergeKindName && has(mm.Inputs, am.Key):
		return "", fmt.Errorf("--model %s is stage %s's merge of this adapter: its weights hold the adapter already; use --model alone", modelDir, mm.Stage)
	case mm.Kind == modelKindName && !has(am.Inputs, mm.Key) && !sameCheckpoint(am.Files, mm.Outputs) && !otherBase:
		return "", fmt.Errorf("--adapter %s was trained on another checkpoint than model stage %s's entry %s: an adapter for another base (--other-base applies it all the same)", adapterDir, mm.Stage, modelDir)
	}
	return quantize, nil
}

// checkTrainedBase checks that the checkpoint in modelDir, a folder outside
// the cache, is the one the adapter of qlora entry am (in adapterDir) was
// trained on, by the digests of its checkpoint files: those of the folder
// training read, or of the model stage it trained on. A base training read
// from the Hub, or one the cache no longer describes, is not checked. The
// digests go through the adapter's cache's record of file states, so a
// large checkpoint is read once.
func checkTrainedBase(modelDir, adapterDir string, am *pipeline.Manifest) error {
	store, err := adapterStore(adapterDir)
	if err != nil {
		return nil // not in a cache after all: nothing is known
	}
	defer store.Close()
	trained, from := checkpointDigests(am.Files), ""
	for _, f := range am.Files {
		if trainer.IsCheckpointFile(filepath.Base(f.Path)) {
			from = filepath.Dir(f.Path)
		}
	}
	if len(trained) == 0 {
		for _, in := range am.Inputs {
			if mm, err := pipeline.ReadManifest(store.EntryDir(in.Key)); err == nil && mm.Kind == modelKindName {
				trained, from = checkpointDigests(mm.Outputs), "model stage "+mm.Stage+"'s checkpoint"
			}
		}
	}
	for _, name := range slices.Sorted(maps.Keys(trained)) {
		sum, err := store.FileDigest(filepath.Join(modelDir, name))
		if errors.Is(err, fs.ErrNotExist) {
			sum = "" // a checkpoint without that file: another one
		} else if err != nil {
			return err
		}
		if sum != trained[name] {
			return fmt.Errorf("--adapter %s was trained on %s, and --model %s is another checkpoint (its %s differs): an adapter for another base; --other-base applies it all the same", adapterDir, from, modelDir, name)
		}
	}
	return nil
}

// sameCheckpoint says whether the checkpoint files training read are, by
// digest, those a model stage wrote: false when training read none.
func sameCheckpoint(read, wrote []pipeline.FileRef) bool {
	r, w := checkpointDigests(read), checkpointDigests(wrote)
	for name, sum := range r {
		if w[name] != sum {
			return false
		}
	}
	return len(r) > 0
}

// checkpointDigests maps the checkpoint files among files (by base name:
// config.json, the safetensors and their index) to their digests.
func checkpointDigests(files []pipeline.FileRef) map[string]string {
	out := map[string]string{}
	for _, f := range files {
		if name := filepath.Base(f.Path); trainer.IsCheckpointFile(name) {
			out[name] = f.SHA256
		}
	}
	return out
}

// adapterInputs reads the inputs of a stage that takes one qlora stage's
// adapter and its base (merge, gguf_lora; adapterNeeds checked their
// needs): the adapter's entry folder, its lineage, and the base from
// `model:` (model) or a model stage, which must be the checkpoint the
// adapter was trained on (adapterBase).
func adapterInputs(ctx context.Context, t *pipeline.Task, model *modelArg) (entry string, lineage []*pipeline.Manifest, base string, err error) {
	var adapter, modelIn *pipeline.Input
	for _, in := range t.Inputs {
		if in.Kind == modelKindName {
			modelIn = in
		} else {
			adapter = in
		}
	}
	if entry, err = adapter.Dir(ctx); err != nil {
		return "", nil, "", err
	}
	if lineage, err = adapter.Lineage(ctx); err != nil {
		return "", nil, "", err
	}
	base, err = adapterBase(ctx, t, adapter.Name, provenanceOf(lineage), modelIn, model, false)
	return entry, lineage, base, err
}

// CachedAdapterTokenizer is the folder of the tokenizer.json that the
// training data of an adapter in the cache (adapterDir, a qlora entry's
// adapter/) was tokenized with, as the merge stage finds it: "" where the
// adapter is not the cache's or its data came through an hf:// tokenizer.
// An error says that file is gone or changed since.
func CachedAdapterTokenizer(adapterDir string) (string, error) {
	am, err := pipeline.ReadManifest(filepath.Dir(filepath.Clean(adapterDir)))
	if err != nil || am.Kind != "qlora" {
		return "", nil
	}
	store, err := adapterStore(adapterDir)
	if err != nil {
		return "", nil
	}
	defer store.Close()
	lineage, err := store.Lineage(am, am.Stage)
	if err != nil {
		return "", err
	}
	tokenize := provenanceOf(lineage).tokenize
	f, ok := tokenizerRecord(tokenize)
	if !ok {
		return "", nil
	}
	return recordedTokenizer(tokenize, f)
}

// adapterStore opens the cache that holds adapterDir, a qlora entry's
// adapter/ folder (CACHE/entries/ab/KEY/adapter).
func adapterStore(adapterDir string) (*pipeline.Store, error) {
	return pipeline.OpenExistingStore(filepath.Dir(filepath.Dir(filepath.Dir(filepath.Dir(filepath.Clean(adapterDir))))))
}
