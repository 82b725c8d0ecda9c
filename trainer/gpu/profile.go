package gpu

import (
	"fmt"
	"sort"
	"strings"
	"time"

	"gemmaft/cuda"
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
