package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestPrintResults: inspect lays an entry's results.json table out in
// aligned columns, the names left and the numbers right, then says what
// each model ran on; an entry without one prints nothing.
func TestPrintResults(t *testing.T) {
	dir := t.TempDir()
	var b bytes.Buffer
	printResults(&b, dir)
	if b.Len() != 0 {
		t.Errorf("no results.json printed %q", b.String())
	}
	data := `{"models": {"base": "models/tiny", "adapter": "stage adapter on models/tiny (NF4 round trip, as trained)"},
		"table": {"columns": ["score", "base", "adapter", "change"],
		"rows": [["loss", 2.5, 2.25, -0.25], ["acc Türkçe dil bilgisi (16)", 0.1875, 0.25, 0.0625]]}}`
	if err := os.WriteFile(filepath.Join(dir, "results.json"), []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
	printResults(&b, dir)
	want := "\n" +
		"score                          base  adapter  change\n" +
		"loss                            2.5     2.25   -0.25\n" +
		"acc Türkçe dil bilgisi (16)  0.1875     0.25  0.0625\n" +
		"base: models/tiny\n" +
		"adapter: stage adapter on models/tiny (NF4 round trip, as trained)\n"
	if b.String() != want {
		t.Errorf("printed\n%s\nwant\n%s", b.String(), want)
	}
	if strings.Contains(b.String(), "e+") {
		t.Error("numbers in exponent form")
	}
}
