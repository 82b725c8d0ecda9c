package trainer

import (
	"math"
	"path/filepath"
	"testing"

	"gemmaft/trainer/internal/golden"
)

type schedulesGolden struct {
	Warmup   int       `json:"warmup"`
	Total    int       `json:"total"`
	Steps    []int     `json:"steps"`
	Constant []float64 `json:"constant"`
	Linear   []float64 `json:"linear"`
	Cosine   []float64 `json:"cosine"`
	AdamW    struct {
		N                         int `json:"n"`
		LR, Beta1, Beta2, Eps, WD float64
		ParamsAfterEachStep       [][]float64 `json:"params_after_each_step"`
	} `json:"adamw"`
}

// TestSchedulesMatchTransformers compares LRFactor with transformers'
// get_*_schedule_with_warmup values recorded by the reference script.
func TestSchedulesMatchTransformers(t *testing.T) {
	var g schedulesGolden
	if err := golden.ReadJSON(filepath.Join(refDir, "golden", "schedules.json"), &g); err != nil {
		t.Fatal(err)
	}
	for s, want := range map[Schedule][]float64{ScheduleConstant: g.Constant, ScheduleLinear: g.Linear, ScheduleCosine: g.Cosine} {
		if len(want) != len(g.Steps) {
			t.Fatalf("%s: %d values for %d steps", s, len(want), len(g.Steps))
		}
		for i, step := range g.Steps {
			got, err := LRFactor(s, step, g.Warmup, g.Total)
			if err != nil {
				t.Fatal(err)
			}
			if math.Abs(got-want[i]) > 1e-12 {
				t.Errorf("%s step %d: %v, transformers %v", s, step, got, want[i])
			}
		}
	}
	if _, err := LRFactor("exponential", 5, 0, 10); err == nil {
		t.Error("unknown schedule accepted")
	}
}

// TestAdamWMatchesTorch replays the reference's float32 AdamW trajectory;
// torch's vectorised kernels fuse some multiply-adds, so values agree to a
// few float32 ulps rather than bit for bit.
func TestAdamWMatchesTorch(t *testing.T) {
	var g schedulesGolden
	if err := golden.ReadJSON(filepath.Join(refDir, "golden", "schedules.json"), &g); err != nil {
		t.Fatal(err)
	}
	a := g.AdamW
	n := a.N
	p := Param{Name: "w", Data: make([]float32, n), Grad: make([]float32, n)}
	for i := range p.Data {
		p.Data[i] = float32(0.1 * math.Sin(float64(i+1)))
	}
	opt := NewAdamW([]Param{p}, 0.9, 0.95, 1e-8, 0.05)
	for k := 1; k <= len(a.ParamsAfterEachStep); k++ {
		for i := range p.Grad {
			p.Grad[i] = float32(0.01 * float64(k) * math.Cos(float64(i)*float64(k)))
		}
		p.Grad[7], p.Grad[9] = 0, 1e-9
		if err := opt.Update([]Param{p}, 1e-2); err != nil {
			t.Fatal(err)
		}
		for i, want := range a.ParamsAfterEachStep[k-1] {
			if d := math.Abs(float64(p.Data[i]) - want); d > 5e-7*math.Abs(want)+1e-9 {
				t.Errorf("step %d param %d: %v, torch %v", k, i, p.Data[i], want)
			}
		}
	}
}

func TestResolveOptimizer(t *testing.T) {
	for name, want := range map[string]string{"adamw_torch": "adamw", "": "adamw", "paged_adamw_32bit": "adamw",
		"paged_adamw_8bit": "adamw_8bit", "adamw_8bit": "adamw_8bit", "adamw_bnb_8bit": "adamw_8bit"} {
		if got, _, err := ResolveOptimizer(name); err != nil || got != want {
			t.Errorf("%q: %q, %v; want %q", name, got, err, want)
		}
	}
	if _, note, _ := ResolveOptimizer("paged_adamw_8bit"); note == "" {
		t.Error("no note for a paged optimizer")
	}
	if _, note, _ := ResolveOptimizer("adamw_8bit"); note != "" {
		t.Errorf("note %q for an optimizer run as asked", note)
	}
	if _, _, err := ResolveOptimizer("sgd"); err == nil {
		t.Error("sgd accepted")
	}
}
