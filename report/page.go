package report

// pageTemplate is the page. It loads nothing: the Content-Security-Policy
// forbids every fetch and every script, styles are inline, fonts the
// system's.
const pageTemplate = `<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; img-src data:">
<meta name="generator" content="pipeline {{.Program}}">
<title>{{.DAG}}: {{if .Unfinished}}DID NOT FINISH{{else if .Runs}}{{if .Last.Rec.OK}}ok{{else if .Last.Rec.Interrupted}}INTERRUPTED{{else}}FAILED{{end}} {{.Last.Label}}{{else}}no runs{{end}}</title>
<style>
:root{color-scheme:light dark;--fg:#1f2328;--muted:#59636e;--bg:#fff;--card:#f6f8fa;--line:#d1d9e0;--ok:#1a7f37;--bad:#cf222e;--hit:#dafbe1;--miss:#ddf4ff;--fail:#ffebe9;--off:#eff2f5;--edge:#818b98}
@media (prefers-color-scheme:dark){:root{--fg:#e6edf3;--muted:#9198a1;--bg:#0d1117;--card:#151b23;--line:#3d444d;--ok:#3fb950;--bad:#f85149;--hit:#12361f;--miss:#0c2d4b;--fail:#4b1113;--off:#212830;--edge:#9198a1}}
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%;text-size-adjust:100%}
body{margin:0;background:var(--bg);color:var(--fg);font:16px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1120px;margin:0 auto;padding:12px 16px 40px}
h1{font-size:1.45rem;line-height:1.25;margin:.4em 0 .2em;overflow-wrap:anywhere}
h2{font-size:1.2rem;margin:1.8em 0 .6em;padding-bottom:.25em;border-bottom:1px solid var(--line)}
h3{font-size:1.05rem;margin:1.2em 0 .5em}
p{margin:.4em 0}
.muted,.delta{color:var(--muted)}
.delta{font-size:.85em}
code{font:.9em/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;overflow-wrap:anywhere}
pre{white-space:pre-wrap;overflow-wrap:anywhere;background:var(--fail);padding:8px 10px;border-radius:6px;font-size:.85rem}
.badge{display:inline-block;padding:0 .55em;border-radius:1em;font-weight:600;color:#fff}
.badge.ok{background:var(--ok)}.badge.failed{background:var(--bad)}
.running{border-left:4px solid var(--edge);padding-left:8px}
nav{display:flex;flex-wrap:wrap;gap:4px 14px;margin:.6em 0;font-size:.95rem}
nav a{color:inherit}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch;max-width:100%}
table{border-collapse:collapse;font-size:.9rem;font-variant-numeric:tabular-nums;min-width:100%}
th,td{padding:5px 9px;border-bottom:1px solid var(--line);text-align:left;white-space:nowrap;vertical-align:top}
th{font-weight:600;background:var(--card)}
td.num,th.num{text-align:right}
td.wrap{white-space:normal;min-width:12em;overflow-wrap:anywhere}
tr.state-cached td:first-child{box-shadow:inset 4px 0 var(--ok)}
tr.state-computed td:first-child{box-shadow:inset 4px 0 #0969da}
tr.state-failed td:first-child,tr.state-canceled td:first-child{box-shadow:inset 4px 0 var(--bad)}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,440px),1fr));gap:14px}
figure{margin:0;background:var(--card);border-radius:8px;padding:8px 8px 4px;min-width:0}
figcaption{font-size:.9rem;font-weight:600;margin:0 0 4px 4px}
svg{display:block;width:100%;height:auto}
svg text{fill:var(--fg);font-size:13px;font-family:inherit}
svg .tick{fill:var(--muted);font-size:12px}
svg .grid{stroke:var(--line);stroke-width:1}
svg .frame{fill:none;stroke:var(--edge);stroke-width:1}
svg .empty{fill:var(--muted)}
.dag{margin:0 auto}
.dag .node rect{fill:var(--off);stroke:var(--edge);stroke-width:1.2}
.dag .state-cached rect{fill:var(--hit);stroke:var(--ok)}
.dag .state-computed rect{fill:var(--miss);stroke:#0969da}
.dag .state-failed rect,.dag .state-canceled rect{fill:var(--fail);stroke:var(--bad);stroke-width:2}
.dag .node text{font-size:12.5px}
.dag .node .name{font-weight:600;font-size:14px}
.dag .edge{fill:none;stroke:var(--edge);stroke-width:1.5}
.dag .arrowhead{fill:var(--edge)}
.legend{list-style:none;padding:0;margin:10px 0;font-size:.9rem}
.legend li{display:flex;gap:8px;align-items:baseline;margin:2px 0}
.swatch{flex:none;display:inline-block;width:22px;height:0;border-top:4px solid;transform:translateY(-4px)}
.swatch.dash{border-top-style:dashed}
footer{margin-top:2.5em;font-size:.9rem;color:var(--muted)}
</style>
</head>
<body>
<main>
<header>
<h1>{{.DAG}} <span class="muted">· pipeline report</span></h1>
{{- if .Unfinished}}
<p id="unfinished">Last run: <span class="badge failed">DID NOT FINISH</span> ({{.Unfinished}}): it was {{unfinishedCauses}}.</p>
{{- end}}
{{- if .Runs}}{{with .Last}}
<p id="verdict">Last {{if $.Unfinished}}finished {{end}}run {{when .Rec.Started}}: {{if .Rec.OK}}<span class="badge ok">ok</span>{{else if .Rec.Interrupted}}<span class="badge failed">INTERRUPTED</span>{{else}}<span class="badge failed">FAILED</span>{{end}} in {{dur .Rec.Seconds}}
· {{.Computed}} computed · {{.Cached}} cached{{if .Failed}} · {{.Failed}} failed{{end}}{{if .Canceled}} · {{.Canceled}} canceled{{end}}</p>
{{- if .Rec.Error}}
<pre id="run-error">{{.Rec.Error}}</pre>
{{- end}}{{end}}
{{- else}}
<p id="verdict">No run of this spec is recorded in this cache yet.</p>
{{- end}}
{{- if .RunningBy}}
<p class="running">A run of this spec is in progress now ({{.RunningBy}}); this page shows the runs finished before it.</p>
{{- end}}
<p class="muted">spec <code>{{.Spec}}</code><br>cache <code>{{.Cache}}</code></p>
</header>
{{- if .Runs}}
<nav><a href="#last-run">Last run</a><a href="#training">Training</a><a href="#eval">Evaluation</a><a href="#data">Data</a><a href="#runs">Runs</a></nav>

<section id="last-run">
<h2>Last run</h2>
<figure>{{.Drawing}}</figure>
<div class="scroll"><table id="stages">
<thead><tr><th>stage</th><th>kind</th><th>state</th><th>cache</th><th class="num">rows</th><th class="num">size</th><th class="num">time</th><th>why</th><th>key</th></tr></thead>
<tbody>
{{- range .Stages}}
<tr class="{{stateClass .State}}" data-stage="{{.Name}}"><td>{{.Name}}</td><td>{{.Kind}}</td><td>{{.State}}</td><td>{{if .Cache}}{{.Cache}}{{else}}—{{end}}</td><td class="num">{{if .Rows}}{{count .Rows}}{{else}}—{{end}}</td><td class="num">{{if .Size}}{{bytes .Size}}{{else}}—{{end}}</td>
<td class="num">{{if eq .State "cached"}}{{if .ComputeSeconds}}<span class="muted" title="the time it took when computed, {{iso .ComputedAt}}">({{dur .ComputeSeconds}})</span>{{else}}—{{end}}{{else if eq .State "not selected"}}—{{else if ge .WaitSeconds 0.5}}<span title="{{dur .Seconds}} with {{dur .WaitSeconds}} waiting for its inputs">{{dur .OwnSeconds}}</span>{{else}}{{dur .Seconds}}{{end}}</td>
<td class="wrap">{{.Reason}}{{if .Error}}<br><b>{{clip .Error 300}}</b>{{end}}</td><td><code title="{{.Key}}">{{short .Key}}</code></td></tr>
{{- end}}
</tbody></table></div>
</section>

<section id="training">
<h2>Training</h2>
{{- range .Trainings}}
<h3>{{.Stage}}</h3>
{{- if not .Curves}}
<p class="muted">No run in these runs trained or used it (the runs stopped before it: <code>--until</code>, <code>--only</code>, or a failure upstream).</p>
{{- else}}
<ul class="legend" data-legend="{{.Stage}}">
{{- range .Curves}}
<li data-series="{{.Key}}"><span class="swatch{{if or (eq .State "failed") (eq .State "canceled")}} dash{{end}}" style="border-color:{{.Color}}"></span><span><b>{{.Label}}</b>{{if .Diff}} · {{.Diff}}{{end}}{{if .Note}} · <i>{{.Note}}</i>{{end}}</span></li>
{{- end}}
</ul>
<div class="charts">
{{- range .Charts}}
<figure class="chart-box">{{.}}</figure>
{{- end}}
</div>
<div class="scroll"><table class="curves" data-stage="{{.Stage}}">
<thead><tr><th>adapter</th><th>runs</th><th>differs in</th><th class="num">steps</th><th class="num">train loss</th><th class="num">eval loss</th><th class="num">tokens/s</th><th class="num">peak GPU</th><th class="num">train time</th><th>TensorBoard</th></tr></thead>
<tbody>
{{- range .Curves}}
<tr><td><span class="swatch{{if or (eq .State "failed") (eq .State "canceled")}} dash{{end}}" style="border-color:{{.Color}}"></span> <code title="{{.Key}}">{{short .Key}}</code></td><td>{{.RunLabels}}</td><td>{{if .Diff}}{{.Diff}}{{else}}—{{end}}</td>
<td class="num">{{.Steps}}</td><td class="num">{{.FinalLoss}}</td><td class="num">{{.EvalLoss}}</td><td class="num">{{.Throughput}}</td><td class="num">{{.PeakGPU}}</td><td class="num">{{.TrainTime}}</td>
<td>{{if .Events}}<code>tensorboard --logdir {{.Events}}</code>{{else}}—{{end}}</td></tr>
{{- end}}
</tbody></table></div>
{{- end}}
{{- else}}
<p class="muted">The last run has no qlora stage.</p>
{{- end}}
</section>

<section id="eval">
<h2>Evaluation</h2>
{{- if .Scores}}
<div class="scroll"><table id="eval-table">
<thead><tr><th>run</th>{{range .Scores}}<th class="num">{{.}}</th>{{end}}</tr></thead>
<tbody>
{{- $r := .}}
{{- range .Runs}}{{$run := .}}
<tr><td title="{{iso .Rec.Started}}">{{.Label}}</td>{{range $r.Scores}}<td class="num">{{$r.Score $run .}}</td>{{end}}</tr>
{{- end}}
</tbody></table></div>
<div class="charts">
{{- range .Scores}}
<figure class="chart-box"><figcaption>{{.}}</figcaption>{{$r.Trend .}}</figure>
{{- end}}
</div>
{{- else}}
<p class="muted">No eval results in these runs. An eval stage's scores, and a qlora stage's held-out loss (<code>eval_fraction</code>, or a mix stage's <code>heldout</code>), show here once a run computes them.</p>
{{- end}}
</section>

<section id="data">
<h2>Data</h2>
{{- if .Data}}
<div class="scroll"><table id="data-table">
<thead><tr><th>stage</th><th>kind</th><th class="num">rows</th><th class="num">records</th><th class="num">tokens</th><th class="num">trained tokens</th><th class="num">packing efficiency</th><th class="num">dropped</th><th class="num">skipped</th><th class="num">truncated or split</th></tr></thead>
<tbody>
{{- range .Data}}
<tr class="{{stateClass .State}}" data-stage="{{.Name}}"><td>{{.Name}}</td><td>{{.Kind}}</td><td class="num">{{count .Rows}}</td><td class="num">{{opt .Records}}</td><td class="num">{{opt .Tokens}}</td><td class="num">{{opt .Trained}}</td><td class="num">{{pct .Efficiency}}</td><td class="num">{{opt .Dropped}}</td><td class="num">{{opt .Skipped}}</td><td class="num">{{opt .Cut}}</td></tr>
{{- end}}
</tbody></table></div>
{{- if .DataTrend}}
<h3>Across runs</h3>
<div class="scroll"><table id="data-trend">
<thead><tr><th>run</th>{{range .DataTrend}}<th class="num">{{.Stage}} · {{.Figure}}</th>{{end}}</tr></thead>
<tbody>
{{- $r := .}}
{{- range $i, $run := .Runs}}
<tr><td title="{{iso $run.Rec.Started}}">{{$run.Label}}</td>{{range $r.DataTrend}}<td class="num">{{trend . $i}}</td>{{end}}</tr>
{{- end}}
</tbody></table></div>
{{- end}}
{{- else}}
<p class="muted">The last run has no data stages.</p>
{{- end}}
</section>

<section id="runs">
<h2>Runs</h2>
<div class="scroll"><table id="runs-table">
<thead><tr><th>started</th><th>result</th><th class="num">took</th><th class="num">computed</th><th class="num">cached</th><th class="num">train loss</th><th class="num">eval loss</th><th>error</th></tr></thead>
<tbody>
{{- range .Runs}}
<tr class="{{if .Rec.OK}}state-cached{{else}}state-failed{{end}}"><td title="{{iso .Rec.Started}}">{{.Label}}</td><td>{{if .Rec.OK}}ok{{else if .Rec.Interrupted}}<b>interrupted</b>{{else}}<b>failed</b>{{end}}</td><td class="num">{{dur .Rec.Seconds}}</td><td class="num">{{.Computed}}</td><td class="num">{{.Cached}}</td><td class="num">{{loss .TrainLoss}}</td><td class="num">{{loss .EvalLoss}}</td><td class="wrap">{{clip .Rec.Error 200}}</td></tr>
{{- end}}
</tbody></table></div>
</section>
{{- end}}

<footer>
<p>Generated {{when .Generated}} by pipeline {{.Program}} (<code>pipeline report</code>). The JSON record of each run is in the cache under <code>runs/</code>; <code>pipeline status</code> and <code>pipeline inspect</code> show the stages' entries.</p>
</footer>
</main>
</body>
</html>
`
