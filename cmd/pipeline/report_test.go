package main

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"gemmaft/internal/testenv"
	"gemmaft/report/reporttest"
)

// ShotsEnv names a folder where the browser test leaves its screenshots
// (scripts/report-browser.sh sets it); without it they go to a temporary
// folder.
const shotsEnv = "REPORT_SCREENSHOTS"

// lrSpec is a small QLoRA run on the demo records at learning rate lr.
func lrSpec(t *testing.T, lr string) string {
	tok := testenv.GemmaFile(t, "tokenizer.json")
	demo := filepath.Join(testenv.RepoRoot(t), "dataset", "demo", "alpaca-tr-demo.jsonl")
	return fmt.Sprintf(`name: nightly
stages:
  alpaca: {kind: jsonl, with: {paths: [%s], limit: 40}}
  chat: {kind: chat_template, needs: [alpaca]}
  tokens: {kind: tokenize, needs: [chat], with: {tokenizer: %s}}
  pack: {kind: pack, needs: [tokens], with: {seq_len: 128}}
  base: {kind: model, with: {preset: tiny, seed: 7, std: 0.3}}
  adapter:
    kind: qlora
    needs: [pack, base]
    with: {r: 4, alpha: 8, batch_size: 1, grad_accum: 2, lr: %s, max_steps: 6, log_every: 1,
           eval_fraction: 0.2, eval_every: 3, checkpoint_every: 0, backend: cpu}
`, demo, tok, lr)
}

// The proof of the report: a spec run three times, its learning rate
// changed each time, reports three loss curves and a trend of three runs;
// the page stands alone, and a browser shows its charts and tables at a
// desktop and a phone width, with no console error and no request.
func TestReportThreeLearningRates(t *testing.T) {
	dir := t.TempDir()
	spec := filepath.Join(dir, "spec.yaml")
	lrs := []string{"1.0e-2", "5.0e-3", "2.0e-2"}
	for _, lr := range lrs {
		writeFile(t, spec, lrSpec(t, lr))
		if res := runCLI(t, dir, "run", spec, "--progress", "none", "--report", filepath.Join(dir, "last-run.json")); res.code != 0 {
			t.Fatalf("run at lr %s: exit %d\n%s", lr, res.code, res.stderr)
		}
	}
	out := filepath.Join(dir, "last-run.html")
	res := runCLI(t, dir, "report", spec, "--out", out)
	if res.code != 0 {
		t.Fatalf("report: exit %d\n%s", res.code, res.stderr)
	}
	data, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	page, err := reporttest.Parse(data)
	if err != nil {
		t.Fatal(err)
	}

	t.Run("html", func(t *testing.T) {
		if !strings.Contains(page.Title, "nightly: ok") {
			t.Errorf("title %q", page.Title)
		}
		for _, s := range []string{"last-run", "training", "eval", "data", "runs"} {
			if !page.Sections[s] {
				t.Errorf("no section %s", s)
			}
		}
		// The DAG of the last run: only the adapter was computed.
		wantNodes := map[string]string{"alpaca": "cached", "chat": "cached", "tokens": "cached", "pack": "cached", "base": "cached", "adapter": "computed"}
		if fmt.Sprint(page.Nodes) != fmt.Sprint(wantNodes) || page.Edges != 5 {
			t.Errorf("DAG nodes %v with %d edges, want %v with 5", page.Nodes, page.Edges, wantNodes)
		}
		stages := page.Tables["stages"]
		if got := stages.Column("cache"); !slices.Equal(got, []string{"hit", "hit", "hit", "hit", "hit", "miss"}) {
			t.Errorf("cache column %v", got)
		}
		if why := stages.Column("why"); len(why) != 6 || why[5] != "parameters changed: lr" {
			t.Errorf("why column %v: the adapter was recomputed for its lr alone", why)
		}
		// Each entry's size, as status gives it.
		st := runCLI(t, dir, "status", spec)
		for i, name := range stages.Column("stage") {
			size := stages.Column("size")[i]
			if size == "—" || !strings.Contains(st.stdout, name+" ") || !statusRowHas(st.stdout, name, size) {
				t.Errorf("stage %s: size %q, not as status gives it:\n%s", name, size, st.stdout)
			}
		}
		// Three adapters, newest first, overlaid in every training chart.
		for _, c := range []string{"loss:adapter", "lr:adapter", "throughput:adapter"} {
			ch := page.Charts[c]
			if len(ch.Series) != 3 || ch.Lines != 3 || len(slices.Compact(slices.Sorted(slices.Values(ch.Series)))) != 3 {
				t.Errorf("chart %s: series %v, %d lines; want 3 adapters", c, ch.Series, ch.Lines)
			}
		}
		if ev := page.Charts["eval-loss:adapter"]; len(ev.Series) != 3 || ev.Points != 6 {
			t.Errorf("eval loss chart: %d series, %d points; want 3 adapters evaluated at steps 3 and 6", len(ev.Series), ev.Points)
		}
		legend := page.Legend["adapter"]
		if len(legend) != 3 || !strings.Contains(legend[0], "lr 0.02") || !strings.Contains(legend[1], "lr 0.005") || !strings.Contains(legend[2], "lr 0.01") {
			t.Errorf("legend %q: want the three learning rates, newest first", legend)
		}
		curves := page.Tables["curves:adapter"]
		if len(curves.Rows) != 3 {
			t.Errorf("adapters table %v", curves.Rows)
		}
		for _, tb := range curves.Column("TensorBoard") {
			logdir := strings.TrimPrefix(tb, "tensorboard --logdir ")
			if fi, err := os.Stat(logdir); err != nil || !fi.IsDir() {
				t.Errorf("TensorBoard cell %q does not name a tb/ folder", tb)
			}
		}
		// The trend: one eval loss per run.
		if tr := page.Charts["trend:adapter: loss on its eval rows"]; tr.Points != 3 {
			t.Errorf("eval loss trend has %d points, want 3", tr.Points)
		}
		if rows := page.Tables["eval-table"].Rows; len(rows) != 3 {
			t.Errorf("eval table rows %v", rows)
		}
		// Data stages: packing efficiency, tokens, dropped examples.
		dt := page.Tables["data-table"]
		eff := dt.Column("packing efficiency")
		if len(dt.Rows) != 4 || !strings.HasSuffix(eff[3], "%") || dt.Column("dropped")[3] == "—" || dt.Column("tokens")[2] == "—" {
			t.Errorf("data table %v", dt.Rows)
		}
		if rows := page.Tables["data-trend"].Rows; len(rows) != 3 {
			t.Errorf("data trend rows %v", rows)
		}
		runs := page.Tables["runs-table"]
		if got := runs.Column("result"); !slices.Equal(got, []string{"ok", "ok", "ok"}) {
			t.Errorf("runs %v", runs.Rows)
		}
	})

	t.Run("status and inspect", func(t *testing.T) {
		for _, args := range [][]string{{"status", spec}, {"inspect", spec, "adapter", "--rows", "0"}} {
			res := runCLI(t, dir, args...)
			if res.code != 0 {
				t.Fatalf("%s: exit %d\n%s", args[0], res.code, res.stderr)
			}
			i := strings.Index(res.stdout, "tensorboard --logdir ")
			if i < 0 {
				t.Fatalf("%s does not point to the events:\n%s", args[0], res.stdout)
			}
			logdir := strings.Fields(res.stdout[i+len("tensorboard --logdir "):])[0]
			if events, _ := filepath.Glob(filepath.Join(logdir, "events.out.tfevents.*")); len(events) != 1 {
				t.Errorf("%s points to %s, which holds %d event files", args[0], logdir, len(events))
			}
			if !strings.Contains(res.stdout, "report    pipeline report "+spec+" --out report.html") {
				t.Errorf("%s does not point to the report:\n%s", args[0], res.stdout)
			}
			if args[0] == "inspect" && strings.Contains(res.stdout, "rows      ") {
				t.Errorf("inspect shows rows of an adapter, which has no table:\n%s", res.stdout)
			}
		}
	})

	t.Run("usage", func(t *testing.T) {
		if res := runCLI(t, dir, "report", spec); res.code != 2 || !strings.Contains(res.stderr, "--out is required") {
			t.Errorf("no --out: exit %d, %s", res.code, res.stderr)
		}
		if res := runCLI(t, dir, "report", spec, "--out", "x.html", "--runs", "0"); res.code != 2 {
			t.Errorf("--runs 0: exit %d", res.code)
		}
		if res := runCLI(t, dir, "report", spec, "--out", "x.json"); res.code != 2 || !strings.Contains(res.stderr, "the report is an HTML page; name it NAME.html") {
			t.Errorf("--out x.json: exit %d, %s", res.code, res.stderr)
		}
		res := runCLI(t, dir, "report", spec, "--out", "-", "--runs", "1")
		if res.code != 0 || !strings.HasPrefix(res.stdout, "<!DOCTYPE html>") {
			t.Errorf("--out -: exit %d, %.40q", res.code, res.stdout)
		}
		if p, err := reporttest.Parse([]byte(res.stdout)); err != nil || len(p.Tables["runs-table"].Rows) != 1 {
			t.Errorf("--runs 1: %v", err)
		}
	})

	t.Run("browser", func(t *testing.T) {
		shots := os.Getenv(shotsEnv)
		if shots == "" {
			shots = t.TempDir()
		} else if err := os.MkdirAll(shots, 0o755); err != nil {
			t.Fatal(err)
		}
		url := "file://" + out
		r := reporttest.Browse(t, url, shots, "report")
		for _, e := range r.Errors {
			t.Errorf("console: %s", e)
		}
		for _, w := range r.Warnings {
			t.Logf("console warning: %s", w)
		}
		for _, req := range r.Requests { // one per viewport
			if req != url {
				t.Errorf("the page requested %s", req)
			}
		}
		for _, v := range r.Views {
			t.Logf("%s: %gpx wide (page %gpx), smallest text %gpx, smallest chart text %.1fpx, DAG %.0fpx; screenshot %s",
				v.Name, v.InnerWidth, v.ScrollWidth, v.MinTextPx, v.MinChartTextPx, v.DAGWidth, v.Screenshot)
			for _, c := range []string{"loss:adapter", "eval-loss:adapter", "lr:adapter", "throughput:adapter", "trend:adapter: loss on its eval rows", "trend:adapter: final train loss"} {
				ch, ok := v.Charts[c]
				if !ok || ch.Width < 200 || ch.Height < 100 || ch.Width > v.InnerWidth {
					t.Errorf("%s: chart %s laid out %vx%v (viewport %v)", v.Name, c, ch.Width, ch.Height, v.InnerWidth)
				}
			}
			if v.Charts["loss:adapter"].Series != 3 || v.Charts["trend:adapter: loss on its eval rows"].Points != 3 {
				t.Errorf("%s: loss series %d, trend points %d; want 3 and 3", v.Name, v.Charts["loss:adapter"].Series, v.Charts["trend:adapter: loss on its eval rows"].Points)
			}
			for id, rows := range map[string]int{"stages": 6, "eval-table": 3, "data-table": 4, "data-trend": 3, "runs-table": 3} {
				if tb := v.Tables[id]; tb.Rows != rows || !tb.Visible {
					t.Errorf("%s: table %s has %d rows (visible %v), want %d", v.Name, id, tb.Rows, tb.Visible, rows)
				}
			}
			if v.Nodes != 6 || v.Edges != 5 || v.DAGWidth > v.InnerWidth {
				t.Errorf("%s: DAG of %d nodes, %d edges, %.0fpx wide", v.Name, v.Nodes, v.Edges, v.DAGWidth)
			}
			// Readable: the page never scrolls sideways (wide tables scroll
			// in their own box), text is at least 12px, chart labels 9px.
			if v.ScrollWidth > v.InnerWidth+1 {
				t.Errorf("%s: the page is %gpx wide on a %gpx screen", v.Name, v.ScrollWidth, v.InnerWidth)
			}
			if v.MinTextPx < 12 || v.MinChartTextPx < 9 {
				t.Errorf("%s: text %gpx, chart text %.1fpx: too small to read", v.Name, v.MinTextPx, v.MinChartTextPx)
			}
		}
	})
}

// TestReportOfABrokenSpec: a spec that does not load still gets its page,
// saying so, where the last night's "ok" would otherwise stand; the exit
// is the spec error's.
func TestReportOfABrokenSpec(t *testing.T) {
	dir := t.TempDir()
	spec := filepath.Join(dir, "s.yaml")
	writeFile(t, spec, "name: x\nstages:\n  a: {kind: chat_templat}\n")
	out := filepath.Join(dir, "last.html")
	writeFile(t, out, "<title>x: ok</title>")
	r := runCLI(t, dir, "report", spec, "--out", out)
	page, err := reporttest.Parse(readAll(t, out))
	if r.code != 2 || err != nil || !strings.Contains(page.Title, "SPEC ERROR") || !strings.Contains(page.Text, `unknown kind "chat_templat"`) {
		t.Errorf("exit %d, page %q (%v)\n%s", r.code, page.Title, err, r.stderr)
	}
}

// statusRowHas says whether status's table row of stage holds cell.
func statusRowHas(status, stage, cell string) bool {
	for _, line := range strings.Split(status, "\n") {
		if strings.HasPrefix(line, stage+" ") {
			return strings.Contains(line, "  "+cell+"  ")
		}
	}
	return false
}
