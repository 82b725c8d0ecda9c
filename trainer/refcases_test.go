package trainer_test

import (
	"bytes"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"gemmaft/trainer/internal/refcases"
	"gemmaft/trainer/safetensors"
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
		if filepath.ToSlash(rel) == "trained_qlora/adapter/adapter_model.safetensors" {
			// Trained weights carry the last bits of this machine's float
			// kernels (AVX2 or portable); they must agree closely, not exactly.
			compareTensors(t, rel, filepath.Join(out, rel), path)
		} else if !bytes.Equal(got, want) {
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

func compareTensors(t *testing.T, rel, gotPath, wantPath string) {
	t.Helper()
	g, err := safetensors.Open(gotPath)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	w, err := safetensors.Open(wantPath)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if len(g.Header.Tensors) != len(w.Header.Tensors) {
		t.Fatalf("%s: %d tensors, committed %d", rel, len(g.Header.Tensors), len(w.Header.Tensors))
	}
	for _, info := range w.Header.Tensors {
		_, want, err := w.Float32(info.Name)
		if err != nil {
			t.Fatal(err)
		}
		_, got, err := g.Float32(info.Name)
		if err != nil {
			t.Fatalf("%s: %v", rel, err)
		}
		var num, den float64
		for i := range want {
			d := float64(got[i] - want[i])
			num += d * d
			den += float64(want[i]) * float64(want[i])
		}
		if den > 0 && math.Sqrt(num/den) > 1e-3 {
			t.Errorf("%s: %s differs by %.3g (relative norm)", rel, info.Name, math.Sqrt(num/den))
		}
	}
}
