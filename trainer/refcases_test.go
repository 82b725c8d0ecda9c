package trainer_test

import (
	"bytes"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"gemmaft/trainer/internal/refcases"
)

// TestReferenceInputsReproduce regenerates the parity inputs and compares
// them with the committed ones the goldens were computed from: a change to
// initialisation, adapter export or Train that alters them must come with
// regenerated goldens (scripts/reference/README.md).
func TestReferenceInputsReproduce(t *testing.T) {
	out := t.TempDir()
	if err := refcases.Write(out); err != nil {
		t.Fatal(err)
	}
	committed := filepath.Join("testdata", "reference")
	n := 0
	err := filepath.WalkDir(committed, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(committed, path)
		if strings.HasPrefix(rel, "golden"+string(filepath.Separator)) {
			return nil
		}
		want, _ := os.ReadFile(path)
		got, err := os.ReadFile(filepath.Join(out, rel))
		if err != nil {
			t.Errorf("%s: not regenerated: %v", rel, err)
			return nil
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s: regenerated file differs from the committed one", rel)
		}
		n++
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if n < 20 {
		t.Errorf("compared only %d files", n)
	}
}
