package pipeline

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"sync"
)

// A Kind prepares the stages of one kind: from a stage's parameters it makes
// the Runner that computes it. The engine knows no kind by name: package
// stages implements them and cmd/pipeline registers them.
type Kind interface {
	// Version is part of every key of this kind. Bump it whenever the output
	// for the same parameters and inputs would change; where a change
	// reaches some settings only, bump the Revision their parameters return
	// (see Reviser) instead.
	Version() int
	// Params returns a pointer to a new parameter struct holding the kind's
	// defaults. The engine decodes the stage's `with:` into it, rejecting
	// unknown keys, and then calls its Validate method if it has one
	// (returning a *ParamError places the message at that parameter's line).
	// Its JSON encoding is part of the key, so every field that changes the
	// output must be encoded and nothing else may be.
	Params() any
	// Inputs says how many `needs` the kind takes; max < 0 means no limit.
	// A kind that reads only some kinds of input also implements
	// InputChecker, so that wrong wiring is a spec error.
	Inputs() (min, max int)
	// Prepare checks the decoded parameters against the world (files exist,
	// globs match) and returns the stage's Runner. dir is the spec's folder,
	// against which relative paths resolve.
	Prepare(params any, dir string) (Runner, error)
}

// A Reviser is a parameter struct that names a revision of its kind's code
// beside the kind's Version, for a fix that changes the output of some
// settings only: those settings return a higher revision, and stages with
// other settings keep their entries, and all that was trained on them.
// Revision 0 leaves a key as it was before revisions.
type Reviser interface {
	Revision() int
}

// A Runner computes one stage: it is what a Kind prepares from the
// parameters of a Node (the stage as the spec declares it).
type Runner interface {
	// Files lists, in a stable order, the files whose contents the output
	// depends on. Their digests are part of the key. Run reads them through
	// Task.Open, or, when a library opens them by path, calls
	// Task.CheckFiles once they are read; a file changed since it was
	// hashed fails the stage either way (see inputfile.go).
	Files() []string
	// Run computes the stage's output from its inputs. It writes its table
	// with t.Output and any other files into t.Dir, and must return promptly
	// with ctx's error once ctx is done.
	Run(ctx context.Context, t *Task) error
}

// A Ref is a name a stage reads through that can come to mean something
// else: a branch of a repository on the Hugging Face Hub, say. What it names
// now (Revision, a commit) enters the stage's key in place of the content
// of what it names, so the key changes when the reference moves and stays
// the same while it does not, without reading gigabytes to find out.
type Ref struct {
	Name     string `json:"name"`           // as plans show it: hf://google/gemma-3-12b-it@main
	Revision string `json:"revision"`       // what it names now
	Note     string `json:"note,omitempty"` // how it was resolved, when worth saying (offline, say)
}

// An UpstreamFiler is a Runner whose output carries files found beside
// the files of stages upstream of it: a merge ships the settings and chat
// template of the tokenizer folder whose tokenizer.json its lineage's
// tokenize stage read. Plan hands it every upstream stage's Files and adds
// the paths it names (those that exist) to its own, in its key.
type UpstreamFiler interface {
	UpstreamFiles(upstream []UpstreamStage) []string
}

// UpstreamStage is a stage upstream of an UpstreamFiler, nearest first.
type UpstreamStage struct {
	Name, Kind string
	Files      []string
}

// A Resolver is a Runner that reads through Refs. Plan calls Resolve before
// computing the stage's key (so Files may be empty for what the refs
// name); Run reads what the last Resolve resolved. A *ParamError from
// Resolve says that what the parameter names is not there (no such
// repository, revision or file): a spec error, at that parameter.
type Resolver interface {
	Resolve(ctx context.Context) ([]Ref, error)
}

// A Resumer is a Runner that keeps state in its scratch folder (see
// Task.Scratch) to resume an interrupted attempt from. Plan asks it what
// that state holds, so that it says where the next attempt resumes, and
// says nothing of a folder that holds no state to resume from (a
// checkpoint the disk had no room for).
type Resumer interface {
	// ResumePoint says what the state in scratch resumes from
	// ("checkpoint of step 120"), "" when nothing there can be resumed
	// from.
	ResumePoint(scratch string) string
}

// A Registry maps kind names to kinds.
type Registry struct {
	mu    sync.RWMutex
	kinds map[string]Kind
}

// NewRegistry returns an empty registry.
func NewRegistry() *Registry { return &Registry{kinds: map[string]Kind{}} }

// Register adds a kind; registering one name twice is a programming error.
func (r *Registry) Register(name string, k Kind) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, dup := r.kinds[name]; dup {
		panic("pipeline: kind " + name + " registered twice")
	}
	r.kinds[name] = k
}

// Lookup returns the kind called name.
func (r *Registry) Lookup(name string) (Kind, bool) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	k, ok := r.kinds[name]
	return k, ok
}

// Names lists the registered kinds, sorted.
func (r *Registry) Names() []string {
	r.mu.RLock()
	defer r.mu.RUnlock()
	out := make([]string, 0, len(r.kinds))
	for n := range r.kinds {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

// jsonEncoder encodes what cache keys are made of (a stage's canonical
// parameters and keyMaterial) without HTML escaping, so that a parameter
// such as `<bos>` stays readable in the canonical form. Changing it changes
// every key. Manifests and run records use encoding/json's defaults.
func jsonEncoder(w io.Writer) *json.Encoder {
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false)
	return enc
}

// stageErr wraps an error with the stage it happened in.
func stageErr(n *Node, err error) error {
	return fmt.Errorf("stage %s (%s): %w", n.Name, n.KindName, err)
}
