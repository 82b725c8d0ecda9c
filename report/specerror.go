package report

import (
	"html/template"
	"io"
)

// specErrorPage is the page written in place of a report when the spec
// does not load: a nightly job's page then says that the night did not
// run, where the last night's "ok" would stand.
var specErrorPage = template.Must(template.New("spec-error").Parse(`<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<title>{{.Spec}}: SPEC ERROR</title>
<style>
:root{color-scheme:light dark}
body{margin:0;font:16px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
main{max-width:1120px;margin:0 auto;padding:12px 16px 40px}
h1{font-size:1.45rem;overflow-wrap:anywhere}
pre{white-space:pre-wrap;overflow-wrap:anywhere;padding:8px 10px;border-radius:6px;background:#ffebe9;color:#1f2328}
</style>
</head>
<body><main>
<h1>{{.Spec}}: SPEC ERROR</h1>
<p>The spec does not load, so no run of it can start. Mend it; the report of its runs comes back once it loads.</p>
<pre>{{.Err}}</pre>
</main></body>
</html>
`))

// WriteSpecError writes the page that says spec does not load, and why.
func WriteSpecError(w io.Writer, spec string, err error) error {
	return specErrorPage.Execute(w, struct{ Spec, Err string }{spec, err.Error()})
}
