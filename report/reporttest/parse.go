// Package reporttest checks report pages for tests: Parse reads a page with
// an HTML parser (its structure, and that it loads nothing), and Browse
// renders it in headless Chromium at a desktop and a phone width, takes
// screenshots and queries the DOM.
package reporttest

import (
	"bytes"
	"errors"
	"fmt"
	"strings"

	"golang.org/x/net/html"
	"golang.org/x/net/html/atom"
)

// A Page is what a report shows, as an HTML parser reads it.
type Page struct {
	Title string
	// Charts by their data-chart name ("loss:adapter", "trend:…").
	Charts map[string]Chart
	// Tables by id, and the adapters' tables as "curves:<stage>".
	Tables map[string]Table
	// Nodes are the DAG drawing's stages and their states.
	Nodes map[string]string
	Edges int
	// Legend items of each training stage, as text.
	Legend map[string][]string
	// Sections by id.
	Sections map[string]bool
	Text     string // the text of the body
}

// A Chart is one SVG chart.
type Chart struct {
	Series []string // data-series of each series drawn
	Lines  int      // polylines
	Points int      // point markers
}

// A Table is a table's header and body cells, as text.
type Table struct {
	Head []string
	Rows [][]string
}

// Parse reads a report page and checks that it stands alone: a document
// with a language, a character set and a phone viewport, a
// Content-Security-Policy that forbids every fetch, and no script, external
// resource, font or URL in its elements, attributes or styles.
func Parse(data []byte) (*Page, error) {
	if !bytes.HasPrefix(bytes.TrimSpace(data), []byte("<!DOCTYPE html>")) {
		return nil, errors.New("no <!DOCTYPE html>")
	}
	doc, err := html.Parse(bytes.NewReader(data))
	if err != nil {
		return nil, err
	}
	p := &Page{Charts: map[string]Chart{}, Tables: map[string]Table{}, Nodes: map[string]string{},
		Legend: map[string][]string{}, Sections: map[string]bool{}}
	var problems []string
	var viewport, csp, charset, lang bool
	var walk func(n *html.Node)
	walk = func(n *html.Node) {
		if n.Type == html.ElementNode {
			problems = append(problems, standAlone(n)...)
			switch n.DataAtom {
			case atom.Html:
				lang = attr(n, "lang") != ""
			case atom.Meta:
				switch {
				case attr(n, "charset") != "":
					charset = true
				case attr(n, "name") == "viewport":
					viewport = strings.Contains(attr(n, "content"), "width=device-width")
				case strings.EqualFold(attr(n, "http-equiv"), "Content-Security-Policy"):
					csp = strings.Contains(attr(n, "content"), "default-src 'none'")
				}
			case atom.Title:
				if n.Parent != nil && n.Parent.DataAtom == atom.Head {
					p.Title = text(n)
				}
			case atom.Section:
				p.Sections[attr(n, "id")] = true
			case atom.Table:
				t := readTable(n)
				if id := attr(n, "id"); id != "" {
					p.Tables[id] = t
				} else if hasClass(n, "curves") {
					p.Tables["curves:"+attr(n, "data-stage")] = t
				}
			case atom.Ul:
				if st := attr(n, "data-legend"); st != "" {
					for li := n.FirstChild; li != nil; li = li.NextSibling {
						if li.DataAtom == atom.Li {
							p.Legend[st] = append(p.Legend[st], strings.Join(strings.Fields(text(li)), " "))
						}
					}
				}
			case atom.Svg:
				if name := attr(n, "data-chart"); name != "" {
					p.Charts[name] = readChart(n)
				}
			}
			if n.Data == "g" && hasClass(n, "node") {
				p.Nodes[attr(n, "data-stage")] = attr(n, "data-state")
			}
			if n.Data == "path" && hasClass(n, "edge") {
				p.Edges++
			}
			if n.DataAtom == atom.Body {
				p.Text = strings.Join(strings.Fields(text(n)), " ")
			}
		}
		for c := n.FirstChild; c != nil; c = c.NextSibling {
			walk(c)
		}
	}
	walk(doc)
	for ok, what := range map[*bool]string{&viewport: "a viewport meta with width=device-width", &csp: "a Content-Security-Policy with default-src 'none'",
		&charset: "a charset meta", &lang: "a lang on <html>"} {
		if !*ok {
			problems = append(problems, "no "+what)
		}
	}
	if len(problems) > 0 {
		return p, fmt.Errorf("the page does not stand alone:\n  %s", strings.Join(problems, "\n  "))
	}
	return p, nil
}

// standAlone lists what in element n could load something or run code.
func standAlone(n *html.Node) []string {
	var out []string
	switch n.Data {
	case "script", "link", "iframe", "frame", "object", "embed", "img", "image", "audio", "video", "source", "base", "form", "use", "foreignObject", "portal":
		out = append(out, fmt.Sprintf("<%s> element", n.Data))
	case "style":
		var css strings.Builder
		for c := n.FirstChild; c != nil; c = c.NextSibling {
			css.WriteString(c.Data)
		}
		if s := strings.ToLower(css.String()); strings.Contains(s, "url(") || strings.Contains(s, "@import") || strings.Contains(s, "@font-face") {
			out = append(out, "<style> loads a resource (url(), @import or @font-face)")
		}
	}
	for _, a := range n.Attr {
		k := strings.ToLower(a.Key)
		v := strings.TrimSpace(a.Val)
		switch {
		case strings.HasPrefix(k, "on"):
			out = append(out, fmt.Sprintf("<%s %s> event handler", n.Data, a.Key))
		case k == "src" || k == "srcset" || k == "action" || k == "poster" || k == "data" || k == "background":
			out = append(out, fmt.Sprintf("<%s %s=%q>", n.Data, a.Key, v))
		case k == "href" && !strings.HasPrefix(v, "#"):
			out = append(out, fmt.Sprintf("<%s href=%q> leaves the page", n.Data, v))
		case k == "style" && strings.Contains(strings.ToLower(v), "url("):
			out = append(out, fmt.Sprintf("<%s style=%q> loads a resource", n.Data, v))
		case strings.Contains(strings.ToLower(v), "javascript:"):
			out = append(out, fmt.Sprintf("<%s %s=%q>", n.Data, a.Key, v))
		}
	}
	return out
}

func readTable(n *html.Node) Table {
	var t Table
	var walk func(n *html.Node, inHead bool)
	walk = func(n *html.Node, inHead bool) {
		if n.DataAtom == atom.Thead {
			inHead = true
		}
		if n.DataAtom == atom.Tr {
			var cells []string
			for c := n.FirstChild; c != nil; c = c.NextSibling {
				if c.DataAtom == atom.Td || c.DataAtom == atom.Th {
					cells = append(cells, strings.Join(strings.Fields(text(c)), " "))
				}
			}
			if inHead {
				t.Head = cells
			} else {
				t.Rows = append(t.Rows, cells)
			}
			return
		}
		for c := n.FirstChild; c != nil; c = c.NextSibling {
			walk(c, inHead)
		}
	}
	walk(n, false)
	return t
}

func readChart(n *html.Node) Chart {
	var c Chart
	var walk func(n *html.Node)
	walk = func(n *html.Node) {
		if n.Type == html.ElementNode {
			switch {
			case n.Data == "g" && hasClass(n, "series"):
				c.Series = append(c.Series, attr(n, "data-series"))
			case n.Data == "polyline":
				c.Lines++
			case n.Data == "circle" && hasClass(n, "point"):
				c.Points++
			}
		}
		for ch := n.FirstChild; ch != nil; ch = ch.NextSibling {
			walk(ch)
		}
	}
	walk(n)
	return c
}

// Column returns the cells of the column headed name ("" for none).
func (t Table) Column(name string) []string {
	for i, h := range t.Head {
		if h == name {
			var out []string
			for _, r := range t.Rows {
				if i < len(r) {
					out = append(out, r[i])
				} else {
					out = append(out, "")
				}
			}
			return out
		}
	}
	return nil
}

func attr(n *html.Node, key string) string {
	for _, a := range n.Attr {
		if a.Key == key {
			return a.Val
		}
	}
	return ""
}

func hasClass(n *html.Node, class string) bool {
	for _, c := range strings.Fields(attr(n, "class")) {
		if c == class {
			return true
		}
	}
	return false
}

// text is the text inside n, <title> tooltips of SVG left out.
func text(n *html.Node) string {
	var b strings.Builder
	var walk func(n *html.Node)
	walk = func(n *html.Node) {
		switch {
		case n.Type == html.TextNode:
			b.WriteString(n.Data)
			b.WriteByte(' ')
		case n.Type == html.ElementNode && (n.Data == "title" && n.Parent != nil && n.Parent.DataAtom != atom.Head || n.DataAtom == atom.Style):
			return
		}
		for c := n.FirstChild; c != nil; c = c.NextSibling {
			walk(c)
		}
	}
	walk(n)
	return b.String()
}
