package report

import (
	"fmt"
	"html/template"
	"io"
	"math"
	"strings"
	"time"

	"gemmaft/pipeline"
	"gemmaft/trainer"
)

// WriteHTML writes the report as one self-contained HTML page.
func (r *Report) WriteHTML(w io.Writer) error {
	return page.Execute(w, r)
}

// Charts of a training stage: train loss, eval loss (when evaluated),
// learning rate and throughput, each with one series per adapter.
func (t *Training) Charts() []template.HTML {
	metric := func(id, title, ylabel string, val func(trainer.Metric) (float64, bool), markers bool) chart {
		c := chart{ID: id + ":" + t.Stage, Title: title, XLabel: "optimizer step", YLabel: ylabel}
		for i, cv := range t.Curves {
			s := series{Name: cv.Key, Title: cv.Label + " " + cv.Diff, Color: cv.Color, Markers: markers}
			if i == 0 {
				s.Width = 3
			}
			s.Dash = cv.State == "failed" || cv.State == "canceled"
			for _, m := range cv.Metrics {
				if v, ok := val(m); ok {
					s.Points = append(s.Points, point{X: float64(m.Step), Y: v, Title: fmt.Sprintf("%s: step %d, %s %.4g", cv.Label, m.Step, ylabel, v)})
				}
			}
			c.Series = append(c.Series, s)
		}
		return c
	}
	out := []template.HTML{metric("loss", t.Stage+": training loss by step, one line per adapter", "train loss",
		func(m trainer.Metric) (float64, bool) { return m.Loss, true }, false).svg()}
	if t.HasEval {
		out = append(out, metric("eval-loss", t.Stage+": held-out loss by step, one line per adapter", "eval loss",
			func(m trainer.Metric) (float64, bool) {
				return deref(m.EvalLoss), m.EvalLoss != nil && !math.IsNaN(*m.EvalLoss)
			}, true).svg())
	}
	out = append(out,
		metric("lr", t.Stage+": learning rate by step", "learning rate", func(m trainer.Metric) (float64, bool) { return m.LR, true }, false).svg(),
		metric("throughput", t.Stage+": training throughput by step", "tokens/s", func(m trainer.Metric) (float64, bool) { return m.TokensPerSec, true }, false).svg())
	return out
}

// Trend is the chart of one eval score across the runs shown.
func (r *Report) Trend(score string) template.HTML {
	c := chart{ID: "trend:" + score, Title: score + " across runs", XLabel: "run", YLabel: score}
	s := series{Name: score, Color: palette[0], Markers: true}
	for i := len(r.Runs) - 1; i >= 0; i-- { // oldest left
		run := r.Runs[i]
		c.XTicks = append(c.XTicks, tick{float64(run.Index), run.Tick})
		if v, ok := run.Scores[score]; ok {
			s.Points = append(s.Points, point{X: float64(run.Index), Y: v, Title: fmt.Sprintf("%s: %s %.4g", run.Label, score, v)})
		}
	}
	c.Series = []series{s}
	return c.svg()
}

// Drawing draws the last run's stages.
func (r *Report) Drawing() template.HTML { return dagSVG(r.Stages) }

// Last is the newest run.
func (r *Report) Last() *Run { return r.Runs[0] }

// Score formats a run's score with its change since the last run before
// it that has the score.
func (r *Report) Score(run *Run, name string) template.HTML {
	v, ok := run.Scores[name]
	if !ok {
		return "—"
	}
	out := template.HTMLEscapeString(fmt.Sprintf("%.4g", v))
	for _, older := range r.Runs { // newest first: the last run before with this score
		if older.Index >= run.Index {
			continue
		}
		if p, ok := older.Scores[name]; ok {
			if p != v {
				out += fmt.Sprintf(` <span class="delta" title="change since %s">%+.3g</span>`, older.Label, v-p)
			}
			break
		}
	}
	return template.HTML(out)
}

// Curve figures, for the table under the charts.
func (c *Curve) Steps() string {
	if len(c.Metrics) == 0 {
		return "—"
	}
	return count(float64(c.Metrics[len(c.Metrics)-1].Step))
}

func (c *Curve) FinalLoss() string {
	if len(c.Metrics) == 0 {
		return "—"
	}
	return fmt.Sprintf("%.4f", c.Metrics[len(c.Metrics)-1].Loss)
}

func (c *Curve) EvalLoss() string {
	if c.BestStep > 0 { // the adapter's: the best evaluation's, not the last
		return fmt.Sprintf("%.4f (step %d)", c.BestEval, c.BestStep)
	}
	for i := len(c.Metrics) - 1; i >= 0; i-- {
		if e := c.Metrics[i].EvalLoss; e != nil && !math.IsNaN(*e) {
			return fmt.Sprintf("%.4f", *e)
		}
	}
	return "—"
}

func (c *Curve) Throughput() string {
	var tokens, secs float64
	for _, m := range c.Metrics {
		tokens, secs = float64(m.Tokens), m.ElapsedSec
	}
	if secs <= 0 {
		return "—"
	}
	return compact(tokens / secs)
}

func (c *Curve) PeakGPU() string {
	var peak float64
	for _, m := range c.Metrics {
		peak = math.Max(peak, m.PeakGPUGiB)
	}
	if peak == 0 {
		return "—"
	}
	return fmt.Sprintf("%.1f GiB", peak)
}

func (c *Curve) TrainTime() string {
	if len(c.Metrics) == 0 {
		return "—"
	}
	return duration(c.Metrics[len(c.Metrics)-1].ElapsedSec)
}

// RunLabels names the runs that used the adapter.
func (c *Curve) RunLabels() string {
	var ls []string
	for _, r := range c.Runs {
		ls = append(ls, r.Label)
	}
	if len(ls) > 3 {
		return fmt.Sprintf("%s … %s (%d runs)", ls[0], ls[len(ls)-1], len(ls))
	}
	return strings.Join(ls, ", ")
}

func deref(p *float64) float64 {
	if p == nil {
		return math.NaN()
	}
	return *p
}

// count writes an integer with thousands separators.
func count(v float64) string {
	s := fmt.Sprintf("%.0f", math.Abs(v))
	var b strings.Builder
	if v < 0 {
		b.WriteByte('-')
	}
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteRune(',')
		}
		b.WriteRune(c)
	}
	return b.String()
}

// compact writes a number in at most four significant digits with k, M, G.
func compact(v float64) string {
	a := math.Abs(v)
	switch {
	case a >= 1e9:
		return fmt.Sprintf("%.3gG", v/1e9)
	case a >= 1e6:
		return fmt.Sprintf("%.3gM", v/1e6)
	case a >= 1e4:
		return fmt.Sprintf("%.3gk", v/1e3)
	case a == math.Trunc(a):
		return fmt.Sprintf("%.0f", v)
	}
	return fmt.Sprintf("%.4g", v)
}

// duration writes seconds as people read them: 0.42 s, 3 m 12 s, 2 h 05 m.
func duration(s float64) string {
	switch {
	case s < 10:
		return fmt.Sprintf("%.2f s", s)
	case s < 60:
		return fmt.Sprintf("%.1f s", s)
	case s < 3600:
		return fmt.Sprintf("%d m %02d s", int(s)/60, int(s)%60)
	}
	return fmt.Sprintf("%d h %02d m", int(s)/3600, int(s)%3600/60)
}

var funcs = template.FuncMap{
	"unfinishedCauses": func() string { return pipeline.UnfinishedCauses },
	"dur":              duration,
	"bytes":            pipeline.HumanBytes,
	"count":            func(v any) string { f, _ := num(v); return count(f) },
	"opt": func(p *float64) string {
		if p == nil {
			return "—"
		}
		return count(*p)
	},
	"pct": func(p *float64) string {
		if p == nil {
			return "—"
		}
		return fmt.Sprintf("%.1f%%", *p*100)
	},
	"loss": func(v float64) string {
		if math.IsNaN(v) {
			return "—"
		}
		return fmt.Sprintf("%.4f", v)
	},
	"when":  func(t time.Time) string { return t.Local().Format("Mon Jan 2 2006, 15:04") },
	"iso":   func(t time.Time) string { return t.UTC().Format(time.RFC3339) },
	"short": pipeline.ShortKey,
	"clip":  clip,
	"trend": func(c DataTrendCol, i int) string {
		v := c.Values[i]
		if v == nil {
			return "—"
		}
		if c.Percent {
			return fmt.Sprintf("%.1f%%", *v*100)
		}
		return count(*v)
	},
	"stateClass": func(s string) string { return "state-" + strings.ReplaceAll(s, " ", "-") },
}

var page = template.Must(template.New("report").Funcs(funcs).Parse(pageTemplate))
