package trainer

import (
	"bytes"
	"fmt"
	"math"
)

// LossCurveSVG draws the training loss (and the eval loss, where logged)
// against the step as a self-contained SVG a browser opens.
func LossCurveSVG(history []Metric) []byte {
	const (
		width, height          = 720.0, 420.0
		left, right, top, bott = 70.0, 20.0, 40.0, 50.0
	)
	var b bytes.Buffer
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%g" height="%g" viewBox="0 0 %g %g" font-family="sans-serif" font-size="12">`+"\n", width, height, width, height)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")
	fmt.Fprintf(&b, `<text x="%g" y="24" font-size="15">Loss by optimizer step</text>`+"\n", left)
	if len(history) == 0 {
		fmt.Fprintf(&b, `<text x="%g" y="%g">no steps logged</text></svg>`+"\n", left, height/2)
		return b.Bytes()
	}
	xmin, xmax := float64(history[0].Step), float64(history[len(history)-1].Step)
	ymin, ymax := math.Inf(1), math.Inf(-1)
	for _, m := range history {
		ymin, ymax = math.Min(ymin, m.Loss), math.Max(ymax, m.Loss)
		if m.EvalLoss != nil && !math.IsNaN(*m.EvalLoss) {
			ymin, ymax = math.Min(ymin, *m.EvalLoss), math.Max(ymax, *m.EvalLoss)
		}
	}
	if xmax == xmin {
		xmin, xmax = xmin-1, xmax+1
	}
	ystep := niceStep((ymax - ymin) / 5)
	ymin, ymax = math.Floor(ymin/ystep)*ystep, math.Ceil(ymax/ystep)*ystep
	if ymax == ymin {
		ymax = ymin + ystep
	}
	px := func(x float64) float64 { return left + (x-xmin)/(xmax-xmin)*(width-left-right) }
	py := func(y float64) float64 { return height - bott - (y-ymin)/(ymax-ymin)*(height-top-bott) }

	for y := ymin; y <= ymax+ystep/2; y += ystep {
		fmt.Fprintf(&b, `<line x1="%g" y1="%.1f" x2="%g" y2="%.1f" stroke="#ddd"/>`+"\n", left, py(y), width-right, py(y))
		fmt.Fprintf(&b, `<text x="%g" y="%.1f" text-anchor="end">%s</text>`+"\n", left-6, py(y)+4, trimFloat(y))
	}
	xstep := math.Max(1, niceStep((xmax-xmin)/8))
	for x := math.Ceil(xmin/xstep) * xstep; x <= xmax; x += xstep {
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%g" x2="%.1f" y2="%g" stroke="#ddd"/>`+"\n", px(x), top, px(x), height-bott)
		fmt.Fprintf(&b, `<text x="%.1f" y="%g" text-anchor="middle">%s</text>`+"\n", px(x), height-bott+16, trimFloat(x))
	}
	fmt.Fprintf(&b, `<rect x="%g" y="%g" width="%g" height="%g" fill="none" stroke="#444"/>`+"\n", left, top, width-left-right, height-top-bott)
	fmt.Fprintf(&b, `<text x="%g" y="%g" text-anchor="middle">step</text>`+"\n", (left+width-right)/2, height-12)

	// Evaluations are few (one, at the end, by default), and a line of one
	// point draws nothing: each gets a marker, as a run of one step does.
	var train, eval, marks bytes.Buffer
	for _, m := range history {
		fmt.Fprintf(&train, "%.1f,%.1f ", px(float64(m.Step)), py(m.Loss))
		if len(history) == 1 {
			fmt.Fprintf(&marks, `<circle cx="%.1f" cy="%.1f" r="3" fill="#1f77b4"/>`+"\n", px(float64(m.Step)), py(m.Loss))
		}
		if m.EvalLoss != nil && !math.IsNaN(*m.EvalLoss) {
			fmt.Fprintf(&eval, "%.1f,%.1f ", px(float64(m.Step)), py(*m.EvalLoss))
			fmt.Fprintf(&marks, `<circle cx="%.1f" cy="%.1f" r="3" fill="#ff7f0e"/>`+"\n", px(float64(m.Step)), py(*m.EvalLoss))
		}
	}
	fmt.Fprintf(&b, `<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="%s"/>`+"\n", bytes.TrimSpace(train.Bytes()))
	b.Write(marks.Bytes())
	legendY := top + 16
	fmt.Fprintf(&b, `<line x1="%g" y1="%g" x2="%g" y2="%g" stroke="#1f77b4" stroke-width="2"/><text x="%g" y="%g">train loss</text>`+"\n",
		width-right-150, legendY, width-right-125, legendY, width-right-120, legendY+4)
	if eval.Len() > 0 {
		fmt.Fprintf(&b, `<polyline fill="none" stroke="#ff7f0e" stroke-width="2" stroke-dasharray="6 3" points="%s"/>`+"\n", bytes.TrimSpace(eval.Bytes()))
		fmt.Fprintf(&b, `<line x1="%g" y1="%g" x2="%g" y2="%g" stroke="#ff7f0e" stroke-width="2" stroke-dasharray="6 3"/><text x="%g" y="%g">eval loss</text>`+"\n",
			width-right-150, legendY+18, width-right-125, legendY+18, width-right-120, legendY+22)
	}
	b.WriteString("</svg>\n")
	return b.Bytes()
}

// niceStep rounds a raw tick spacing up to 1, 2 or 5 times a power of ten.
func niceStep(raw float64) float64 {
	if raw <= 0 || math.IsNaN(raw) || math.IsInf(raw, 0) {
		return 1
	}
	p := math.Pow(10, math.Floor(math.Log10(raw)))
	for _, f := range []float64{1, 2, 5, 10} {
		if f*p >= raw {
			return f * p
		}
	}
	return 10 * p
}

func trimFloat(v float64) string {
	if math.Abs(v) < 1e-12 {
		v = 0
	}
	return fmt.Sprintf("%.4g", v)
}
