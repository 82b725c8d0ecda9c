package report

import (
	"fmt"
	"html"
	"html/template"
	"math"
	"strings"
)

// A chart is a line chart drawn as inline SVG. Text takes the page's font
// and colour through CSS classes, so it follows a dark colour scheme.
type chart struct {
	ID             string // data-chart attribute, for tests and readers
	Title          string // the accessible name
	XLabel, YLabel string
	XTicks         []tick // fixed ticks (runs); nil: numeric ticks
	Series         []series
}

type tick struct {
	X     float64
	Label string
}

type series struct {
	Name    string // data-series attribute
	Title   string // tooltip
	Color   string
	Width   float64
	Dash    bool
	Markers bool
	Points  []point
}

type point struct {
	X, Y  float64
	Title string
}

// Chart size in SVG units; CSS scales it to the width of its box, text
// with it: 13 units read as about 11 px on a phone, 16 px on a desktop.
const (
	chartW, chartH                       = 440.0, 280.0
	padLeft, padRight, padTop, padBottom = 62.0, 12.0, 10.0, 44.0
)

func (c chart) svg() template.HTML {
	var b strings.Builder
	fmt.Fprintf(&b, `<svg class="chart" viewBox="0 0 %g %g" role="img" aria-label="%s" data-chart="%s">`,
		chartW, chartH, attr(c.Title), attr(c.ID))
	fmt.Fprintf(&b, `<title>%s</title>`, html.EscapeString(c.Title))
	xmin, xmax, ymin, ymax := math.Inf(1), math.Inf(-1), math.Inf(1), math.Inf(-1)
	for _, s := range c.Series {
		for _, p := range s.Points {
			xmin, xmax = math.Min(xmin, p.X), math.Max(xmax, p.X)
			ymin, ymax = math.Min(ymin, p.Y), math.Max(ymax, p.Y)
		}
	}
	for _, t := range c.XTicks {
		xmin, xmax = math.Min(xmin, t.X), math.Max(xmax, t.X)
	}
	if math.IsInf(xmin, 0) || math.IsInf(ymin, 0) {
		fmt.Fprintf(&b, `<text class="empty" x="%g" y="%g" text-anchor="middle">nothing logged</text></svg>`, chartW/2, chartH/2)
		return template.HTML(b.String())
	}
	if xmax == xmin {
		xmin, xmax = xmin-1, xmax+1
	}
	if len(c.XTicks) > 0 { // runs: half a step of air on each side
		xmin, xmax = xmin-0.5, xmax+0.5
	}
	ystep := niceStep((ymax - ymin) / 5)
	if ymax == ymin {
		ystep = niceStep(math.Max(math.Abs(ymin)/10, 1e-9))
	}
	ymin, ymax = math.Floor(ymin/ystep)*ystep, math.Ceil(ymax/ystep)*ystep
	if ymax == ymin {
		ymin, ymax = ymin-ystep, ymax+ystep
	}
	px := func(x float64) float64 { return padLeft + (x-xmin)/(xmax-xmin)*(chartW-padLeft-padRight) }
	py := func(y float64) float64 { return chartH - padBottom - (y-ymin)/(ymax-ymin)*(chartH-padTop-padBottom) }

	for y := ymin; y <= ymax+ystep/2; y += ystep {
		fmt.Fprintf(&b, `<line class="grid" x1="%g" y1="%.1f" x2="%g" y2="%.1f"/>`, padLeft, py(y), chartW-padRight, py(y))
		fmt.Fprintf(&b, `<text class="tick" x="%g" y="%.1f" text-anchor="end">%s</text>`, padLeft-6, py(y)+4, axisNumber(y, ystep))
	}
	ticks := c.XTicks
	if ticks == nil {
		xstep := math.Max(1, niceStep((xmax-xmin)/6))
		for x := math.Ceil(xmin/xstep) * xstep; x <= xmax+1e-9; x += xstep {
			ticks = append(ticks, tick{x, axisNumber(x, xstep)})
		}
	} else if len(ticks) > 6 { // keep run labels apart: every k-th, always the newest
		k := (len(ticks) + 5) / 6
		var kept []tick
		for i := len(ticks) - 1; i >= 0; i -= k {
			kept = append(kept, ticks[i])
		}
		ticks = kept
	}
	for _, t := range ticks {
		fmt.Fprintf(&b, `<line class="grid" x1="%.1f" y1="%g" x2="%.1f" y2="%g"/>`, px(t.X), padTop, px(t.X), chartH-padBottom)
		fmt.Fprintf(&b, `<text class="tick" x="%.1f" y="%g" text-anchor="middle">%s</text>`, px(t.X), chartH-padBottom+16, html.EscapeString(t.Label))
	}
	fmt.Fprintf(&b, `<rect class="frame" x="%g" y="%g" width="%g" height="%g"/>`, padLeft, padTop, chartW-padLeft-padRight, chartH-padTop-padBottom)
	fmt.Fprintf(&b, `<text class="axis" x="%g" y="%g" text-anchor="middle">%s</text>`, (padLeft+chartW-padRight)/2, chartH-6, html.EscapeString(c.XLabel))
	fmt.Fprintf(&b, `<text class="axis" transform="translate(14 %g) rotate(-90)" text-anchor="middle">%s</text>`, (padTop+chartH-padBottom)/2, html.EscapeString(c.YLabel))

	// Oldest first, so the newest (the first series) is drawn on top.
	for i := len(c.Series) - 1; i >= 0; i-- {
		s := c.Series[i]
		width := s.Width
		if width == 0 {
			width = 2
		}
		fmt.Fprintf(&b, `<g class="series" data-series="%s">`, attr(s.Name))
		if s.Title != "" {
			fmt.Fprintf(&b, `<title>%s</title>`, html.EscapeString(s.Title))
		}
		if len(s.Points) > 1 {
			var pts strings.Builder
			for j, p := range s.Points {
				if j > 0 {
					pts.WriteByte(' ')
				}
				fmt.Fprintf(&pts, "%.1f,%.1f", px(p.X), py(p.Y))
			}
			dash := ""
			if s.Dash {
				dash = ` stroke-dasharray="6 4"`
			}
			fmt.Fprintf(&b, `<polyline fill="none" stroke="%s" stroke-width="%g" stroke-linejoin="round"%s points="%s"/>`, s.Color, width, dash, pts.String())
		}
		if s.Markers || len(s.Points) == 1 {
			for _, p := range s.Points {
				fmt.Fprintf(&b, `<circle class="point" cx="%.1f" cy="%.1f" r="4" fill="%s">`, px(p.X), py(p.Y), s.Color)
				if p.Title != "" {
					fmt.Fprintf(&b, `<title>%s</title>`, html.EscapeString(p.Title))
				}
				b.WriteString(`</circle>`)
			}
		}
		b.WriteString(`</g>`)
	}
	b.WriteString(`</svg>`)
	return template.HTML(b.String())
}

// niceStep rounds a raw tick spacing up to 1, 2 or 5 times a power of ten.
func niceStep(raw float64) float64 {
	if raw <= 0 || math.IsNaN(raw) || math.IsInf(raw, 0) {
		return 1
	}
	p := math.Pow(10, math.Floor(math.Log10(raw)))
	for _, f := range []float64{1, 2, 5, 10} {
		if f*p >= raw*(1-1e-9) {
			return f * p
		}
	}
	return 10 * p
}

// axisNumber writes a tick value with as many digits as its step needs.
func axisNumber(v, step float64) string {
	if math.Abs(v) < step*1e-6 {
		v = 0
	}
	if math.Abs(v) >= 1e5 {
		return compact(v)
	}
	digits := max(0, int(-math.Floor(math.Log10(step)+1e-9)))
	return fmt.Sprintf("%.*f", digits, v)
}

// The DAG drawing: one row per depth, boxes coloured by state, edges from
// each input to the stage that needs it.
const (
	nodeW, nodeH = 176.0, 62.0
	gapX, gapY   = 20.0, 38.0
	dagPad       = 10.0
)

func dagSVG(rows []StageRow) template.HTML {
	cols, depths := 1, 1
	for _, r := range rows {
		cols, depths = max(cols, r.Column+1), max(depths, r.Depth+1)
	}
	w := 2*dagPad + float64(cols)*nodeW + float64(cols-1)*gapX
	h := 2*dagPad + float64(depths)*nodeH + float64(depths-1)*gapY
	x := func(r StageRow) float64 { return dagPad + float64(r.Column)*(nodeW+gapX) }
	y := func(r StageRow) float64 { return dagPad + float64(r.Depth)*(nodeH+gapY) }
	var b strings.Builder
	fmt.Fprintf(&b, `<svg class="dag" viewBox="0 0 %g %g" style="max-width:%gpx" role="img" aria-label="the DAG of the last run, each stage with its state">`, w, h, w*1.15)
	b.WriteString(`<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" class="arrowhead"/></marker></defs>`)
	byName := map[string]StageRow{}
	for _, r := range rows {
		byName[r.Name] = r
	}
	for _, r := range rows {
		for _, n := range r.Needs {
			from := byName[n]
			x1, y1 := x(from)+nodeW/2, y(from)+nodeH
			x2, y2 := x(r)+nodeW/2, y(r)
			// Straight down the input's column, then a bend into the stage.
			fmt.Fprintf(&b, `<path class="edge" data-from="%s" data-to="%s" d="M%.1f,%.1f L%.1f,%.1f C%.1f,%.1f %.1f,%.1f %.1f,%.1f" marker-end="url(#arrow)"/>`,
				attr(n), attr(r.Name), x1, y1, x1, y2-gapY, x1, y2-gapY/2, x2, y2-gapY/2, x2, y2-1)
		}
	}
	for _, r := range rows {
		state := strings.ReplaceAll(r.State, " ", "-")
		fmt.Fprintf(&b, `<g class="node state-%s" data-stage="%s" data-state="%s">`, state, attr(r.Name), attr(r.State))
		fmt.Fprintf(&b, `<title>%s</title>`, html.EscapeString(nodeTitle(r)))
		fmt.Fprintf(&b, `<rect x="%g" y="%g" width="%g" height="%g" rx="8"/>`, x(r), y(r), nodeW, nodeH)
		fmt.Fprintf(&b, `<text class="name" x="%g" y="%g">%s</text>`, x(r)+10, y(r)+20, html.EscapeString(clip(r.Name, 19)))
		fmt.Fprintf(&b, `<text x="%g" y="%g">%s · %s</text>`, x(r)+10, y(r)+37, html.EscapeString(clip(r.Kind, 10)), html.EscapeString(r.State))
		fmt.Fprintf(&b, `<text x="%g" y="%g">%s</text>`, x(r)+10, y(r)+53, html.EscapeString(nodeFacts(r)))
		b.WriteString(`</g>`)
	}
	b.WriteString(`</svg>`)
	return template.HTML(b.String())
}

func nodeTitle(r StageRow) string {
	t := fmt.Sprintf("%s (%s): %s", r.Name, r.Kind, r.State)
	if r.Reason != "" {
		t += " — " + r.Reason
	}
	if r.Error != "" {
		t += "\n" + r.Error
	}
	return t
}

func nodeFacts(r StageRow) string {
	var parts []string
	if r.Rows > 0 {
		parts = append(parts, compact(float64(r.Rows))+" rows")
	}
	switch r.State {
	case "computed", "failed", "canceled":
		parts = append(parts, duration(r.OwnSeconds())) // as the table: less the wait for its inputs
	case "cached":
		parts = append(parts, "cache hit")
	}
	if len(parts) == 0 {
		return "—"
	}
	return strings.Join(parts, " · ")
}

func clip(s string, n int) string {
	r := []rune(s)
	if len(r) <= n {
		return s
	}
	return string(r[:n-1]) + "…"
}

// attr escapes s for an attribute value.
func attr(s string) string { return html.EscapeString(s) }
