package pipeline

import (
	"bytes"
	"encoding"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"

	"github.com/goccy/go-yaml"
	"github.com/goccy/go-yaml/ast"
	"github.com/goccy/go-yaml/parser"

	"gemmaft/internal/lines"
	"gemmaft/internal/spell"
)

// A DAG is a parsed, validated spec whose stages (its Nodes) are ready to
// plan: every stage's parameters are decoded into its kind's typed struct,
// defaults filled in, and its Runner prepared with its input files resolved.
// A stage its kind could not prepare (a file missing, a glob matching
// nothing) keeps the error in place of its Runner: only a plan that needs
// the stage fails on it, so `--until pack` runs without the model a later
// stage trains.
type DAG struct {
	Name  string
	Path  string  // absolute path of the spec file
	File  string  // its path as given, for messages
	Dir   string  // folder relative paths in the spec are resolved against
	Cache string  // the spec's `cache:` folder, absolute; "" when unset
	Nodes []*Node // in topological order; ties keep the spec's order
}

// A Node is one stage of a DAG as the spec declares it, with the Runner its
// kind prepared.
type Node struct {
	Name     string
	KindName string
	Kind     Kind
	Params   any    // pointer to the kind's parameter struct
	Canon    []byte // canonical JSON of Params: part of the key
	Needs    []*Node
	Runner   Runner // nil when Unprepared
	Line     int    // line of the stage in the spec, for messages
	// Unprepared is why the kind could not prepare the stage's Runner,
	// reported by the plans that need the stage.
	Unprepared *SpecError

	needsLine int      // line of its `needs:`, 0 when it has none
	with      ast.Node // its `with:`, for placing parameter errors
}

// revision is the revision n's parameters name (see Reviser); 0 for most.
func (n *Node) revision() int {
	if r, ok := n.Params.(Reviser); ok {
		return r.Revision()
	}
	return 0
}

// Node returns the stage called name, or nil.
func (d *DAG) Node(name string) *Node {
	for _, n := range d.Nodes {
		if n.Name == name {
			return n
		}
	}
	return nil
}

// A SpecError is a problem in a spec file, with where it is and how to fix it.
type SpecError struct {
	File string
	Line int // 0 when the problem has no single place
	Col  int
	Msg  string
	Fix  string
	Err  error // the cause, when there is one (for errors.Is and errors.As)
	// Unresolved says that what the spec names was not found where the
	// plan looked (a repository on the Hub): a run it stops is recorded.
	Unresolved bool
}

func (e *SpecError) Error() string {
	var b strings.Builder
	b.WriteString(e.File)
	if e.Line > 0 {
		fmt.Fprintf(&b, ":%d", e.Line)
		if e.Col > 0 {
			fmt.Fprintf(&b, ":%d", e.Col)
		}
	}
	b.WriteString(": ")
	b.WriteString(e.Msg)
	if e.Fix != "" {
		b.WriteString("\n\tfix: ")
		b.WriteString(e.Fix)
	}
	return b.String()
}

func (e *SpecError) Unwrap() error { return e.Err }

// SpecErrors is every problem found in one spec, in file order.
type SpecErrors []*SpecError

func (es SpecErrors) Error() string {
	msgs := make([]string, len(es))
	for i, e := range es {
		msgs[i] = e.Error()
	}
	return strings.Join(msgs, "\n")
}

// isUnresolved reports whether err is a spec error for something the spec
// names that was not found (see SpecError.Unresolved).
func isUnresolved(err error) bool {
	var one *SpecError
	return errors.As(err, &one) && one.Unresolved
}

// IsSpecError reports whether err is a problem of the spec (exit code 2)
// rather than of running it.
func IsSpecError(err error) bool {
	var one *SpecError
	var many SpecErrors
	return errors.As(err, &one) || errors.As(err, &many)
}

var stageNameRE = regexp.MustCompile(`^\pL[\pL\pN_-]*$`)

// Load reads, decodes and validates the spec at path. Every problem of the
// spec itself is returned together as SpecErrors, before anything runs;
// those of the world its stages read (see DAG) wait for the plan.
func Load(path string, kinds *Registry) (*DAG, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, err
	}
	// A named pipe would block the read below, and a folder reads as an
	// unhelpful error: say what the path is.
	if err := CheckReadableFile(abs); err != nil {
		msg := err.Error()
		var fe *FileError
		if errors.As(err, &fe) {
			msg = "it " + fe.Why // File names the spec
		}
		return nil, &SpecError{File: path, Msg: "cannot read spec: " + msg, Err: err,
			Fix: "check the path; specs are YAML files such as dags/demo.yaml"}
	}
	src, err := os.ReadFile(abs)
	if err != nil {
		var pe *fs.PathError
		if errors.As(err, &pe) {
			err = pe.Err // File names the spec
		}
		return nil, &SpecError{File: path, Msg: "cannot read spec: " + err.Error(), Err: err,
			Fix: "check the path; specs are YAML files such as dags/demo.yaml"}
	}
	// Editors on Windows start UTF-8 files with a byte order mark.
	src = bytes.TrimPrefix(src, []byte(lines.BOM))
	if err := checkUTF8(src); err != nil {
		err.File = path
		return nil, err
	}
	l := &loader{file: path, kinds: kinds, src: src}
	dag := l.load(src)
	if len(l.errs) > 0 {
		sort.SliceStable(l.errs, func(i, j int) bool {
			a, b := l.errs[i], l.errs[j]
			return a.Line < b.Line || a.Line == b.Line && a.Col < b.Col
		})
		return nil, l.errs
	}
	dag.Path, dag.File = abs, path
	dag.Dir = filepath.Dir(abs)
	if real, err := filepath.EvalSymlinks(dag.Dir); err == nil {
		// A "../data" beside a spec reached through a linked folder is
		// the link's target's sibling, as the shell and the kernel read
		// it; joined to the link's name it would be cleaned away.
		dag.Dir = real
	}
	if dag.Cache != "" {
		if dag.Cache, err = ResolvePath(dag.Dir, dag.Cache); err != nil {
			return nil, SpecErrors{{File: path, Line: l.cacheLine, Msg: "cache: " + err.Error(), Err: err,
				Fix: "write the folder's full path, or ~/folder for one in your home folder"}}
		}
	}
	for _, n := range dag.Nodes {
		st, err := n.Kind.Prepare(n.Params, dag.Dir)
		if err != nil {
			n.Unprepared = l.paramError(n, err)
			continue
		}
		n.Runner = st
	}
	return dag, nil
}

// Check returns, as SpecErrors, why the kinds could not prepare the stages
// a run with opts needs, or nil when they all could; Plan checks it first.
func (d *DAG) Check(opts Options) error { return unprepared(d.keyed(opts)) }

// unprepared returns, as SpecErrors, why the kinds could not prepare the
// given stages, or nil when they all could.
func unprepared(nodes []*Node) error {
	var errs SpecErrors
	for _, n := range nodes {
		if n.Unprepared != nil {
			errs = append(errs, n.Unprepared)
		}
	}
	if len(errs) == 0 {
		return nil
	}
	return errs
}

type loader struct {
	file      string
	src       []byte
	kinds     *Registry
	errs      SpecErrors
	broken    map[string]bool // stages written but in error: needing one is no second error
	cacheLine int
}

func (l *loader) errAt(n ast.Node, fix, format string, args ...any) {
	e := &SpecError{File: l.file, Msg: fmt.Sprintf(format, args...), Fix: fix}
	if n != nil && n.GetToken() != nil {
		e.Line = n.GetToken().Position.Line
		e.Col = n.GetToken().Position.Column
	}
	l.errs = append(l.errs, e)
}

// yamlErr turns a go-yaml error into a SpecError at the token it names.
func (l *loader) yamlErr(err error, fix string) *SpecError {
	e := &SpecError{File: l.file, Msg: err.Error(), Fix: fix, Err: err}
	var ye yaml.Error
	if errors.As(err, &ye) {
		e.Msg = ye.GetMessage()
		if tk := ye.GetToken(); tk != nil {
			e.Line, e.Col = tk.Position.Line, tk.Position.Column
		}
	}
	e.Msg = strings.ReplaceAll(e.Msg, "\t", `\t`)
	if strings.Contains(e.Msg, "already defined") {
		e.Fix = "keep one of them: YAML allows a key once in a mapping"
	}
	if l.hasTab(e.Line) {
		e.Fix = "YAML forbids tabs for indentation: indent with spaces (the tab is on line " + fmt.Sprint(l.tabLine(e.Line)) + ")"
	}
	return e
}

// tabLine returns the line, at or just before line (1-based), whose
// leading white space holds a tab, or 0. go-yaml reports a tab either where
// it is or at the token after it.
func (l *loader) tabLine(line int) int {
	lines := bytes.Split(l.src, []byte("\n"))
	for i := min(line, len(lines)); i >= max(1, line-1); i-- {
		indent := lines[i-1][:len(lines[i-1])-len(bytes.TrimLeft(lines[i-1], " \t"))]
		if bytes.IndexByte(indent, '\t') >= 0 {
			return i
		}
	}
	return 0
}

func (l *loader) hasTab(line int) bool { return line > 0 && l.tabLine(line) > 0 }

// entries returns the key/value pairs of a mapping node; a mapping with one
// key parses as a lone MappingValueNode.
func entries(n ast.Node) ([]*ast.MappingValueNode, bool) {
	switch m := n.(type) {
	case *ast.MappingNode:
		return m.Values, true
	case *ast.MappingValueNode:
		return []*ast.MappingValueNode{m}, true
	}
	return nil, false
}

func keyOf(mv *ast.MappingValueNode) string {
	if s, ok := mv.Key.(*ast.StringNode); ok {
		return s.Value
	}
	return mv.Key.String()
}

func isNull(n ast.Node) bool {
	return n == nil || n.Type() == ast.NullType
}

func (l *loader) load(src []byte) *DAG {
	file, err := parseYAML(src)
	if err != nil {
		l.errs = append(l.errs, l.yamlErr(err, "fix the YAML syntax at that place"))
		return nil
	}
	if len(file.Docs) != 1 || file.Docs[0].Body == nil {
		l.errs = append(l.errs, &SpecError{File: l.file, Msg: "spec must hold exactly one YAML document",
			Fix: "write a mapping with `name:` and `stages:`"})
		return nil
	}
	body := l.resolveAliases(file.Docs[0].Body)
	if l.hasErrors() {
		return nil
	}
	top, ok := entries(body)
	if !ok {
		l.errAt(body, "write a mapping with `name:` and `stages:`", "spec must be a mapping, not %s", body.Type())
		return nil
	}
	dag := &DAG{}
	var stagesNode ast.Node
	misspelt := map[string]bool{} // top-level keys an unknown key was near: not missing as well
	for _, mv := range top {
		switch k := keyOf(mv); k {
		case "name":
			if text, got, changed := numberAsText(mv.Value); changed {
				l.errAt(mv.Value, fmt.Sprintf("quote it to keep it as written: name: %q", text), "name: YAML reads %s as the number %s, not the text %q", text, got, text)
			} else if err := nodeToValue(mv.Value, &dag.Name); err != nil || dag.Name == "" {
				l.errAt(mv.Value, "give the DAG a name, e.g. `name: gemma3-12b-tr`", "name must be a non-empty string")
			}
		case "cache":
			l.cacheLine = mv.Key.GetToken().Position.Line
			if err := nodeToValue(mv.Value, &dag.Cache); err != nil {
				l.errAt(mv.Value, "write a folder path, e.g. `cache: .cache/pipeline`", "cache must be a folder path")
			}
		case "stages":
			stagesNode = mv.Value
		default:
			if strings.HasPrefix(k, "x-") {
				continue // an extension key, as in Docker Compose: a place for anchors
			}
			fix := "the top level knows only name, cache and stages (and ignores keys starting with x-, a place for YAML anchors)"
			if s := spell.Closest(k, []string{"name", "cache", "stages"}); s != "" {
				fix = fmt.Sprintf("did you mean %q? %s", s, fix)
				misspelt[s] = true
			}
			l.errAt(mv.Key, fix, "unknown key %q", k)
		}
	}
	if dag.Name == "" && !l.hasErrors() {
		l.errs = append(l.errs, &SpecError{File: l.file, Line: 1, Msg: "missing `name:`", Fix: "add `name: my-dag` at the top"})
	}
	if isNull(stagesNode) && misspelt["stages"] {
		return nil
	}
	if isNull(stagesNode) {
		l.errs = append(l.errs, &SpecError{File: l.file, Line: 1, Msg: "missing `stages:`",
			Fix: "add a `stages:` mapping of stage name to {kind, needs, with}"})
		return nil
	}
	stageEntries, ok := entries(stagesNode)
	if !ok {
		l.errAt(stagesNode, "write `stages:` as a mapping of stage name to {kind, needs, with}", "stages must be a mapping, not %s", stagesNode.Type())
		return nil
	}
	if len(stageEntries) == 0 {
		l.errAt(stagesNode, "add a stage, e.g. `alpaca: {kind: jsonl, with: {paths: [data.jsonl]}}`", "stages is empty: the spec does nothing")
		return nil
	}

	byName := map[string]*Node{}
	needNodes := map[*Node][]ast.Node{}
	var order []*Node
	l.broken = map[string]bool{}
	for _, mv := range stageEntries {
		n := l.stage(mv, needNodes)
		if n == nil {
			l.broken[keyOf(mv)] = true
			continue
		}
		if byName[n.Name] != nil {
			l.errAt(mv.Key, "give each stage a different name", "stage %q is defined twice", n.Name)
			continue
		}
		byName[n.Name] = n
		order = append(order, n)
	}
	l.resolveNeeds(order, byName, needNodes)
	if l.hasErrors() {
		return nil
	}
	dag.Nodes = l.topoSort(order)
	return dag
}

func (l *loader) hasErrors() bool { return len(l.errs) > 0 }

// stage decodes one `name: {kind, needs, with}` entry.
func (l *loader) stage(mv *ast.MappingValueNode, needNodes map[*Node][]ast.Node) *Node {
	name := keyOf(mv)
	if !stageNameRE.MatchString(name) {
		l.errAt(mv.Key, "use letters (of any alphabet), digits, '_' and '-', starting with a letter", "bad stage name %q", name)
		return nil
	}
	n := &Node{Name: name, Line: mv.Key.GetToken().Position.Line}
	fields, ok := entries(mv.Value)
	if !ok {
		l.errAt(mv.Value, "write the stage as {kind: ..., needs: [...], with: {...}}", "stage %q must be a mapping", name)
		return nil
	}
	var withNode, kindNode ast.Node
	kindReported := false // an error about the kind is out: say nothing more of it
	for _, f := range fields {
		switch k := keyOf(f); k {
		case "kind":
			kindNode = f.Value
			if err := nodeToValue(f.Value, &n.KindName); err != nil {
				l.errAt(f.Value, "write the kind as a plain word, e.g. `kind: tokenize`", "stage %q: kind must be a string", name)
				kindReported = true
			}
		case "needs":
			if isNull(f.Value) {
				continue
			}
			n.needsLine = f.Key.GetToken().Position.Line
			switch v := f.Value.(type) {
			case *ast.SequenceNode:
				needNodes[n] = v.Values
			case *ast.StringNode: // one input, as GitHub Actions' needs: build
				needNodes[n] = []ast.Node{v}
			default:
				l.errAt(f.Value, "list the input stages, e.g. `needs: [chat]`", "stage %q: needs must be a list of stage names", name)
			}
		case "with":
			withNode = f.Value
		default:
			fix := "a stage knows only kind, needs and with; parameters go under `with:`"
			if s := spell.Closest(k, []string{"kind", "needs", "with"}); s != "" {
				fix = fmt.Sprintf("did you mean %q? %s", s, fix)
				kindReported = kindReported || s == "kind"
			}
			l.errAt(f.Key, fix, "stage %q: unknown key %q", name, k)
		}
	}
	if kindReported {
		return nil
	}
	if kindNode == nil {
		l.errAt(mv.Key, "add `kind:`; known kinds: "+strings.Join(l.kinds.Names(), ", "), "stage %q has no kind", name)
		return nil
	}
	if n.KindName == "" {
		l.errAt(kindNode, "write one of the known kinds: "+strings.Join(l.kinds.Names(), ", "), "stage %q: kind is empty", name)
		return nil
	}
	kind, ok := l.kinds.Lookup(n.KindName)
	if !ok {
		fix := "known kinds: " + strings.Join(l.kinds.Names(), ", ")
		if s := spell.Closest(n.KindName, l.kinds.Names()); s != "" {
			fix = fmt.Sprintf("did you mean %q? %s", s, fix)
		}
		l.errAt(kindNode, fix, "stage %q: unknown kind %q", name, n.KindName)
		return nil
	}
	n.Kind = kind
	n.Params = kind.Params()
	if !isNull(withNode) {
		n.with = withNode
		namesGood := l.checkParamNames(n, withNode)
		if !l.checkNumbers(n, withNode) || !namesGood {
			return nil
		}
		if err := nodeToValue(withNode, n.Params, yaml.DisallowUnknownField()); err != nil {
			l.errs = append(l.errs, l.decodeError(n, withNode, err))
			return nil
		}
		if err := checkFinite(n.Params); err != nil {
			l.errs = append(l.errs, l.paramError(n, err))
			return nil
		}
	}
	if v, ok := n.Params.(interface{ Validate() error }); ok {
		if err := v.Validate(); err != nil {
			// A kind may report each bad parameter (errors.Join).
			errs := []error{err}
			if j, ok := err.(interface{ Unwrap() []error }); ok {
				errs = j.Unwrap()
			}
			for _, err := range errs {
				l.errs = append(l.errs, l.paramError(n, err))
			}
			return nil
		}
	}
	canon, err := canonicalJSON(n.Params)
	if err != nil {
		l.errAt(mv.Key, "", "stage %q: parameters cannot be encoded: %s", name, err)
		l.errs[len(l.errs)-1].Err = err
		return nil
	}
	n.Canon = canon
	return n
}

// decodeError rewords a go-yaml decoding error of a stage's parameters in
// the spec's terms: the parameter's name, what it wants, what is known.
func (l *loader) decodeError(n *Node, with ast.Node, err error) *SpecError {
	e := l.yamlErr(err, "parameters of kind "+n.KindName+": "+strings.Join(paramNames(n.Params), ", "))
	var unknown *yaml.UnknownFieldError
	var typeErr *yaml.TypeError
	switch {
	case errors.As(err, &unknown):
		// checkParamNames reports these first; go-yaml's own error is the
		// backstop for a name it finds elsewhere.
		field := strings.TrimSuffix(strings.TrimPrefix(unknown.Message, `unknown field "`), `"`)
		path := keyPathAt(with, e.Line, e.Col)
		if path == "" {
			path = field
		}
		u := l.unknownParam(n, path)
		u.Line, u.Col, u.Err = e.Line, e.Col, err
		return u
	case errors.As(err, &typeErr):
		param := "a parameter"
		if p, _ := paramAt(with, e.Line, e.Col); p != "" {
			param = p
		}
		got := ""
		if tk := typeErr.Token; tk != nil {
			got = fmt.Sprintf(", got %q", tk.Value)
		}
		e.Msg = fmt.Sprintf("stage %q: %s must be %s%s", n.Name, param, describeType(typeErr.DstType), got)
		e.Fix = "write " + describeType(typeErr.DstType)
		if param != "a parameter" {
			e.Fix += " for " + param
		}
		return e
	}
	// A scalar where a list or a mapping belongs is no TypeError to go-yaml.
	param, value := paramAt(with, e.Line, e.Col)
	switch {
	case param == "":
	case strings.Contains(err.Error(), "where sequence is expected"):
		e.Msg = fmt.Sprintf("stage %q: %s must be a list", n.Name, param)
		e.Fix = fmt.Sprintf("write a list, e.g. %s: [%s]", param[strings.LastIndex(param, ".")+1:], value)
		if value == "" || strings.ContainsAny(value, "{}[]") { // a mapping, not one value to wrap
			e.Fix = fmt.Sprintf("write a list of values, %s: [a, b]", param[strings.LastIndex(param, ".")+1:])
		}
		return e
	case strings.Contains(err.Error(), "overflow"):
		e.Msg = fmt.Sprintf("stage %q: %s: %s is too large", n.Name, param, value)
		e.Fix = "write a number that fits in 64 bits"
		return e
	case strings.Contains(err.Error(), "where mapping is expected"):
		e.Msg = fmt.Sprintf("stage %q: %s must be a mapping", n.Name, param)
		e.Fix = "write a mapping of names to values, {name: value, …}"
		return e
	}
	e.Msg = fmt.Sprintf("stage %q: %s", n.Name, e.Msg)
	if e.Line == 0 {
		e.Line = n.Line
	}
	return e
}

// checkParamNames reports every name in with, and in the mappings of its
// nested parameters (multiple_choice: {…}), that the kind has no parameter
// for, in the order written: a spec carried over from another tool shows
// all its foreign names at once, not one per try.
func (l *loader) checkParamNames(n *Node, with ast.Node) bool {
	good := true
	walkParams(with, reflect.TypeOf(n.Params), "", func(path string, f *ast.MappingValueNode, sf *reflect.StructField) {
		if sf != nil {
			return
		}
		good = false
		e := l.unknownParam(n, path)
		if tk := f.Key.GetToken(); tk != nil {
			e.Line, e.Col = tk.Position.Line, tk.Position.Column
		}
		l.errs = append(l.errs, e)
	})
	return good
}

// unknownParam is the error for a parameter path ("lora_r",
// "multiple_choice.num_fewshot") that stage n's kind does not have: our
// name where another tool's is used, else the nearest known name.
func (l *loader) unknownParam(n *Node, path string) *SpecError {
	field, parent := path, ""
	if i := strings.LastIndex(path, "."); i >= 0 {
		parent, field = path[:i], path[i+1:]
	}
	e := &SpecError{File: l.file, Line: n.Line}
	known := paramNames(n.Params)
	if parent == "" {
		e.Msg = fmt.Sprintf("stage %q: unknown parameter %q for kind %s", n.Name, field, n.KindName)
		e.Fix = "parameters of kind " + n.KindName + ": " + strings.Join(known, ", ")
	} else {
		known = nestedParamNames(n.Params, parent)
		e.Msg = fmt.Sprintf("stage %q: unknown parameter %q", n.Name, path)
		e.Fix = "parameters of " + parent + ": " + strings.Join(known, ", ")
	}
	if ps, ok := n.Kind.(ParamSynonyms); ok {
		if ours, ok := ps.Synonyms()[path]; ok {
			e.Fix = fmt.Sprintf("%s is called %s here", field, ours)
			return e
		}
	}
	if pn, ok := n.Kind.(ParamNotes); ok {
		if note, ok := pn.ParamNotes()[path]; ok {
			e.Fix = fmt.Sprintf("%s: %s", field, note)
			return e
		}
	}
	if c := spell.Closest(field, known); c != "" {
		e.Fix = fmt.Sprintf("did you mean %q? %s", c, e.Fix)
	}
	return e
}

// walkParams calls visit for each entry of the mapping with, and of the
// mappings of its struct-typed parameters, recursively, with the entry's
// dotted path and the field of type t it sets: nil for a name t has none
// for.
func walkParams(with ast.Node, t reflect.Type, prefix string, visit func(path string, f *ast.MappingValueNode, sf *reflect.StructField)) {
	fields, ok := entries(with)
	if !ok {
		return
	}
	for _, f := range fields {
		path := prefix + keyOf(f)
		sf, ok := typeField(t, keyOf(f))
		if !ok {
			visit(path, f, nil)
			continue
		}
		visit(path, f, &sf)
		if st := nestedStruct(sf.Type); st != nil {
			walkParams(f.Value, st, path+".", visit)
		}
	}
}

// nestedStruct is the struct type a parameter of type t holds as a mapping
// of named fields (a struct, or a pointer to one, that decodes field by
// field), or nil.
func nestedStruct(t reflect.Type) reflect.Type {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t.Kind() != reflect.Struct {
		return nil
	}
	p := reflect.PointerTo(t)
	for _, custom := range []reflect.Type{
		reflect.TypeFor[yaml.BytesUnmarshaler](), reflect.TypeFor[yaml.InterfaceUnmarshaler](),
		reflect.TypeFor[encoding.TextUnmarshaler](), reflect.TypeFor[json.Unmarshaler](),
	} {
		if p.Implements(custom) {
			return nil
		}
	}
	return t
}

// paramAt names the parameter of with (multiple_choice.paths, for one
// nested in another) whose value stands at line and col, with the value's
// text; "" when none does.
func paramAt(with ast.Node, line, col int) (param, value string) {
	return pathAt(with, line, col, false)
}

// keyPathAt is the dotted path of the parameter whose name is written at
// line and col ("multiple_choice.shots").
func keyPathAt(with ast.Node, line, col int) string {
	p, _ := pathAt(with, line, col, true)
	return p
}

// pathAt finds the parameter whose name (atKey) or value stands at line
// and col: its dotted path, and the text there.
func pathAt(with ast.Node, line, col int, atKey bool) (path, text string) {
	fields, _ := entries(with)
	for _, f := range fields {
		n := f.Value
		if atKey {
			n = f.Key
		}
		if tk := n.GetToken(); tk != nil && tk.Position.Line == line && tk.Position.Column == col {
			return keyOf(f), tk.Value
		}
		if p, v := pathAt(f.Value, line, col, atKey); p != "" {
			return keyOf(f) + "." + p, v
		}
	}
	return "", ""
}

// nestedParamNames lists the names of the mapping parameter path
// ("multiple_choice") of params holds, or nil if it is none.
func nestedParamNames(params any, path string) []string {
	for _, name := range strings.Split(path, ".") {
		f, ok := paramField(params, name)
		if !ok {
			return nil
		}
		params = reflect.New(f.Type).Interface()
	}
	return paramNames(params)
}

func describeType(t reflect.Type) string {
	if t == nil {
		return "another type"
	}
	switch t.Kind() {
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return "a whole number"
	case reflect.Float32, reflect.Float64:
		return "a number"
	case reflect.Bool:
		return "true or false"
	case reflect.String:
		return "a string"
	case reflect.Slice, reflect.Array:
		return "a list"
	case reflect.Map, reflect.Struct:
		return "a mapping"
	}
	return t.String()
}

// A ParamError is a kind's complaint about one parameter; the loader turns
// it into a SpecError at that parameter's line.
type ParamError struct {
	Param string // the parameter's name as written in the spec
	Msg   string
	Fix   string
	Err   error // the cause, when there is one
}

func (e *ParamError) Error() string { return e.Param + ": " + e.Msg }
func (e *ParamError) Unwrap() error { return e.Err }

func (l *loader) paramError(n *Node, err error) *SpecError { return paramSpecError(l.file, n, err) }

// paramSpecError places err, an error of stage n of the spec file, at the
// parameter a *ParamError names (or at the stage).
func paramSpecError(file string, n *Node, err error) *SpecError {
	e := &SpecError{File: file, Line: n.Line, Msg: fmt.Sprintf("stage %q: %s", n.Name, err), Err: err}
	var pe *ParamError
	if errors.As(err, &pe) {
		e.Msg = fmt.Sprintf("stage %q: %s: %s", n.Name, pe.Param, pe.Msg)
		e.Fix = pe.Fix
		if pe.Param == "needs" && n.needsLine > 0 {
			e.Line = n.needsLine
		}
		if fields, ok := entries(n.with); ok {
			for _, f := range fields {
				if keyOf(f) == pe.Param {
					e.Line = f.Key.GetToken().Position.Line
					e.Col = f.Key.GetToken().Position.Column
				}
			}
		}
	}
	return e
}

func (l *loader) resolveNeeds(order []*Node, byName map[string]*Node, needNodes map[*Node][]ast.Node) {
	all := names(order) // every stage written, those in error too
	for name := range l.broken {
		all = append(all, name)
	}
	sort.Strings(all)
	// undefined reports a need of n's that names no stage.
	undefined := func(n *Node, nn ast.Node, dep string) {
		others := slices.DeleteFunc(slices.Clone(all), func(s string) bool { return s == n.Name })
		fix := "stages in this spec: " + strings.Join(others, ", ")
		if len(others) > 20 {
			fix = fmt.Sprintf("the spec's %d stages are listed by `pipeline plan`", len(others))
		}
		if s := spell.Closest(dep, others); s != "" {
			fix = fmt.Sprintf("did you mean %q? %s", s, fix)
		}
		l.errAt(nn, fix, "stage %q needs %q, which is not defined", n.Name, dep)
	}
	// A stage in error for its parameters still names its inputs.
	for n, nns := range needNodes {
		if byName[n.Name] == n {
			continue
		}
		for _, nn := range nns {
			var dep string
			if nodeToValue(nn, &dep) == nil && dep != "" && byName[dep] == nil && !l.broken[dep] {
				undefined(n, nn, dep)
			}
		}
	}
	var checked []*Node // whose inputs their kind checks
	for _, n := range order {
		seen := map[string]bool{}
		for _, nn := range needNodes[n] {
			var dep string
			if err := nodeToValue(nn, &dep); err != nil || dep == "" {
				l.errAt(nn, "list stage names, e.g. `needs: [chat]`", "stage %q: needs entries must be stage names", n.Name)
				continue
			}
			d := byName[dep]
			switch {
			case d == nil && l.broken[dep]:
				// Its own error is reported.
			case d == nil:
				undefined(n, nn, dep)
			case d == n:
				l.errAt(nn, "remove it from needs", "stage %q needs itself", n.Name)
			case seen[dep]:
				l.errAt(nn, "list each input once", "stage %q needs %q twice", n.Name, dep)
			default:
				seen[dep] = true
				n.Needs = append(n.Needs, d)
			}
		}
		if n.Kind == nil {
			continue
		}
		min, max := n.Kind.Inputs()
		switch got := len(needNodes[n]); {
		case got < min && min == max:
			l.errs = append(l.errs, &SpecError{File: l.file, Line: n.Line, Msg: fmt.Sprintf("stage %q (kind %s) needs exactly %d input stage(s), has %d", n.Name, n.KindName, min, got),
				Fix: "name its input with `needs: [stage]`"})
		case got < min:
			l.errs = append(l.errs, &SpecError{File: l.file, Line: n.Line, Msg: fmt.Sprintf("stage %q (kind %s) needs at least %d input stage(s), has %d", n.Name, n.KindName, min, got),
				Fix: "name its inputs with `needs: [...]`"})
		case max >= 0 && got > max:
			fix := fmt.Sprintf("a %s stage takes at most %d input(s)", n.KindName, max)
			if max == 0 {
				fix = fmt.Sprintf("a %s stage reads its own files; remove `needs:`", n.KindName)
			}
			l.errs = append(l.errs, &SpecError{File: l.file, Line: n.Line, Msg: fmt.Sprintf("stage %q (kind %s) has %d input stage(s)", n.Name, n.KindName, got), Fix: fix})
		default:
			checked = append(checked, n)
		}
	}
	// Once every stage's needs are resolved, so that a kind sees its
	// inputs' own inputs too.
	for _, n := range checked {
		l.checkInputKinds(n, len(needNodes[n]))
	}
	if !l.hasErrors() {
		if cycle := findCycle(order); cycle != nil {
			l.errs = append(l.errs, &SpecError{File: l.file, Line: cycle[0].Line,
				Msg: "stages form a cycle: " + strings.Join(names(cycle), " -> "),
				Fix: "a stage cannot depend, directly or not, on its own output; remove one of these needs"})
		}
	}
}

func names(ns []*Node) []string {
	out := make([]string, len(ns))
	for i, n := range ns {
		out[i] = n.Name
	}
	return out
}

// findCycle returns the stages of one cycle, first stage repeated at the end,
// or nil.
func findCycle(order []*Node) []*Node {
	const (
		unseen = iota
		active
		done
	)
	state := map[*Node]int{}
	var stack []*Node
	var visit func(n *Node) []*Node
	visit = func(n *Node) []*Node {
		state[n] = active
		stack = append(stack, n)
		for _, d := range n.Needs {
			switch state[d] {
			case active:
				for i, s := range stack {
					if s == d {
						return append(append([]*Node{}, stack[i:]...), d)
					}
				}
			case unseen:
				if c := visit(d); c != nil {
					return c
				}
			}
		}
		stack = stack[:len(stack)-1]
		state[n] = done
		return nil
	}
	for _, n := range order {
		if state[n] == unseen {
			if c := visit(n); c != nil {
				return c
			}
		}
	}
	return nil
}

// topoSort orders stages so that each comes after its needs, keeping the
// spec's order among stages that are free to go.
func (l *loader) topoSort(order []*Node) []*Node {
	placed := map[*Node]bool{}
	var out []*Node
	for len(out) < len(order) {
		for _, n := range order {
			if placed[n] {
				continue
			}
			ready := true
			for _, d := range n.Needs {
				ready = ready && placed[d]
			}
			if ready {
				placed[n] = true
				out = append(out, n)
			}
		}
	}
	return out
}

// paramNames lists the parameter names a params struct accepts, for messages.
func paramNames(p any) []string {
	t := reflect.TypeOf(p)
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t.Kind() != reflect.Struct {
		return nil
	}
	var out []string
	for i := 0; i < t.NumField(); i++ {
		if name, ok := specName(t.Field(i)); ok {
			out = append(out, name)
		}
	}
	return out
}

// specName is the name a spec gives a params struct's field (its yaml tag,
// else its json tag, else its lower-cased name); ok is false for a field no
// spec can set.
func specName(f reflect.StructField) (name string, ok bool) {
	if !f.IsExported() {
		return "", false
	}
	tag := f.Tag.Get("yaml")
	if tag == "" {
		tag = f.Tag.Get("json")
	}
	name, _, _ = strings.Cut(tag, ",")
	if name == "-" {
		return "", false
	}
	if name == "" {
		name = strings.ToLower(f.Name)
	}
	return name, true
}

// canonicalJSON encodes params deterministically: struct fields in
// declaration order, map keys sorted, no HTML escaping. Defaults are already
// filled in, so writing a default explicitly yields the same bytes.
func canonicalJSON(v any) ([]byte, error) {
	var buf bytes.Buffer
	enc := jsonEncoder(&buf)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return bytes.TrimRight(buf.Bytes(), "\n"), nil
}

// A ParamSynonyms is a Kind whose parameters other tools name otherwise
// (transformers' learning_rate is a qlora stage's lr): a spec that uses
// one of those names is told the name used here.
type ParamSynonyms interface {
	Synonyms() map[string]string // their name → ours; inside a mapping parameter, its path: "multiple_choice.num_fewshot"
}

// A ParamNotes is a Kind with notes on other tools' parameters that have
// no one name here (TRL's packing is the pack stage's whole work): a spec
// that uses one is told where its setting went.
type ParamNotes interface {
	ParamNotes() map[string]string // their name (or path, as for Synonyms) → what stands for it here
}

// An InputChecker is a Kind that reads only some kinds of input stages (a
// pack stage reads tokens, not chat text). The loader calls CheckInputs with
// a stage's needs, in the order written, before anything runs; a
// *ParamError whose Param is "needs" is reported at the stage's `needs:`,
// one naming a parameter at that parameter.
type InputChecker interface {
	CheckInputs(params any, needs []Need) error
}

// A Need is one input stage of a stage, as CheckInputs sees it.
type Need struct {
	Stage  string // its name
	Kind   string // its kind
	Params any    // its parameters, decoded and validated: what its kind's Params returned
	Needs  []Need // its own inputs (their Needs empty)
}

// checkInputKinds asks n's kind whether it can read its inputs, once every
// need is resolved.
func (l *loader) checkInputKinds(n *Node, written int) {
	ic, ok := n.Kind.(InputChecker)
	if !ok || len(n.Needs) != written {
		return
	}
	needs := make([]Need, len(n.Needs))
	for i, d := range n.Needs {
		if d.Kind == nil {
			return // reported already
		}
		needs[i] = Need{Stage: d.Name, Kind: d.KindName, Params: d.Params}
		for _, dd := range d.Needs {
			needs[i].Needs = append(needs[i].Needs, Need{Stage: dd.Name, Kind: dd.KindName, Params: dd.Params})
		}
	}
	if err := ic.CheckInputs(n.Params, needs); err != nil {
		l.errs = append(l.errs, l.paramError(n, err))
	}
}

// paramField finds the field of a params struct that the spec calls name.
func paramField(p any, name string) (reflect.StructField, bool) {
	return typeField(reflect.TypeOf(p), name)
}

// typeField is the field of struct type t (or of the struct t points to)
// that a spec calls name.
func typeField(t reflect.Type, name string) (reflect.StructField, bool) {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t.Kind() != reflect.Struct {
		return reflect.StructField{}, false
	}
	for i := 0; i < t.NumField(); i++ {
		if n, ok := specName(t.Field(i)); ok && n == name {
			return t.Field(i), true
		}
	}
	return reflect.StructField{}, false
}

func isUintKind(k reflect.Kind) bool {
	switch k {
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return true
	}
	return false
}

// hasParam says whether params has a parameter called name.
func hasParam(params any, name string) bool {
	_, ok := paramField(params, name)
	return ok
}

func isIntKind(k reflect.Kind) bool {
	switch k {
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return true
	}
	return false
}

// checkUTF8 refuses a spec that is not UTF-8, which YAML would read with
// its bad bytes as U+FFFD, carrying them into prompts and templates.
func checkUTF8(src []byte) *SpecError {
	fix := "save the spec as UTF-8 (most editors offer it under Save As or the encoding menu)"
	if bytes.HasPrefix(src, []byte{0xff, 0xfe}) || bytes.HasPrefix(src, []byte{0xfe, 0xff}) || bytes.IndexByte(src, 0) >= 0 {
		return &SpecError{Msg: "spec is UTF-16 or binary, not UTF-8 text", Fix: fix}
	}
	at := lines.InvalidUTF8At(string(src))
	if at < 0 {
		return nil
	}
	line := 1 + bytes.Count(src[:at], []byte("\n"))
	col := at - bytes.LastIndexByte(src[:at], '\n')
	return &SpecError{Line: line, Col: col, Msg: fmt.Sprintf("spec is not UTF-8 (byte 0x%02x): saved in a legacy encoding such as Windows-1254?", src[at]), Fix: fix}
}

// checkNumbers refuses values decoding would silently change: a
// parameter left empty (`lr:`, the default), a fractional value for an
// integer parameter (`seq_len: 100.7`, truncated), a whole number with a
// leading zero (`seq_len: 0512`, which YAML 1.1 reads as octal 330) or past
// 64 bits (wrapped), and a number written where text belongs that YAML
// would not keep as written (`model_id: 3.10` is "3.1", a column `0017` is
// "15").
func (l *loader) checkNumbers(n *Node, with ast.Node) bool {
	good := true
	asText := func(param string, v ast.Node) {
		if text, got, changed := numberAsText(v); changed {
			good = false
			l.errAt(v, fmt.Sprintf("quote it to keep it as written: %s: %q", param[strings.LastIndex(param, ".")+1:], text),
				"stage %q: %s: YAML reads %s as the number %s, not the text %q", n.Name, param, text, got, text)
		}
	}
	check := func(param string, v ast.Node, unsigned bool) {
		name := param[strings.LastIndex(param, ".")+1:] // as written in its mapping
		var got string
		switch t := v.(type) {
		case *ast.FloatNode:
			if t.Value == math.Trunc(t.Value) && math.Abs(t.Value) < 1<<53 {
				if unsigned && t.Value < 0 {
					good = false
					l.errAt(v, fmt.Sprintf("write a whole number of 0 or more, e.g. %s: 0", name),
						"stage %q: %s must not be negative, got %s", n.Name, param, t.GetToken().Value)
				}
				return
			}
			got = t.GetToken().Value
		case *ast.InfinityNode, *ast.NanNode:
			got = v.GetToken().Value
		case *ast.StringNode:
			// A whole number past 64 bits is a string to the YAML library,
			// which then wraps it round into the field.
			if tooLarge(t.Value, unsigned) {
				good = false
				l.errAt(v, "write a number that fits in 64 bits", "stage %q: %s: %s is too large", n.Name, param, t.Value)
			}
			return
		case *ast.IntegerNode:
			tk := t.GetToken().Value
			// Decoding would fail with the YAML library's overflow text.
			if unsigned && strings.HasPrefix(tk, "-") && strings.Trim(tk[1:], "0_") != "" {
				good = false
				l.errAt(v, fmt.Sprintf("write a whole number of 0 or more, e.g. %s: 0", name),
					"stage %q: %s must not be negative, got %s", n.Name, param, tk)
			}
			if digits := strings.TrimLeft(tk, "+-"); len(digits) > 1 && digits[0] == '0' && strings.Trim(digits, "0123456789_") == "" {
				good = false
				var read int64
				nodeToValue(v, &read)
				l.errAt(v, fmt.Sprintf("write %s: %s (or 0o%s for an octal number)", name, strings.TrimLeft(digits, "0_"), strings.TrimLeft(digits, "0_")),
					"stage %q: %s: %s has a leading zero, and YAML reads it as %d", n.Name, param, tk, read)
			}
			return
		default:
			return
		}
		good = false
		fix := fmt.Sprintf("write a whole number, e.g. %s: %.0f", name, wholeHint(v))
		if f, ok := v.(*ast.FloatNode); ok && f.Value > 0 && f.Value < 1 && strings.HasSuffix(param, "_steps") {
			// warmup_steps: 0.03 is transformers' warmup_ratio.
			if ratio := strings.TrimSuffix(param, "_steps") + "_ratio"; hasParam(n.Params, ratio) {
				fix += fmt.Sprintf(", or give the share of the run's steps as %s: %s", ratio, got)
			}
		}
		l.errAt(v, fix, "stage %q: %s must be a whole number, got %s", n.Name, param, got)
	}
	walkParams(with, reflect.TypeOf(n.Params), "", func(path string, f *ast.MappingValueNode, sf *reflect.StructField) {
		if sf == nil {
			return // checkParamNames says so
		}
		t := sf.Type
		if isNull(f.Value) {
			// `lr:` with nothing after it: a value forgotten, which
			// decoding would silently read as the default.
			good = false
			fix := fmt.Sprintf("give %s a value, or remove the line for the default", path)
			if d := defaultOf(n, path); d != "" {
				fix += " (" + d + ")"
			}
			l.errAt(f.Key, fix, "stage %q: %s is empty", n.Name, path)
			return
		}
		if textual(t) {
			switch v := f.Value.(type) {
			case *ast.SequenceNode:
				for _, e := range v.Values {
					asText(path, e)
				}
			case *ast.MappingNode:
				for _, e := range v.Values {
					asText(path+"."+keyOf(e), e.Value)
				}
			default:
				asText(path, v)
			}
		}
		switch {
		case isIntKind(t.Kind()):
			check(path, f.Value, isUintKind(t.Kind()))
		case (t.Kind() == reflect.Slice || t.Kind() == reflect.Array) && isIntKind(t.Elem().Kind()):
			if seq, ok := f.Value.(*ast.SequenceNode); ok {
				for _, v := range seq.Values {
					check(path, v, isUintKind(t.Elem().Kind()))
				}
			}
		}
	})
	return good
}

// defaultOf is the default of n's top-level parameter name as the spec
// would write it, "" when it has none to show.
func defaultOf(n *Node, name string) string {
	v := reflect.ValueOf(n.Kind.Params())
	for v.Kind() == reflect.Pointer {
		v = v.Elem()
	}
	sf, ok := typeField(v.Type(), name)
	if !ok || v.Kind() != reflect.Struct {
		return ""
	}
	d := v.FieldByIndex(sf.Index)
	if d.IsZero() {
		return ""
	}
	if d.Kind() == reflect.Slice {
		parts := make([]string, d.Len())
		for i := range parts {
			parts[i] = fmt.Sprint(d.Index(i).Interface())
		}
		return "[" + strings.Join(parts, ", ") + "]"
	}
	return fmt.Sprint(d.Interface())
}

// textual says whether a parameter of type t holds text: a string, or a
// list or mapping of strings.
func textual(t reflect.Type) bool {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	switch t.Kind() {
	case reflect.Slice, reflect.Array, reflect.Map:
		t = t.Elem()
	}
	return t.Kind() == reflect.String
}

// numberAsText is the text a number node v decodes to where a string is
// wanted, and whether that differs from the text written (changed): YAML
// reads 3.10 as 3.1, 0017 as octal 15 and 1_000 as 1000.
func numberAsText(v ast.Node) (written, got string, changed bool) {
	switch v.(type) {
	case *ast.IntegerNode, *ast.FloatNode, *ast.InfinityNode, *ast.NanNode:
	default:
		return "", "", false
	}
	written = v.GetToken().Value
	if err := nodeToValue(v, &got); err != nil {
		return written, "", false // decoding reports it
	}
	return written, got, got != written
}

// tooLarge says whether text is a whole number beyond 64 bits.
func tooLarge(text string, unsigned bool) bool {
	var err error
	if unsigned {
		_, err = strconv.ParseUint(strings.TrimPrefix(text, "+"), 0, 64)
	} else {
		_, err = strconv.ParseInt(text, 0, 64)
	}
	return errors.Is(err, strconv.ErrRange)
}

func wholeHint(v ast.Node) float64 {
	if f, ok := v.(*ast.FloatNode); ok && !math.IsInf(f.Value, 0) && math.Abs(f.Value) < 1<<53 {
		return math.Round(f.Value)
	}
	return 1
}

// checkFinite refuses NaN and infinite values (YAML's .nan and .inf) in a
// decoded params struct: no parameter means anything with them.
func checkFinite(p any) error {
	v := reflect.ValueOf(p)
	for v.Kind() == reflect.Pointer {
		if v.IsNil() {
			return nil
		}
		v = v.Elem()
	}
	if v.Kind() != reflect.Struct {
		return nil
	}
	for i := 0; i < v.NumField(); i++ {
		name, ok := specName(v.Type().Field(i))
		if !ok {
			continue
		}
		bad := func(x float64) error {
			return &ParamError{Param: name, Msg: fmt.Sprintf("must be a finite number, got %v", x),
				Fix: "YAML's .nan and .inf are not values a parameter can take; write a number"}
		}
		fv := v.Field(i)
		switch fv.Kind() {
		case reflect.Float32, reflect.Float64:
			if x := fv.Float(); math.IsNaN(x) || math.IsInf(x, 0) {
				return bad(x)
			}
		case reflect.Slice, reflect.Array:
			if e := fv.Type().Elem().Kind(); e == reflect.Float32 || e == reflect.Float64 {
				for j := 0; j < fv.Len(); j++ {
					if x := fv.Index(j).Float(); math.IsNaN(x) || math.IsInf(x, 0) {
						return bad(x)
					}
				}
			}
		}
	}
	return nil
}

// A yamlPanic is a panic of the YAML library on a spec, turned into an
// error: some malformed input (a stray tag before a null, say) crashes it.
type yamlPanic struct{ v any }

func (p yamlPanic) Error() string {
	return fmt.Sprintf("the YAML library cannot read this (%v)", p.v)
}

// parseYAML is parser.ParseBytes, with a panic returned as an error.
func parseYAML(src []byte) (file *ast.File, err error) {
	defer func() {
		if p := recover(); p != nil {
			file, err = nil, yamlPanic{p}
		}
	}()
	return parser.ParseBytes(src, 0)
}

// nodeToValue is yaml.NodeToValue, with a panic returned as an error.
func nodeToValue(n ast.Node, v any, opts ...yaml.DecodeOption) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = yamlPanic{p}
		}
	}()
	return yaml.NodeToValue(n, v, opts...)
}
