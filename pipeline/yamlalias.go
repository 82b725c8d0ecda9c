package pipeline

import "github.com/goccy/go-yaml/ast"

// YAML anchors (&name), aliases (*name) and merge keys (<<: *name) are
// resolved in the syntax tree before a spec is read, so that a stage may
// reuse another's parameters and every later step sees plain mappings,
// sequences and scalars, still carrying the line of what they came from.

// maxAliasExpansion bounds how many nodes aliases may add, so that a spec of
// nested aliases (the "billion laughs") is refused instead of decoded.
const maxAliasExpansion = 100_000

type aliasResolver struct {
	l       *loader
	anchors map[string]ast.Node
	sizes   map[ast.Node]int
	added   int
	tooBig  bool
}

func (l *loader) resolveAliases(n ast.Node) ast.Node {
	r := &aliasResolver{l: l, anchors: map[string]ast.Node{}, sizes: map[ast.Node]int{}}
	return r.resolve(n, 0)
}

func nodeName(n ast.Node) string {
	if n == nil {
		return ""
	}
	if tk := n.GetToken(); tk != nil {
		return tk.Value
	}
	return n.String()
}

func (r *aliasResolver) resolve(n ast.Node, depth int) ast.Node {
	if n == nil {
		return nil
	}
	if depth > 200 {
		r.l.errAt(n, "flatten the spec", "the spec nests deeper than 200 levels")
		return ast.Null(n.GetToken())
	}
	switch t := n.(type) {
	case *ast.AnchorNode:
		v := r.resolve(t.Value, depth+1)
		if v == nil {
			v = ast.Null(t.GetToken())
		}
		// Registered after its value: an alias inside its own anchor finds
		// nothing, so a spec cannot describe an endless structure.
		r.anchors[nodeName(t.Name)] = v
		return v
	case *ast.AliasNode:
		name := nodeName(t.Value)
		v, ok := r.anchors[name]
		if !ok {
			r.l.errAt(t, "define the anchor (&"+name+") before the alias that uses it", "alias *%s refers to no anchor defined before it", name)
			return ast.Null(t.GetToken())
		}
		r.added += r.size(v)
		if r.added > maxAliasExpansion && !r.tooBig {
			r.tooBig = true
			r.l.errAt(t, "use fewer nested aliases", "aliases expand the spec to more than %d values", maxAliasExpansion)
		}
		if r.tooBig {
			return ast.Null(t.GetToken())
		}
		return v
	case *ast.TagNode:
		t.Value = r.resolve(t.Value, depth+1)
		return t
	case *ast.SequenceNode:
		for i, v := range t.Values {
			t.Values[i] = r.resolve(v, depth+1)
		}
		return t
	case *ast.MappingValueNode:
		if _, ok := t.Key.(*ast.MergeKeyNode); ok {
			m := ast.Mapping(t.GetToken(), t.IsFlowStyle, t)
			return r.mapping(m, depth)
		}
		t.Value = r.resolve(t.Value, depth+1)
		return t
	case *ast.MappingNode:
		return r.mapping(t, depth)
	}
	return n
}

// mapping resolves a mapping's values and splices in its merge keys: the
// mappings a `<<` names give their entries unless the mapping sets the same
// key itself.
func (r *aliasResolver) mapping(m *ast.MappingNode, depth int) ast.Node {
	var own []*ast.MappingValueNode
	var merged [][]*ast.MappingValueNode
	for _, mv := range m.Values {
		mv.Value = r.resolve(mv.Value, depth+1)
		if _, ok := mv.Key.(*ast.MergeKeyNode); !ok {
			own = append(own, mv)
			continue
		}
		var sources []ast.Node
		if seq, ok := mv.Value.(*ast.SequenceNode); ok {
			sources = seq.Values
		} else {
			sources = []ast.Node{mv.Value}
		}
		for _, s := range sources {
			es, ok := entries(s)
			if !ok {
				r.l.errAt(mv.Value, "merge a mapping, e.g. `<<: *defaults` where `defaults: &defaults {lr: 2.0e-4}`", "`<<` must name a mapping, not %s", s.Type())
				continue
			}
			merged = append(merged, es)
		}
	}
	if len(merged) == 0 {
		return m
	}
	set := map[string]bool{}
	for _, mv := range own {
		set[keyOf(mv)] = true
	}
	var out []*ast.MappingValueNode
	// Earlier merge sources win over later ones, as in YAML 1.1.
	for _, es := range merged {
		for _, mv := range es {
			if k := keyOf(mv); !set[k] {
				set[k] = true
				out = append(out, mv)
			}
		}
	}
	m.Values = append(out, own...)
	return m
}

// size counts the nodes under n, each shared node once per use.
func (r *aliasResolver) size(n ast.Node) int {
	if n == nil {
		return 0
	}
	if s, ok := r.sizes[n]; ok {
		return s
	}
	s := 1
	switch t := n.(type) {
	case *ast.SequenceNode:
		for _, v := range t.Values {
			s += r.size(v)
		}
	case *ast.MappingNode:
		for _, mv := range t.Values {
			s += r.size(mv.Value)
		}
	case *ast.MappingValueNode:
		s += r.size(t.Value)
	case *ast.TagNode:
		s += r.size(t.Value)
	}
	if s > maxAliasExpansion {
		s = maxAliasExpansion + 1
	}
	r.sizes[n] = s
	return s
}
