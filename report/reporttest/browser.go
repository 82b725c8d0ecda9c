package reporttest

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/cdproto/log"
	"github.com/chromedp/cdproto/network"
	"github.com/chromedp/cdproto/runtime"
	"github.com/chromedp/chromedp"
)

// ChromiumEnv names a Chromium or Chrome binary to use instead of the
// first of chromium, chromium-browser, google-chrome on the PATH; "none"
// skips the browser tests as if there were no browser.
const ChromiumEnv = "PIPELINE_CHROMIUM"

// Chromium returns the browser to test with, or "" when there is none.
func Chromium() string {
	if p := os.Getenv(ChromiumEnv); p != "" {
		if p, err := exec.LookPath(p); err == nil {
			return p
		}
		return ""
	}
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome", "google-chrome-stable"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	return ""
}

// A Viewport is a screen the page is shown on.
type Viewport struct {
	Name          string
	Width, Height int64
	Scale         float64
	Mobile        bool
}

// Desktop and Phone are the two screens Browse uses: a laptop, and a phone
// the size of an iPhone 12 to 15 held upright.
var (
	Desktop = Viewport{Name: "desktop", Width: 1280, Height: 900, Scale: 1}
	Phone   = Viewport{Name: "phone", Width: 390, Height: 844, Scale: 2, Mobile: true}
)

// A View is what DOM queries found with the page shown on one viewport.
type View struct {
	Viewport
	Title string `json:"title"`
	// InnerWidth is the layout viewport; ScrollWidth the page's width,
	// larger when the page itself scrolls sideways.
	InnerWidth  float64 `json:"innerWidth"`
	ScrollWidth float64 `json:"scrollWidth"`
	// Charts by data-chart, as laid out.
	Charts map[string]struct {
		Series int     `json:"series"`
		Lines  int     `json:"lines"`
		Points int     `json:"points"`
		Width  float64 `json:"width"`
		Height float64 `json:"height"`
	} `json:"charts"`
	// Tables by id: body rows, and whether the table is laid out.
	Tables map[string]struct {
		Rows    int  `json:"rows"`
		Visible bool `json:"visible"`
	} `json:"tables"`
	Nodes int `json:"nodes"`
	Edges int `json:"edges"`
	// DAGWidth is the drawing's laid-out width.
	DAGWidth float64 `json:"dagWidth"`
	// MinTextPx is the smallest computed font size of the page's text;
	// MinChartTextPx the smallest rendered height of a chart's text.
	MinTextPx      float64 `json:"minTextPx"`
	MinChartTextPx float64 `json:"minChartTextPx"`
	// Screenshot is the full-page PNG, when one was written.
	Screenshot string `json:"-"`
}

// A Rendering is what Browse saw.
type Rendering struct {
	Views []View
	// Errors are console errors, uncaught exceptions and browser log
	// errors (a blocked fetch, a Content-Security-Policy violation);
	// Warnings the same at warning level.
	Errors, Warnings []string
	// Requests are the URLs the page asked for, the page itself included.
	Requests []string
}

// facts is run in the page: what the tests ask of the DOM.
const facts = `(() => {
  const q = s => Array.from(document.querySelectorAll(s));
  const shown = e => { const r = e.getBoundingClientRect(); return r.width > 0 && r.height > 0; };
  const charts = {};
  q('svg.chart').forEach(s => {
    const r = s.getBoundingClientRect();
    charts[s.dataset.chart] = {series: s.querySelectorAll('g.series').length, lines: s.querySelectorAll('polyline').length,
      points: s.querySelectorAll('circle.point').length, width: r.width, height: r.height};
  });
  const tables = {};
  q('table[id]').forEach(t => { tables[t.id] = {rows: t.tBodies[0] ? t.tBodies[0].rows.length : 0, visible: shown(t)}; });
  let minText = 1e9;
  q('body p, body td, body th, body li, body h1, body h2, body h3, body figcaption, body code').forEach(e => {
    if (shown(e)) minText = Math.min(minText, parseFloat(getComputedStyle(e).fontSize));
  });
  let minChart = 1e9;
  q('svg.chart text, svg.dag text').forEach(e => { const h = e.getBoundingClientRect().height; if (h > 0) minChart = Math.min(minChart, h); });
  const dag = document.querySelector('svg.dag');
  return {title: document.title, innerWidth: window.innerWidth, scrollWidth: document.documentElement.scrollWidth,
    charts, tables, nodes: q('svg.dag g.node').length, edges: q('svg.dag path.edge').length,
    dagWidth: dag ? dag.getBoundingClientRect().width : 0, minTextPx: minText, minChartTextPx: minChart};
})()`

// Browse opens url in headless Chromium on each viewport (Desktop and Phone
// when none are given), queries the DOM and, when shots is not "", writes
// full-page screenshots there as <name>-<viewport>.png. It skips the test
// when no Chromium is installed.
func Browse(t testing.TB, url, shots, name string, viewports ...Viewport) *Rendering {
	t.Helper()
	bin := Chromium()
	if bin == "" {
		t.Skipf("no Chromium (apt-get install chromium, or set %s); scripts/report-browser.sh installs it and runs this test", ChromiumEnv)
	}
	if len(viewports) == 0 {
		viewports = []Viewport{Desktop, Phone}
	}
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(bin), chromedp.NoSandbox, chromedp.DisableGPU, chromedp.UserDataDir(t.TempDir()),
		chromedp.Flag("disable-quic", true), chromedp.Flag("disable-component-update", true),
		chromedp.Flag("hide-scrollbars", true))
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	actx, cancelAlloc := chromedp.NewExecAllocator(ctx, opts...)
	defer cancelAlloc()

	r := &Rendering{}
	var mu sync.Mutex
	listener := func(ev any) {
		mu.Lock()
		defer mu.Unlock()
		switch ev := ev.(type) {
		case *runtime.EventConsoleAPICalled:
			var args []string
			for _, a := range ev.Args {
				args = append(args, strings.Trim(string(a.Value), `"`)+a.Description)
			}
			msg := fmt.Sprintf("console.%s: %s", ev.Type, strings.Join(args, " "))
			switch ev.Type {
			case runtime.ConsoleAPICalledTypeError, runtime.ConsoleAPICalledTypeAssert:
				r.Errors = append(r.Errors, msg)
			case runtime.ConsoleAPICalledTypeWarning:
				r.Warnings = append(r.Warnings, msg)
			}
		case *runtime.EventExceptionThrown:
			msg := ev.ExceptionDetails.Text
			if ev.ExceptionDetails.Exception != nil {
				msg += " " + ev.ExceptionDetails.Exception.Description
			}
			r.Errors = append(r.Errors, "exception: "+msg)
		case *log.EventEntryAdded:
			msg := fmt.Sprintf("%s (%s): %s %s", ev.Entry.Level, ev.Entry.Source, ev.Entry.Text, ev.Entry.URL)
			switch ev.Entry.Level {
			case log.EntryLevelError:
				r.Errors = append(r.Errors, msg)
			case log.EntryLevelWarning:
				r.Warnings = append(r.Warnings, msg)
			}
		case *network.EventRequestWillBeSent:
			r.Requests = append(r.Requests, ev.Request.URL)
		}
	}
	for _, vp := range viewports {
		tab, closeTab := chromedp.NewContext(actx, chromedp.WithListener(listener))
		vopts := []chromedp.EmulateViewportOption{chromedp.EmulateScale(vp.Scale)}
		if vp.Mobile {
			vopts = append(vopts, chromedp.EmulateMobile, chromedp.EmulateTouch, chromedp.EmulatePortrait)
		}
		err := chromedp.Do(tab, chromedp.EmulateViewport(vp.Width, vp.Height, vopts...), chromedp.Navigate(url))
		if err != nil {
			closeTab()
			t.Fatalf("%s: opening %s in %s: %v", vp.Name, url, bin, err)
		}
		v, err := chromedp.Run(tab, chromedp.Evaluate[View](facts))
		if err != nil {
			closeTab()
			t.Fatalf("%s: querying the DOM: %v", vp.Name, err)
		}
		v.Viewport = vp
		if shots != "" {
			png, err := chromedp.Run(tab, chromedp.FullScreenshot(100))
			if err != nil {
				closeTab()
				t.Fatalf("%s: screenshot: %v", vp.Name, err)
			}
			v.Screenshot = filepath.Join(shots, fmt.Sprintf("%s-%s.png", name, vp.Name))
			if err := os.WriteFile(v.Screenshot, png, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		closeTab()
		r.Views = append(r.Views, v)
	}
	mu.Lock()
	defer mu.Unlock()
	return r
}
