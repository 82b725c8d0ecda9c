package dataset

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/apache/arrow-go/v18/arrow/array"
)

func TestDemo(t *testing.T) {
	rows := readAll(t, SourceOptions{FS: Demo(), Paths: []string{DemoPath}})
	if len(rows) < 100 {
		t.Fatalf("demo has %d records, want at least 100", len(rows))
	}
	seen := map[string]bool{}
	withInput := 0
	for i, r := range rows {
		if strings.TrimSpace(r[0]) == "" || strings.TrimSpace(r[2]) == "" {
			t.Errorf("record %d has an empty instruction or output: %q", i, r)
		}
		key := strings.Join(r, "\x00")
		if seen[key] {
			t.Errorf("record %d is a duplicate", i)
		}
		seen[key] = true
		if r[1] != "" {
			withInput++
		}
	}
	if withInput == 0 || withInput == len(rows) {
		t.Errorf("%d of %d records have an input; want some with and some without", withInput, len(rows))
	}
	text := string(DemoJSONL())
	for _, letter := range []string{"ç", "ğ", "ı", "ö", "ş", "ü", "İ"} {
		if !strings.Contains(text, letter) {
			t.Errorf("demo text never uses %q", letter)
		}
	}

	// The demo is this project's own text: none of it may come from the
	// shared alpaca-tr records.
	dir := filepath.Join("..", "..", "shared", "data", "alpaca-tr")
	if _, err := os.Stat(dir); err != nil {
		t.Logf("alpaca-tr not found, skipping the overlap check: %v", err)
		return
	}
	shared := map[string]bool{}
	for _, r := range readAll(t, SourceOptions{Paths: []string{filepath.Join(dir, "alpaca-tr.jsonl.gz")}}) {
		shared[r[0]] = true
		shared[r[2]] = true
	}
	for i, r := range rows {
		if shared[r[2]] || (shared[r[0]] && r[1] == "") {
			t.Errorf("demo record %d also appears in alpaca-tr: %q", i, r[0])
		}
	}
}

func TestSourceFS(t *testing.T) {
	path := writeParquet(t, "fs.parquet", alpacaFields, func(b *array.RecordBuilder) {
		appendStrings(b, [3]string{"Bir", "iki", "üç"})
	})
	rows := readAll(t, SourceOptions{FS: os.DirFS(filepath.Dir(path)), Paths: []string{"fs.parquet"}})
	if len(rows) != 1 || rows[0][2] != "üç" {
		t.Errorf("got %q", rows)
	}
	if _, err := Open(SourceOptions{FS: Demo(), Paths: []string{"missing.jsonl"}}); err == nil || !strings.Contains(err.Error(), "missing.jsonl") {
		t.Errorf("missing file in FS: %v", err)
	}
}
