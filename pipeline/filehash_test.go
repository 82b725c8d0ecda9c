package pipeline

import (
	"testing"
	"time"
)

// TestRacyAtTheFileSystemsTick: where the file system stamps whole seconds,
// a file written earlier in the second it was hashed in can be written
// again with every field of its state unchanged, so its digest must not be
// trusted from stat alone; with finer stamps only the last instants are.
func TestRacyAtTheFileSystemsTick(t *testing.T) {
	hashed := time.Date(2026, 12, 5, 9, 30, 7, 900_000_000, time.UTC)
	at := func(d time.Duration) int64 { return hashed.Add(d).UnixNano() }
	whole := func(ns int64) int64 { return ns - ns%int64(time.Second) }
	for _, c := range []struct {
		name  string
		mtime int64
		racy  bool
	}{
		{"fine stamps, 0.5 s before", at(-500 * time.Millisecond), false},
		{"fine stamps, 10 ms before", at(-10 * time.Millisecond), true},
		{"whole seconds, same second", whole(at(0)), true},
		{"whole seconds, the second before", whole(at(-time.Second)), true},
		{"whole seconds, 3 s before", whole(at(-3 * time.Second)), false},
	} {
		s := fileState{Size: 4, MtimeNs: c.mtime, CtimeNs: c.mtime}
		if got := s.racy(hashed); got != c.racy {
			t.Errorf("%s: racy = %v, want %v", c.name, got, c.racy)
		}
	}
}
