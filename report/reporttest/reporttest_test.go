package reporttest

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const goodHead = `<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<title>t</title></head><body>`

func TestParseRejectsWhatLoadsOrRuns(t *testing.T) {
	if _, err := Parse([]byte(goodHead + `<a href="#x">in page</a><svg><g class="series"></g></svg></body></html>`)); err != nil {
		t.Fatalf("a page that stands alone: %v", err)
	}
	for name, body := range map[string]string{
		"script":         `<script>1</script>`,
		"external link":  `<a href="https://example.com">x</a>`,
		"stylesheet":     `<link rel="stylesheet" href="x.css">`,
		"image":          `<img src="data:image/png;base64,AA==">`,
		"css url":        `<style>body{background:url(x.png)}</style>`,
		"font":           `<style>@font-face{font-family:x;src:local(x)}</style>`,
		"handler":        `<div onclick="x()">x</div>`,
		"svg use":        `<svg><use href="#a"/></svg>`,
		"inline css url": `<div style="background:url(x.png)"></div>`,
	} {
		if _, err := Parse([]byte(goodHead + body + `</body></html>`)); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	bare := `<!DOCTYPE html><html><head><title>t</title></head><body></body></html>`
	_, err := Parse([]byte(bare))
	if err == nil {
		t.Fatal("a page without viewport, CSP, charset and lang accepted")
	}
	for _, want := range []string{"viewport", "Content-Security-Policy", "charset", "lang"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not name the missing %s", err, want)
		}
	}
}

// The browser check sees what goes wrong in a page: an exception, a
// console error, a failed request.
func TestBrowseSeesErrors(t *testing.T) {
	p := filepath.Join(t.TempDir(), "broken.html")
	os.WriteFile(p, []byte(`<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>broken</title></head><body>
<p>x</p><img src="http://127.0.0.1:9/missing.png">
<script>console.error("bad thing"); throw new Error("boom");</script></body></html>`), 0o644)
	r := Browse(t, "file://"+p, "", "broken", Desktop)
	all := strings.Join(r.Errors, "\n")
	for _, want := range []string{"bad thing", "boom"} {
		if !strings.Contains(all, want) {
			t.Errorf("errors %q miss %q", r.Errors, want)
		}
	}
	if len(r.Requests) < 2 {
		t.Errorf("requests %q: the image request was not seen", r.Requests)
	}
	if len(r.Views) != 1 || r.Views[0].Title != "broken" {
		t.Errorf("views %+v", r.Views)
	}
}
