package stages

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"slices"
	"sync"

	"gemmaft/hub"
	"gemmaft/pipeline"
	"gemmaft/trainer"
)

// What an hf:// reference of a parameter names.
type hubWhat int

const (
	hubFiles  hubWhat = iota // files of a dataset: a path or a glob
	hubFile                  // one file (a tokenizer.json)
	hubFolder                // a checkpoint folder: the repository itself
)

// A hubInput is an hf:// reference among a stage's parameters. The plan
// resolves it (the commit enters the key, nothing is downloaded); the run
// fetches what it names at that commit into the Hugging Face cache.
type hubInput struct {
	ref   hub.Ref
	param string
	what  hubWhat

	mu       sync.Mutex
	client   *hub.Client
	resolved *hub.Resolved
	files    []string // what it names at the commit; nil until listed
}

// parseHub reads the hf:// reference s given as param.
func parseHub(param, s string, what hubWhat) (*hubInput, error) {
	ref, err := hub.ParseRef(s)
	if err != nil {
		return nil, &pipeline.ParamError{Param: param, Msg: err.Error()}
	}
	switch what {
	case hubFile:
		var one bool
		if ref, one = ref.OneFile("tokenizer.json"); !one {
			return nil, &pipeline.ParamError{Param: param, Msg: fmt.Sprintf("%s names several files", s), Fix: "name one file, e.g. hf://ORG/NAME@REV/tokenizer.json"}
		}
	case hubFolder:
		if ref.Path != "" {
			return nil, &pipeline.ParamError{Param: param, Msg: fmt.Sprintf("%s names a file in the repository, not a checkpoint", s),
				Fix: "name the repository: hf://ORG/NAME@REV (a checkpoint in a subfolder is not supported)"}
		}
		if ref.Type != hub.Model {
			return nil, &pipeline.ParamError{Param: param, Msg: fmt.Sprintf("%s is not a model repository", s), Fix: "a checkpoint is written hf://ORG/NAME@REV"}
		}
	case hubFiles:
		if ref.Path == "" {
			return nil, &pipeline.ParamError{Param: param, Msg: fmt.Sprintf("%s names no file of the repository", s),
				Fix: "add the files' path or a glob, e.g. hf://datasets/ORG/NAME@REV/data/train-*.parquet"}
		}
	}
	return &hubInput{ref: ref, param: param, what: what}, nil
}

// resolve asks which commit the reference names now. Online it also lists
// what the reference names there and checks it (the glob matches, the
// folder is a checkpoint, a gated repository lets us in), so that a bad
// reference fails the plan before anything runs. Offline, or with the Hub
// unreachable, only the commit is needed: the listing waits for the run,
// which needs no network when the stage is cached.
func (h *hubInput) resolve(ctx context.Context) (pipeline.Ref, error) {
	c := hub.FromEnv()
	r, err := c.Resolve(ctx, h.ref)
	if err != nil {
		return pipeline.Ref{}, h.err(err)
	}
	files, err := h.list(ctx, c, r)
	if err != nil {
		if c.Offline || r.Note != "" {
			files = nil // told at run time, if the run needs them
		} else {
			return pipeline.Ref{}, h.err(err)
		}
	}
	h.mu.Lock()
	h.client, h.resolved, h.files = c, r, files
	h.mu.Unlock()
	return pipeline.Ref{Name: r.RepoRef(), Revision: r.Commit, Note: r.Note}, nil
}

// err says of a failed resolution which parameter it was; what the Hub
// says is not there (a repository, a revision, a file, a checkpoint) is
// the spec's error, at that parameter, as a missing local file is.
func (h *hubInput) err(err error) error {
	var notThere *notCheckpoint
	if errors.Is(err, hub.ErrRepoNotFound) || errors.Is(err, hub.ErrRevisionNotFound) || errors.Is(err, hub.ErrEntryNotFound) || errors.As(err, &notThere) {
		return &pipeline.ParamError{Param: h.param, Msg: err.Error(), Err: err}
	}
	return fmt.Errorf("%s: %w", h.param, err)
}

// A notCheckpoint is a repository named as a checkpoint that holds none.
type notCheckpoint struct{ msg string }

func (e *notCheckpoint) Error() string { return e.msg }

// list finds and checks what the reference names at r's commit.
func (h *hubInput) list(ctx context.Context, c *hub.Client, r *hub.Resolved) ([]string, error) {
	files, err := c.Select(ctx, r)
	if err != nil {
		return nil, err
	}
	var probe string
	switch h.what {
	case hubFolder:
		if !slices.Contains(files, "config.json") {
			return nil, &notCheckpoint{fmt.Sprintf("%s has no config.json: not a Hugging Face checkpoint", r.RepoRef())}
		}
		if !slices.Contains(files, "model.safetensors") && !slices.Contains(files, "model.safetensors.index.json") {
			return nil, &notCheckpoint{fmt.Sprintf("%s has no model.safetensors or model.safetensors.index.json (only safetensors weights are read)", r.RepoRef())}
		}
		probe = "config.json"
	default:
		probe = files[0]
	}
	// A gated repository lists its files to anyone; ask for one now rather
	// than fail hours into the run.
	if err := c.CheckAccess(ctx, r, probe); err != nil {
		return nil, err
	}
	return files, nil
}

// fetch downloads (or finds in the cache) what the reference names at the
// commit the plan resolved, showing the bytes as the stage's progress, and
// returns the local paths: the files, or the checkpoint folder.
func (h *hubInput) fetch(ctx context.Context, t *pipeline.Task) ([]string, error) {
	h.mu.Lock()
	c, r, files := h.client, h.resolved, h.files
	h.mu.Unlock()
	if r == nil {
		return nil, fmt.Errorf("%s: %s was not resolved before the run", h.param, h.ref)
	}
	if files == nil {
		var err error
		if files, err = h.list(ctx, c, r); err != nil {
			return nil, fmt.Errorf("%s: %w", h.param, err)
		}
	}
	note := "fetching " + h.ref.String()
	dir, err := c.Fetch(ctx, r, files, hub.FetchOptions{
		Log:      t.Log,
		Progress: func(done, total int64) { t.Report(done, total, "bytes", note) },
	})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", h.param, err)
	}
	if h.what == hubFolder {
		return []string{dir}, nil
	}
	out := make([]string, len(files))
	for i, f := range files {
		out[i] = filepath.Join(dir, filepath.FromSlash(f))
	}
	return out, nil
}

// fetchBeside downloads (or finds in the cache) the files of names that
// the repository holds in the referenced file's folder at the resolved
// commit, the referenced file aside; it says nothing of names it lacks.
func (h *hubInput) fetchBeside(ctx context.Context, t *pipeline.Task, names []string) error {
	h.mu.Lock()
	c, r := h.client, h.resolved
	h.mu.Unlock()
	if r == nil {
		return fmt.Errorf("%s: %s was not resolved before the run", h.param, h.ref)
	}
	listed, err := c.List(ctx, r)
	if err != nil {
		return err
	}
	var more []string
	for _, name := range names {
		p := path.Join(path.Dir(h.ref.Path), name)
		if p != h.ref.Path && slices.ContainsFunc(listed, func(f hub.File) bool { return f.Path == p }) {
			more = append(more, p)
		}
	}
	if len(more) == 0 {
		return nil
	}
	_, err = c.Fetch(ctx, r, more, hub.FetchOptions{Log: t.Log})
	return err
}

// resolveAll resolves hub inputs, naming each repository and commit once.
func resolveAll(ctx context.Context, hs ...*hubInput) ([]pipeline.Ref, error) {
	var refs []pipeline.Ref
	for _, h := range hs {
		if h == nil {
			continue
		}
		r, err := h.resolve(ctx)
		if err != nil {
			return nil, err
		}
		if !slices.ContainsFunc(refs, func(x pipeline.Ref) bool { return x.Name == r.Name && x.Revision == r.Revision }) {
			refs = append(refs, r)
		}
	}
	return refs, nil
}

// A modelArg is the `model:` of a stage: a checkpoint folder, whose
// config.json and weights index enter the key, or an hf:// reference,
// whose commit does.
type modelArg struct {
	param string // as the spec gives it
	dir   string
	files []string
	hub   *hubInput
}

// modelParam reads a stage's `model:` (relative folders resolve against
// the spec's folder); an empty parameter gives nothing (the model comes
// from an input).
func modelParam(model, specDir, fix string) (modelArg, error) {
	m := modelArg{param: model}
	if model == "" {
		return m, nil
	}
	if hub.IsRef(model) {
		h, err := parseHub("model", model, hubFolder)
		m.hub = h
		return m, err
	}
	written := model
	model, err := pipeline.ResolvePath(specDir, model)
	if err != nil {
		return m, &pipeline.ParamError{Param: "model", Msg: err.Error(), Fix: "write the path in full"}
	}
	files, err := keyedCheckpointFiles(model)
	if err != nil {
		fix = withHubHint(fix+", or to hf://ORG/NAME@REVISION on the Hugging Face Hub", "model", written, model, "")
		return m, &pipeline.ParamError{Param: "model", Msg: err.Error(), Fix: fix}
	}
	m.dir, m.files = model, files
	return m, nil
}

func (m *modelArg) set() bool { return m.param != "" }

// withHubHint adds to fix, for a parameter whose path (as written, and
// resolved) does not exist but is written as a Hub repository's id
// (google/gemma-3-1b-it, as transformers takes it), its hf:// form, naming
// file in it when one is wanted.
func withHubHint(fix, param, written, path, file string) string {
	if _, err := os.Stat(path); !errors.Is(err, fs.ErrNotExist) {
		return fix
	}
	if ref := hub.RefFor(written, file); ref != "" {
		return fix + "; on the Hugging Face Hub it is " + param + ": " + ref
	}
	return fix
}

// peftBase is how an adapter trained on the model names it: a Hub model
// by its repository id at the commit the plan resolved (which the key
// holds), a folder as the spec writes it (never a path into the cache or
// one resolved against where the spec lies, which the key does not hold).
func (m *modelArg) peftBase() trainer.BaseModel {
	if m.hub == nil {
		return trainer.BaseModel{NameOrPath: m.param}
	}
	m.hub.mu.Lock()
	defer m.hub.mu.Unlock()
	b := trainer.BaseModel{NameOrPath: m.hub.ref.ID, Revision: m.hub.ref.Revision}
	if m.hub.resolved != nil {
		b.Revision = m.hub.resolved.Commit
	}
	return b
}

// path is the local checkpoint folder, fetched first for an hf:// model.
func (m *modelArg) path(ctx context.Context, t *pipeline.Task) (string, error) {
	if m.hub == nil {
		return m.dir, nil
	}
	dirs, err := m.hub.fetch(ctx, t)
	if err != nil {
		return "", err
	}
	return dirs[0], nil
}

// keyedCheckpointFiles are the files of a checkpoint whose content enters
// the key: config.json and the weights (trainer.WeightFiles), shards and
// all: the index of a sharded checkpoint is the same for every checkpoint
// of its architecture (an -it and a -pt model, a retrained one copied over
// the first). A shard is hashed once; later plans find its digest by its
// unchanged size, times and inode.
func keyedCheckpointFiles(dir string) ([]string, error) {
	fi, err := os.Stat(dir)
	if err != nil {
		return nil, pipeline.CheckReadableFile(dir) // says why
	}
	if !fi.IsDir() {
		return nil, fmt.Errorf("%s is a file, not a checkpoint folder", dir)
	}
	cfg := filepath.Join(dir, "config.json")
	if _, err := os.Lstat(cfg); err != nil {
		if _, err := trainer.LoadConfig(dir); err != nil {
			return nil, err // says what the folder holds instead: an adapter, say
		}
		return nil, fmt.Errorf("%s has no config.json", dir)
	}
	if err := pipeline.CheckReadableFile(cfg); err != nil {
		return nil, err
	}
	weights, err := trainer.WeightFiles(dir)
	if err != nil {
		return nil, err
	}
	for _, p := range weights {
		if err := pipeline.CheckReadableFile(p); err != nil {
			return nil, err // a link to a blob a download never finished, say
		}
	}
	return append([]string{cfg}, weights...), nil
}
