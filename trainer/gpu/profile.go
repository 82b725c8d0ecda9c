package gpu

import (
	"fmt"
	"sort"
	"strings"
	"time"

	"gemmaft/cuda"
	"gemmaft/trainer/gpu/kernels"
)

// profiler times every kernel launch and GEMM of a session with CUDA
// events and adds the times up by kernel group: the breakdown from which
// the next optimisation is chosen. It serialises nothing, but each launch
// records two events, so a profiled step runs slightly slower.
type profiler struct {
	pending []timedLaunch
	pool    []*cuda.Event
	total   map[string]time.Duration // by kernel name
	count   map[string]int
	token   tokenClock
}

// tokenClock adds up decode_token's clock readings (kernels.TokenTimes)
// by phase: each phase's work (from a block's departure from the barrier
// before to its arrival at the next, averaged over the blocks), the wait
// for the slowest block (the last arrival after the average one), and the
// barriers (the average departure after the last arrival).
type tokenClock struct {
	work, waits, barrier [len(kernels.TokenPhases)]time.Duration
	steps                int
	host                 [len(hostParts)]time.Duration
	lastEnd              time.Time // the previous step's end, for hostBetween
}

// hostParts names the parts of a decode_token step's time on the host.
var hostParts = [...]string{"between steps", "the call onto the device's thread", "the step's upload", "the launch",
	"the wait for the launch", "the token's (or logits') download"}

const (
	hostBetween = iota
	hostCall
	hostUpload
	hostLaunch
	hostWait
	hostDownload
)

// hostClock times the parts of one step on the host while profiling.
type hostClock struct {
	on          bool
	begin, last time.Time
	d           [len(hostParts)]time.Duration
}

func (h *hostClock) start(on bool) {
	h.on = on
	if on {
		h.begin = time.Now()
		h.last = h.begin
	}
}

func (h *hostClock) lap(part int) {
	if h.on {
		now := time.Now()
		h.d[part] += now.Sub(h.last)
		h.last = now
	}
}

// addHost adds a step's host times, and the time since the step before
// ended.
func (tc *tokenClock) addHost(h *hostClock) {
	if !tc.lastEnd.IsZero() {
		h.d[hostBetween] = h.begin.Sub(tc.lastEnd)
	}
	for i, d := range h.d {
		tc.host[i] += d
	}
	tc.lastEnd = h.last
}

// add takes one launch's readings of blocks blocks.
func (tc *tokenClock) add(t []uint64, blocks int) {
	per := len(t) / blocks
	// In nanoseconds since the first block started: the clock's own
	// values need more bits than a float64 holds.
	at := func(b, i int) float64 { return float64(int64(t[b*per+i] - t[0])) }
	var work, waits, barrier [len(kernels.TokenPhases)]float64
	// Reading i: 0 the start, then arrival 2j+1 and departure 2j+2 at
	// barrier j, and per-1 the finish.
	for j := 0; 2*j+1 < per; j++ {
		arrive, from := 2*j+1, 2*j
		phase := j % kernels.TokenBarriers
		if arrive == per-1 {
			phase = len(work) - 1
		}
		var worked, arrived, last, left float64
		for b := range blocks {
			worked += at(b, arrive) - at(b, from)
			arrived += at(b, arrive)
			last = max(last, at(b, arrive))
			if arrive+1 < per {
				left += at(b, arrive+1)
			}
		}
		n := float64(blocks)
		work[phase] += worked / n
		waits[phase] += last - arrived/n
		if arrive+1 < per {
			barrier[phase] += left/n - last
		}
	}
	for i := range work {
		tc.work[i] += time.Duration(work[i])
		tc.waits[i] += time.Duration(waits[i])
		tc.barrier[i] += time.Duration(barrier[i])
	}
	tc.steps++
}

type timedLaunch struct {
	name        string
	start, stop *cuda.Event
}

// kernelGroups names the group of each kernel name prefix.
var kernelGroups = []struct{ prefix, group string }{
	{"gemm:base", "GEMM, frozen projections"},
	{"nf4_gemv", "GEMM, frozen projections"},
	{"gemv_mma", "GEMM, frozen projections"},
	{"gemm:lora", "LoRA (GEMMs, dropout)"},
	{"dropout_", "LoRA (GEMMs, dropout)"},
	{"lora_", "LoRA (GEMMs, dropout)"},
	{"gemm:head", "lm_head and cross-entropy"},
	{"cross_entropy", "lm_head and cross-entropy"},
	{"gather_rows", "lm_head and cross-entropy"},
	{"scatter_rows", "lm_head and cross-entropy"},
	{"sum_double", "lm_head and cross-entropy"},
	{"nf4_dequantize", "NF4 dequantisation"},
	{"argmax_rows", "lm_head and cross-entropy"},
	{"attn_", "attention"},
	{"kv_store", "attention"},
	{"adam", "optimizer and gradient norm"},
	{"sq_norm", "optimizer and gradient norm"},
	{"f32_to_act", "norms and elementwise"},
	{"rms_norm", "norms and elementwise"},
	{"qk_norm", "norms and elementwise"},
	{"geglu", "norms and elementwise"},
	{"embed", "norms and elementwise"},
	{"add_f32", "norms and elementwise"},
}

func groupOf(name string) string {
	for _, g := range kernelGroups {
		if strings.HasPrefix(name, g.prefix) {
			return g.group
		}
	}
	return "other"
}

func (p *profiler) event(c *cuda.Ctx) (*cuda.Event, error) {
	if n := len(p.pool); n > 0 {
		e := p.pool[n-1]
		p.pool = p.pool[:n-1]
		return e, nil
	}
	return c.NewEvent()
}

// Time records events around f.
func (p *profiler) Time(c *cuda.Ctx, name string, f func() error) error {
	start, err := p.event(c)
	if err != nil {
		return err
	}
	stop, err := p.event(c)
	if err != nil {
		return err
	}
	if err := start.Record(nil); err != nil {
		return err
	}
	if err := f(); err != nil {
		return err
	}
	if err := stop.Record(nil); err != nil {
		return err
	}
	p.pending = append(p.pending, timedLaunch{name, start, stop})
	return nil
}

// collect waits for the timed work and adds it to the totals.
func (p *profiler) collect(c *cuda.Ctx) error {
	if err := c.Stream().Synchronize(); err != nil {
		return err
	}
	for _, t := range p.pending {
		ms, err := t.stop.Elapsed(t.start)
		if err != nil {
			return err
		}
		p.total[t.name] += time.Duration(float64(ms) * float64(time.Millisecond))
		p.count[t.name]++
		p.pool = append(p.pool, t.start, t.stop)
	}
	p.pending = p.pending[:0]
	return nil
}

// Profile is device time by kernel group, and by kernel, since profiling
// started.
type Profile struct {
	Groups  []Timing      // by group, longest first
	Kernels []Timing      // by kernel (GEMMs by role), longest first
	Device  time.Duration // the sum of the groups
	// Token splits decode_token's launches (within Kernels) by phase,
	// where its steps ran.
	Token []TokenPhase
	// TokenHost is the host's time in decode_token's steps, by part.
	TokenHost []Timing
}

// TokenPhase is a phase of decode_token over Steps steps: the blocks'
// average work, the wait for the slowest block after it, and the
// barrier that ends it (from the last arrival to the average departure).
type TokenPhase struct {
	Name                string
	Work, Wait, Barrier time.Duration
	Steps               int
}

// Timing is the total device time and launches of a group or a kernel.
type Timing struct {
	Name     string
	Time     time.Duration
	Launches int
}

// StartProfile starts timing every launch of session s (a session this
// package opened) and clears earlier totals.
func StartProfile(s any) error {
	ss, ok := sessionOf(s)
	if !ok {
		return fmt.Errorf("gpu: %T is not a GPU session", s)
	}
	ss.prof = &profiler{total: map[string]time.Duration{}, count: map[string]int{}}
	ss.k.Timer = ss.prof
	return nil
}

// ReadProfile returns the totals since StartProfile.
func ReadProfile(s any) (Profile, error) {
	ss, ok := sessionOf(s)
	if !ok || ss.prof == nil {
		return Profile{}, fmt.Errorf("gpu: no profile started")
	}
	if err := ss.dev.Do(ss.prof.collect); err != nil {
		return Profile{}, err
	}
	var out Profile
	groups := map[string]*Timing{}
	for name, d := range ss.prof.total {
		n := ss.prof.count[name]
		out.Kernels = append(out.Kernels, Timing{name, d, n})
		g := groups[groupOf(name)]
		if g == nil {
			g = &Timing{Name: groupOf(name)}
			groups[g.Name] = g
		}
		g.Time += d
		g.Launches += n
		out.Device += d
	}
	for _, g := range groups {
		out.Groups = append(out.Groups, *g)
	}
	longestFirst(out.Groups)
	longestFirst(out.Kernels)
	if tc := &ss.prof.token; tc.steps > 0 {
		for i, name := range kernels.TokenPhases {
			out.Token = append(out.Token, TokenPhase{name, tc.work[i], tc.waits[i], tc.barrier[i], tc.steps})
		}
		for i, name := range hostParts {
			out.TokenHost = append(out.TokenHost, Timing{name, tc.host[i], tc.steps})
		}
	}
	return out, nil
}

func longestFirst(ts []Timing) {
	sort.Slice(ts, func(i, j int) bool { return ts[i].Time > ts[j].Time })
}

// sessionOf returns the session of a session or a decoder.
func sessionOf(s any) (*session, bool) {
	switch v := s.(type) {
	case *session:
		return v, true
	case *decoder:
		return v.s, true
	}
	return nil, false
}
