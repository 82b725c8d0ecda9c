package pipeline

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sync/errgroup"

	"gemmaft/internal/spell"
)

// Options select what a run does.
type Options struct {
	Until string   // run this stage and what it needs, nothing after it
	Only  string   // run just this stage; its inputs must be cached
	Force []string // recompute these stages even if cached; "all" for every one
}

// A Step is one stage of a plan: its key, and whether it will be computed.
type Step struct {
	Node     *Node
	Key      string
	Inputs   []InputRef
	Files    []FileRef
	Refs     []Ref      // what the stage's references name now
	State    EntryState // of the cache entry now
	Damage   error      // why the entry is damaged
	Unkeyed  error      // why a lenient plan could not key the stage
	Manifest *Manifest  // of a valid entry
	Selected bool       // part of this run (see Options.Until and Only)
	Compute  bool       // will be computed
	Reason   string     // why it will be computed, or why it is cached
	// Twin is the earlier step that computes this one's entry: stages of
	// one kind, parameters and inputs have one key, and the entry is
	// computed once (a run that locked it twice would wait forever).
	Twin *Step

	keyed []*keyedFile // Files as hashed, for checking what the stage reads
}

// A Plan is the DAG's steps in topological order, every key known.
type Plan struct {
	DAG   *DAG
	Steps []*Step

	store   *Store
	lastRun *RunRecord   // this DAG's previous run, for status
	history []*RunRecord // its kept runs, newest first, once why needs them
}

// Step returns the step of the stage called name, or nil.
func (p *Plan) Step(name string) *Step {
	for _, s := range p.Steps {
		if s.Node.Name == name {
			return s
		}
	}
	return nil
}

// keyMaterial is what a key is the SHA-256 of. Changing its encoding changes
// every key, which is safe: old entries simply stop being used.
type keyMaterial struct {
	Kind     string          `json:"kind"`
	Version  int             `json:"version"`
	Revision int             `json:"revision,omitempty"`
	Params   json.RawMessage `json:"params"`
	Inputs   []string        `json:"inputs"`
	Files    []string        `json:"files"`
	Refs     []string        `json:"refs,omitempty"` // "name revision"
}

// Plan computes every stage's key (hashing input files through the stat
// cache, resolving references) and decides, for the stages opts selects,
// which to compute.
func (s *Store) Plan(dag *DAG, opts Options) (*Plan, error) {
	return s.PlanContext(context.Background(), dag, opts)
}

// PlanContext is Plan with a context for resolving references.
func (s *Store) PlanContext(ctx context.Context, dag *DAG, opts Options) (*Plan, error) {
	return s.plan(ctx, dag, opts, false)
}

// plan is PlanContext. A lenient plan (status's) keys what it can: a stage
// its kind could not prepare, whose files or references fail, or that
// reads such a stage has no key and says why in Unkeyed, instead of
// failing the plan.
func (s *Store) plan(ctx context.Context, dag *DAG, opts Options, lenient bool) (*Plan, error) {
	if opts.Until != "" && opts.Only != "" {
		return nil, &SpecError{File: dag.File, Msg: "--until and --only exclude each other", Fix: "give one of them"}
	}
	for _, name := range append(append([]string{}, opts.Force...), opts.Until, opts.Only) {
		if name != "" && name != "all" && dag.Node(name) == nil {
			fix := "stages: " + strings.Join(names(dag.Nodes), ", ")
			if c := spell.Closest(name, names(dag.Nodes)); c != "" {
				fix = fmt.Sprintf("did you mean %q? %s", c, fix)
			}
			return nil, &SpecError{File: dag.File, Msg: fmt.Sprintf("no stage called %q", name), Fix: fix}
		}
	}
	// Only the stages the run needs are keyed: those it selects and what
	// they read. The others' files are not hashed nor their references
	// resolved, so that preprocessing alone runs without the model.
	keyed := dag.keyed(opts)
	if err := unprepared(keyed); err != nil && !lenient {
		return nil, err
	}
	isKeyed := map[*Node]bool{}
	var prepared []*Node
	for _, n := range keyed {
		isKeyed[n] = true
		if n.Unprepared == nil {
			prepared = append(prepared, n)
		}
	}
	refs, refErrs := resolveRefs(ctx, dag.File, prepared)
	if len(refErrs) > 0 && !lenient {
		// The first stage's: stages that name one model fail alike.
		for _, n := range prepared {
			if err := refErrs[n]; err != nil {
				return nil, err
			}
		}
	}
	plan := &Plan{DAG: dag, store: s, lastRun: s.lastRun(dag)}
	steps := map[*Node]*Step{}
	for _, n := range dag.Nodes {
		st := &Step{Node: n}
		steps[n] = st
		plan.Steps = append(plan.Steps, st)
		if !isKeyed[n] {
			continue
		}
		if err := s.key(st, steps, refs[n], refErrs[n]); err != nil {
			if !lenient {
				return nil, err
			}
			st.Unkeyed = err
		}
	}
	plan.selectSteps(opts)
	// Entries looked at: the steps that run, and the inputs they read.
	matters := map[*Node]bool{}
	for _, st := range plan.Steps {
		if st.Selected {
			matters[st.Node] = true
			for _, d := range st.Node.Needs {
				matters[d] = true
			}
		}
	}
	for _, st := range plan.Steps {
		if !matters[st.Node] || st.Key == "" {
			continue
		}
		state, m, err := s.Check(st.Key, false)
		st.State, st.Manifest, st.Damage = state, m, err
	}
	forced := map[string]bool{}
	for _, f := range opts.Force {
		forced[f] = true
	}
	first := map[string]*Step{} // of each key computed: its first step, which computes it for all
	for _, st := range plan.Steps {
		if !st.Selected || st.Unkeyed != nil {
			continue
		}
		switch {
		case forced["all"] || forced[st.Node.Name]:
			st.Compute, st.Reason = true, "forced"
		case st.State == Valid:
			st.Reason = "cached"
		case first[st.Key] != nil:
			st.Compute, st.Reason = true, "the same entry as stage "+first[st.Key].Node.Name+", computed once"
		default:
			st.Compute, st.Reason = true, plan.why(st)
			if r, ok := st.Node.Runner.(Resumer); ok {
				if at := r.ResumePoint(s.scratchDir(st.Key)); at != "" {
					st.Reason += "; it resumes an interrupted attempt (" + at + ")"
				}
			}
		}
		if st.Compute {
			if st.Twin = first[st.Key]; st.Twin == nil {
				first[st.Key] = st
			}
		}
	}
	return plan, nil
}

// CheckInputs says, as a SpecError, when a stage the plan computes reads
// one it neither computes nor finds cached (--only): the run would fail.
func (p *Plan) CheckInputs() error {
	for _, st := range p.Steps {
		if !st.Compute {
			continue
		}
		for _, d := range st.Node.Needs {
			if in := p.Step(d.Name); !in.Compute && in.State != Valid {
				return &SpecError{File: p.DAG.Path, Line: st.Node.Line,
					Msg: fmt.Sprintf("stage %q needs %q, which is not cached", st.Node.Name, d.Name),
					Fix: fmt.Sprintf("run with --until %s first, or without --only", d.Name)}
			}
		}
	}
	return nil
}

// key computes the key of st, whose inputs' steps are done, from what its
// stage reads: the inputs' keys, its files' digests, its references'
// revisions (refs, or refErr when they failed to resolve).
func (s *Store) key(st *Step, steps map[*Node]*Step, refs []Ref, refErr error) error {
	n := st.Node
	switch {
	case n.Unprepared != nil:
		return n.Unprepared
	case refErr != nil:
		return refErr
	}
	km := keyMaterial{Kind: n.KindName, Version: n.Kind.Version(), Revision: n.revision(), Params: n.Canon, Inputs: []string{}, Files: []string{}}
	for _, d := range n.Needs {
		if steps[d].Key == "" {
			return stageErr(n, fmt.Errorf("it reads stage %s, which has no key", d.Name))
		}
		st.Inputs = append(st.Inputs, InputRef{Stage: d.Name, Key: steps[d].Key})
		km.Inputs = append(km.Inputs, steps[d].Key)
	}
	if err := s.hashFiles(st); err != nil {
		return err
	}
	for _, f := range st.Files {
		km.Files = append(km.Files, f.SHA256)
	}
	st.Refs = refs
	for _, r := range refs {
		km.Refs = append(km.Refs, r.Name+" "+r.Revision)
	}
	var buf bytes.Buffer
	if err := jsonEncoder(&buf).Encode(km); err != nil {
		return err
	}
	sum := sha256.Sum256(buf.Bytes())
	st.Key = hex.EncodeToString(sum[:])
	return nil
}

// stageFiles are the files n's stage reads: its Runner's, and, from an
// UpstreamFiler, those it names beside its upstream stages' files.
func stageFiles(n *Node) []string {
	files := n.Runner.Files()
	uf, ok := n.Runner.(UpstreamFiler)
	if !ok {
		return files
	}
	var up []UpstreamStage
	seen := map[*Node]bool{}
	for next := n.Needs; len(next) > 0; { // breadth first: nearest first
		var after []*Node
		for _, d := range next {
			if seen[d] || d.Runner == nil {
				continue
			}
			seen[d] = true
			up = append(up, UpstreamStage{Name: d.Name, Kind: d.KindName, Files: d.Runner.Files()})
			after = append(after, d.Needs...)
		}
		next = after
	}
	for _, f := range uf.UpstreamFiles(up) {
		if !slices.Contains(files, f) {
			files = append(files, f)
		}
	}
	return files
}

// hashFiles digests the files st's stage reads (through the stat cache)
// into st.Files, as far as the first that fails.
func (s *Store) hashFiles(st *Step) error {
	for _, f := range stageFiles(st.Node) {
		sum, state, trusted, err := s.stats.digestState(f)
		if err != nil {
			return stageErr(st.Node, fmt.Errorf("input file: %w", err))
		}
		st.Files = append(st.Files, FileRef{Path: f, Size: state.Size, SHA256: sum})
		st.keyed = append(st.keyed, &keyedFile{path: f, sha: sum, state: state, trusted: trusted})
	}
	return nil
}

func (p *Plan) selectSteps(opts Options) {
	for _, n := range p.DAG.Selected(opts) {
		p.Step(n.Name).Selected = true
	}
}

// Selected lists the stages a run with opts computes or finds cached, in
// the DAG's order: --only's stage, --until's and what it needs, or all.
func (d *DAG) Selected(opts Options) []*Node {
	switch {
	case opts.Only != "":
		if n := d.Node(opts.Only); n != nil {
			return []*Node{n}
		}
		return nil
	case opts.Until != "":
		if n := d.Node(opts.Until); n != nil {
			return d.upstream(n)
		}
		return nil
	}
	return d.Nodes
}

// keyed lists the stages whose keys a run with opts needs, in the DAG's
// order: those it selects, and the stages they read.
func (d *DAG) keyed(opts Options) []*Node {
	return d.upstream(d.Selected(opts)...)
}

// upstream lists the given stages and every stage they read, transitively,
// in the DAG's order.
func (d *DAG) upstream(nodes ...*Node) []*Node {
	seen := map[*Node]bool{}
	var mark func(n *Node)
	mark = func(n *Node) {
		if seen[n] {
			return
		}
		seen[n] = true
		for _, up := range n.Needs {
			mark(up)
		}
	}
	for _, n := range nodes {
		mark(n)
	}
	var out []*Node
	for _, n := range d.Nodes {
		if seen[n] {
			out = append(out, n)
		}
	}
	return out
}

// why explains a missing or damaged entry by comparing the step with the
// same stage in the newest run of this DAG that had an entry for it.
func (p *Plan) why(st *Step) string {
	if st.State == Damaged {
		return fmt.Sprintf("cache entry damaged (%v)", st.Damage)
	}
	prev := p.lastEntry(st.Node.Name)
	if prev == nil {
		return "no earlier entry"
	}
	if prev.Key == st.Key {
		return "cache entry missing (removed by gc or by hand)"
	}
	var reasons []string
	if prev.Kind != st.Node.KindName {
		reasons = append(reasons, fmt.Sprintf("kind changed: %s → %s", prev.Kind, st.Node.KindName))
	} else if v, r := st.Node.Kind.Version(), st.Node.revision(); prev.KindVersion != v || prev.KindRevision != r {
		reasons = append(reasons, fmt.Sprintf("kind %s version %s → %s", st.Node.KindName, versionText(prev.KindVersion, prev.KindRevision), versionText(v, r)))
	}
	if changed := changedParams(prev.Params, st.Node.Canon); len(changed) > 0 {
		reasons = append(reasons, "parameters changed: "+strings.Join(changed, ", "))
	}
	if r := changedFiles(prev.Files, st.Files); r != "" {
		reasons = append(reasons, r)
	}
	reasons = append(reasons, movedRefs(prev.Refs, st.Refs)...)
	for _, in := range st.Inputs {
		i := slices.IndexFunc(prev.Inputs, func(r InputRef) bool { return r.Stage == in.Stage })
		if i < 0 || prev.Inputs[i].Key != in.Key {
			reasons = append(reasons, "input "+in.Stage+" changed")
		}
	}
	if len(reasons) == 0 {
		return "key changed"
	}
	return strings.Join(reasons, "; ")
}

// versionText is a kind's version with its settings' revision: 2, or 2.1
// for revision 1.
func versionText(version, revision int) string {
	if revision == 0 {
		return strconv.Itoa(version)
	}
	return fmt.Sprintf("%d.%d", version, revision)
}

// lastEntry returns the record of stage in the newest kept run of the DAG
// that computed it or found it cached, or nil if none did. A run that did
// not select the stage (--until, --only) or failed in it says nothing of its
// entry.
func (p *Plan) lastEntry(stage string) *StageRecord {
	if p.history == nil {
		p.history = p.store.runHistory(p.DAG)
	}
	for _, r := range p.history {
		for i := range r.Stages {
			s := &r.Stages[i]
			if s.Name == stage && s.hasEntry() {
				return s
			}
		}
	}
	return nil
}

// resolveRefs resolves the references of the nodes that have some, all at
// once (each may ask a server), and says which failed and why.
func resolveRefs(ctx context.Context, spec string, nodes []*Node) (map[*Node][]Ref, map[*Node]error) {
	out, failed := map[*Node][]Ref{}, map[*Node]error{}
	var mu sync.Mutex
	var g errgroup.Group
	g.SetLimit(8)
	for _, n := range nodes {
		r, ok := n.Runner.(Resolver)
		if !ok {
			continue
		}
		g.Go(func() error {
			refs, err := r.Resolve(ctx)
			mu.Lock()
			defer mu.Unlock()
			var pe *ParamError
			switch {
			case errors.As(err, &pe):
				// What a parameter names is not there: the spec's error,
				// placed at the parameter.
				e := paramSpecError(spec, n, err)
				e.Unresolved = true
				failed[n] = e
			case err != nil:
				failed[n] = stageErr(n, err)
			default:
				out[n] = refs
			}
			return nil
		})
	}
	g.Wait()
	return out, failed
}

// movedRefs says which references name something else than they did.
func movedRefs(prev, cur []Ref) []string {
	old := map[string]string{}
	for _, r := range prev {
		old[r.Name] = r.Revision
	}
	var out []string
	for _, r := range cur {
		if was, ok := old[r.Name]; ok && was != r.Revision {
			out = append(out, fmt.Sprintf("%s moved from %s to %s", r.Name, shortRev(was), shortRev(r.Revision)))
		}
	}
	return out
}

// shortRev shortens a commit id as git does.
func shortRev(r string) string {
	if len(r) == 40 {
		return r[:7]
	}
	return r
}

func changedParams(a, b []byte) []string {
	var ma, mb map[string]json.RawMessage
	if json.Unmarshal(a, &ma) != nil || json.Unmarshal(b, &mb) != nil {
		if !bytes.Equal(a, b) {
			return []string{"(all)"}
		}
		return nil
	}
	// Records keep parameters re-indented (lists over several lines), so
	// values are compared in compact form.
	compact := func(v json.RawMessage) string {
		var b bytes.Buffer
		if json.Compact(&b, v) != nil {
			return string(v)
		}
		return b.String()
	}
	var out []string
	for k, v := range mb {
		if old, ok := ma[k]; !ok || compact(old) != compact(v) {
			out = append(out, k)
		}
	}
	for k := range ma {
		if _, ok := mb[k]; !ok {
			out = append(out, k)
		}
	}
	sort.Strings(out)
	return out
}

func changedFiles(prev, cur []FileRef) string {
	old := map[string]string{}
	for _, f := range prev {
		old[f.Path] = f.SHA256
	}
	var changed, added []string
	for _, f := range cur {
		sum, ok := old[f.Path]
		switch {
		case !ok:
			added = append(added, filepath.Base(f.Path))
		case sum != f.SHA256:
			changed = append(changed, f.Path)
		}
		delete(old, f.Path)
	}
	var parts []string
	if len(changed) > 0 {
		parts = append(parts, "file content changed: "+strings.Join(changed, ", "))
	}
	if len(added) > 0 {
		parts = append(parts, "files added: "+strings.Join(added, ", "))
	}
	if len(old) > 0 {
		var gone []string
		for p := range old {
			gone = append(gone, filepath.Base(p))
		}
		sort.Strings(gone)
		parts = append(parts, "files removed: "+strings.Join(gone, ", "))
	}
	return strings.Join(parts, "; ")
}
