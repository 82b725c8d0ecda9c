package pipeline

import (
	"testing"
	"time"
)

// TestUnitRate: a stage's own count (turns answered, steps trained) is
// timed from a report of none done, not from the stage's start (a model
// loading), and its ETA runs down between the count's steps instead of
// growing.
func TestUnitRate(t *testing.T) {
	at := time.Unix(1_000_000, 0)
	clock = func() time.Time { return at }
	defer func() { clock = time.Now }()

	tr := newTracker("answers", "generate")
	tr.Start()
	tr.Report(0, 100, "turns", "loading")
	at = at.Add(10 * time.Minute) // the model loads
	tr.Report(0, 100, "turns", "answering")
	at = at.Add(20 * time.Second)
	tr.Report(10, 100, "turns", "")
	p := tr.Snapshot()
	if r := p.Rate(); r != 0.5 {
		t.Errorf("rate %v turns/s, want 0.5 (10 in the 20 s since answering began)", r)
	}
	if eta, ok := p.ETA(); !ok || eta != 180*time.Second {
		t.Errorf("ETA %v, want 3m0s", eta)
	}
	at = at.Add(30 * time.Second) // no step done yet
	if eta, _ := tr.Snapshot().ETA(); eta != 150*time.Second {
		t.Errorf("ETA 30 s later %v, want 2m30s", eta)
	}

	// A stall past the expected time: the ETA grows with it, at the rate
	// the stall brings the count down to, instead of sitting at zero.
	at = at.Add(10 * time.Minute)
	if eta, _ := tr.Snapshot().ETA(); eta != 90*(20+30+600)*time.Second/10 {
		t.Errorf("ETA after a 10-minute stall %v, want %v", eta, 90*(20+30+600)*time.Second/10)
	}

	// Work kept from an earlier attempt (700 of 800 turns) is counted in
	// but not timed: the rate is what this attempt does.
	tr = newTracker("answers", "generate")
	tr.Start()
	tr.Report(0, 800, "turns", "loading")
	at = at.Add(time.Minute)
	tr.StartCount(700, 800, "turns", "answering")
	if p := tr.Snapshot(); p.Rate() != 0 {
		t.Errorf("rate %v before anything was counted on the clock, want 0 (no ETA yet)", p.Rate())
	}
	at = at.Add(60 * time.Second)
	tr.Report(716, 800, "turns", "")
	if eta, _ := tr.Snapshot().ETA(); eta != 315*time.Second {
		t.Errorf("resumed: ETA %v, want 5m15s (84 turns at 16 a minute)", eta)
	}

	// A count that starts above zero (steps resumed at 40) is timed from
	// there, for what it counts since.
	tr = newTracker("adapter", "qlora")
	tr.Start()
	tr.Report(40, 100, "steps", "")
	at = at.Add(10 * time.Second)
	tr.Report(45, 100, "steps", "")
	if r := tr.Snapshot().Rate(); r != 0.5 {
		t.Errorf("resumed count: rate %v steps/s, want 0.5", r)
	}
}

// TestBarFillsOnlyWhenDone: a running stage's bar is never complete (a
// complete bar stops moving), so a stage that has read all its input rows
// and then counts the turns it answers shows the turns' progress.
func TestBarFillsOnlyWhenDone(t *testing.T) {
	for _, c := range []struct {
		rows, total, want int64
	}{{48, 48, 99}, {0, 96, 0}, {48, 96, 50}, {200, 96, 99}} {
		if got := barPercent(Progress{Rows: c.rows, Total: c.total, Running: true}); got != c.want {
			t.Errorf("%d of %d: bar at %d, want %d", c.rows, c.total, got, c.want)
		}
	}
}
