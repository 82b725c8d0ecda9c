package pipeline

import (
	"fmt"
	"io"
	"log/slog"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vbauerster/mpb/v8"
	"github.com/vbauerster/mpb/v8/decor"
)

// A Tracker counts one computing stage's progress. Stages update it through
// their Task, Input and Output; displays read it.
type Tracker struct {
	Name, Kind string

	rowsIn, rowsOut, bytes atomic.Int64
	total                  atomic.Int64 // rows expected; -1 when unknown
	startNs                atomic.Int64 // 0 while waiting to start
	endNs                  atomic.Int64
	done, failed           atomic.Bool
	inputs                 []*Input
	waitingFor             atomic.Pointer[string] // the stage whose entry it waits for

	// A stage whose work is not rows (training steps) reports its own units.
	mu                  sync.Mutex
	unit, note          string
	unitDone, unitTotal int64
	// The count's clock: when it started (see Report) and last moved, and
	// the count then.
	unitStart, unitMoved time.Time
	unitBase             int64
}

// clock is the time of a stage's own count (a variable for tests).
var clock = time.Now

func newTracker(name, kind string) *Tracker {
	t := &Tracker{Name: name, Kind: kind}
	t.total.Store(-1)
	return t
}

// NewTracker returns a tracker for work done outside a run (a download a
// command makes before it starts), for a Display to show. Start it, Report
// on it, Finish it.
func NewTracker(name, kind string) *Tracker { return newTracker(name, kind) }

// Start marks the tracked work as started.
func (t *Tracker) Start() { t.start() }

// Finish marks the tracked work as done, or failed.
func (t *Tracker) Finish(ok bool) { t.finish(ok) }

// Report sets the progress of work counted in units other than rows. A
// report of none done, or of another unit, starts the count's clock, so
// that its rate leaves out what came before (a model loading).
func (t *Tracker) Report(done, total int64, unit, note string) {
	t.report(done, total, unit, note, false)
}

// StartCount is Report that starts the count's clock at done: what is
// counted from now on is timed from now (work kept from an earlier
// attempt counted in, a model loaded before).
func (t *Tracker) StartCount(done, total int64, unit, note string) {
	t.report(done, total, unit, note, true)
}

func (t *Tracker) report(done, total int64, unit, note string, restart bool) {
	now := clock()
	t.mu.Lock()
	defer t.mu.Unlock()
	if restart || done == 0 || unit != t.unit {
		t.unitStart, t.unitMoved, t.unitBase = now, now, done
	} else if done != t.unitDone {
		t.unitMoved = now
	}
	t.unitDone, t.unitTotal, t.unit, t.note = done, total, unit, note
}

func (t *Tracker) start() { t.startNs.Store(time.Now().UnixNano()) }

// waitFor marks the stage as waiting for stage name's entry until the
// returned func is called, so that a display does not show its rows read
// so far as work in progress.
func (t *Tracker) waitFor(name string) (done func()) {
	t.waitingFor.Store(&name)
	return func() { t.waitingFor.Store(nil) }
}

func (t *Tracker) finish(ok bool) {
	t.endNs.Store(time.Now().UnixNano())
	t.failed.Store(!ok)
	t.done.Store(true)
}

// Progress is a snapshot of a tracker.
type Progress struct {
	Rows    int64  // rows read (stages with inputs) or written (sources), or Unit
	Total   int64  // -1 when unknown
	Unit    string // what Rows counts; "rows" unless the stage says otherwise
	Note    string // the stage's own words, e.g. the current loss
	Bytes   int64
	Elapsed time.Duration
	Waited  time.Duration // of Elapsed, spent waiting for other stages' entries
	// Counting says that Rows are a stage's own units, timed by their own
	// clock: Counted is how many were counted since it started, CountedFor
	// the time from then to the count's last move, and Stale the time
	// since; units come in steps (a batch of answers), so the rate is
	// taken over the steps' time.
	Counting          bool
	Counted           int64
	CountedFor, Stale time.Duration
	// WaitingFor names the stage whose entry a running stage waits for
	// before it can go on; "" while it works.
	WaitingFor string
	Running    bool
	Done       bool
	Failed     bool
}

// Rate is rows per second so far, over the time the stage worked (not
// the time it waited for other stages' entries); for a stage's own units,
// over the time of the count's steps (see Counted).
func (p Progress) Rate() float64 {
	if p.Counting {
		if p.CountedFor <= 0 {
			return 0 // nothing counted on this clock yet
		}
		return float64(p.Counted) / p.CountedFor.Seconds()
	}
	working := p.Elapsed - p.Waited
	if working <= 0 {
		return 0
	}
	return float64(p.Rows) / working.Seconds()
}

// ETA estimates the time left, when the total is known.
func (p Progress) ETA() (time.Duration, bool) {
	r := p.Rate()
	if p.Total < 0 || r <= 0 || p.Done {
		return 0, false
	}
	todo := float64(p.Total - p.Rows)
	left := todo/r - p.Stale.Seconds()
	switch {
	case left >= 0:
	case p.Counting && p.Counted > 0 && todo > 0:
		// Overdue (a stall): at the rate the stall brings it down to.
		left = todo / (float64(p.Counted) / (p.CountedFor + p.Stale).Seconds())
	default:
		left = 0
	}
	return time.Duration(left * float64(time.Second)), true
}

// Snapshot reads the tracker.
func (t *Tracker) Snapshot() Progress {
	p := Progress{Total: t.total.Load(), Bytes: t.bytes.Load(), Done: t.done.Load(), Failed: t.failed.Load(), Unit: "rows"}
	t.mu.Lock()
	unit, note, unitDone, unitTotal := t.unit, t.note, t.unitDone, t.unitTotal
	counted, countedFor, stale := t.unitDone-t.unitBase, t.unitMoved.Sub(t.unitStart), clock().Sub(t.unitMoved)
	t.mu.Unlock()
	if unit != "" {
		p.Unit, p.Note, p.Rows, p.Total = unit, note, unitDone, unitTotal
		if !p.Done {
			p.Counting, p.Counted, p.CountedFor, p.Stale = true, counted, countedFor, stale
		}
	} else if len(t.inputs) > 0 {
		p.Rows = t.rowsIn.Load()
		if p.Total < 0 {
			var sum int64
			known := true
			for _, in := range t.inputs {
				n, ok := in.Rows()
				known = known && ok
				sum += n
			}
			if known {
				p.Total = sum
			}
		}
	} else {
		p.Rows = t.rowsOut.Load()
	}
	if s := t.startNs.Load(); s != 0 {
		end := time.Now().UnixNano()
		if p.Done {
			end = t.endNs.Load()
		}
		p.Elapsed = time.Duration(end - s)
		p.Running = !p.Done
	}
	if w := t.waitingFor.Load(); w != nil && p.Running {
		p.WaitingFor = *w
	}
	for _, in := range t.inputs {
		p.Waited += time.Duration(in.waited.Load())
	}
	return p
}

// String is the one-line form shared by the terminal and log displays.
func (p Progress) String() string {
	if p.WaitingFor != "" {
		return "waiting for stage " + p.WaitingFor
	}
	if p.Unit == "bytes" {
		s := HumanBytes(p.Rows)
		if p.Total >= 0 {
			s += " / " + HumanBytes(p.Total)
		}
		s += "  " + HumanBytes(int64(p.Rate())) + "/s"
		if p.Note != "" {
			s += "  " + p.Note
		}
		if eta, ok := p.ETA(); ok {
			s += "  ETA " + eta.Round(time.Second).String()
		}
		return s
	}
	s := fmt.Sprintf("%d", p.Rows)
	if p.Total >= 0 {
		s += fmt.Sprintf("/%d", p.Total)
	}
	if p.Unit != "rows" {
		s += " " + p.Unit
		if p.Note != "" {
			s += "  " + p.Note
		}
	} else {
		s += fmt.Sprintf(" rows  %.0f rows/s  %s", p.Rate(), HumanBytes(p.Bytes))
	}
	if eta, ok := p.ETA(); ok {
		s += "  ETA " + eta.Round(time.Second).String()
	}
	return s
}

// LocalTime is t as commands print it: the local clock with its zone, so
// that a cron job's time (often UTC) and a shell's read the same.
func LocalTime(t time.Time) string {
	return t.Local().Format("2006-01-02 15:04:05 MST")
}

// HumanBytes formats a byte count for people (binary units).
func HumanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

// A Display shows the progress of the stages a run computes.
type Display interface {
	// Start begins showing trackers; stop ends it and returns once the
	// display has printed its last line.
	Start(ts []*Tracker) (stop func())
}

// TTYDisplay draws one live line per computing stage on a terminal. Log
// lines written to Logs meanwhile are printed above the live lines instead
// of through them.
type TTYDisplay struct {
	W    io.Writer
	Logs *LogSink
}

// A LogSink is the writer of a logger that shares the terminal with a
// TTYDisplay: it writes to its destination, or through the display while
// one is live.
type LogSink struct {
	mu  sync.Mutex
	dst io.Writer
	via io.Writer
}

// NewLogSink returns a sink writing to w.
func NewLogSink(w io.Writer) *LogSink { return &LogSink{dst: w} }

func (s *LogSink) Write(b []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.via != nil {
		return s.via.Write(b)
	}
	return s.dst.Write(b)
}

func (s *LogSink) route(via io.Writer) {
	if s == nil {
		return
	}
	s.mu.Lock()
	s.via = via
	s.mu.Unlock()
}

// barPercent is how full a running stage's bar is. A bar at 100 is
// complete and stops moving, so only the stage's end fills it: a stage
// may count something else next (the rows it read, then the turns it
// answers).
func barPercent(p Progress) int64 {
	return min(99, p.Rows*100/max(p.Total, 1))
}

func (d TTYDisplay) Start(ts []*Tracker) func() {
	p := mpb.New(mpb.WithOutput(d.W), mpb.WithRefreshRate(150*time.Millisecond), mpb.WithWidth(30))
	d.Logs.route(p)
	bars := make([]*mpb.Bar, len(ts))
	for i, t := range ts {
		t := t
		bars[i] = p.New(100, mpb.BarStyle().Lbound("[").Rbound("]"),
			mpb.PrependDecorators(decor.Name(t.Name, decor.WCSyncSpaceR)),
			mpb.AppendDecorators(decor.Any(func(decor.Statistics) string {
				s := t.Snapshot()
				switch {
				case s.Failed:
					return "failed"
				case s.Done && s.Rows == 0:
					return fmt.Sprintf("done in %s", s.Elapsed.Round(10*time.Millisecond))
				case s.Done:
					return fmt.Sprintf("done  %d %s in %s", s.Rows, s.Unit, s.Elapsed.Round(10*time.Millisecond))
				case !s.Running:
					return "waiting"
				}
				return s.String()
			})),
		)
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			finished := true
			for i, t := range ts {
				s := t.Snapshot()
				if s.Total > 0 {
					bars[i].SetCurrent(barPercent(s))
				}
				if s.Done {
					if !s.Failed {
						bars[i].SetCurrent(100)
					}
					bars[i].SetTotal(100, true)
				} else {
					finished = false
				}
			}
			if finished {
				return
			}
			select {
			case <-tick.C:
			case <-stop:
				for _, b := range bars {
					if !b.Completed() {
						b.Abort(false)
					}
				}
				return
			}
		}
	}()
	return func() {
		close(stop)
		wg.Wait()
		p.Wait()
		d.Logs.route(nil)
	}
}

// LogDisplay writes a timestamped log line per computing stage every
// Every, for runs without a terminal (cron): readable in a log file, and
// quiet enough not to flood it.
type LogDisplay struct {
	Log   *slog.Logger
	Every time.Duration
}

func (d LogDisplay) Start(ts []*Tracker) func() {
	every := d.Every
	if every <= 0 {
		every = 30 * time.Second
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		tick := time.NewTicker(every)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
				for _, t := range ts {
					s := t.Snapshot()
					if !s.Running {
						continue
					}
					if s.WaitingFor != "" {
						continue // not computing yet; the log says so once it does
					}
					args := []any{"stage", t.Name, s.Unit, s.Rows, s.Unit + "_per_s", math.Round(s.Rate()*10) / 10}
					if s.Bytes > 0 {
						args = append(args, "bytes", s.Bytes)
					}
					if s.Note != "" {
						args = append(args, "note", s.Note)
					}
					if s.Total >= 0 {
						args = append(args, "total", s.Total)
					}
					if eta, ok := s.ETA(); ok {
						args = append(args, "eta", eta.Round(time.Second).String())
					}
					d.Log.Info("progress", args...)
				}
			}
		}
	}()
	return func() { close(stop); wg.Wait() }
}
