package spell

import "testing"

func TestClosest(t *testing.T) {
	for _, c := range []struct {
		s    string
		want string
	}{
		{"instrucion", "instruction"}, // a letter left out
		{"ouptut", "output"},          // two swapped: distance 2
		{"instruction-turksh", "instruction-turkish"},
		{"answer", ""}, // nothing near
		{"input", "input"},
	} {
		if got := Closest(c.s, []string{"instruction", "input", "output", "instruction-turkish"}); got != c.want {
			t.Errorf("Closest(%q) = %q, want %q", c.s, got, c.want)
		}
	}
	// Letters, not bytes; case is no edit.
	for s, want := range map[string]string{"lımıt": "limit", "Kind": "kind", "JSONL": "jsonl", "şeed": "seed"} {
		if got := Closest(s, []string{"limit", "kind", "jsonl", "seed", "needs"}); got != want {
			t.Errorf("Closest(%q) = %q, want %q", s, got, want)
		}
	}
	if d := Distance("kitten", "sitting"); d != 3 {
		t.Errorf("Distance(kitten, sitting) = %d, want 3", d)
	}
}
