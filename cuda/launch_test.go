package cuda

import (
	"errors"
	"strings"
	"testing"
)

// Argument checks run before any driver call, so they are testable without
// a GPU on a context that was never opened.
func TestLaunchValidatesArguments(t *testing.T) {
	c := &Ctx{cu: &driverAPI{}}
	f := &Function{Name: "axpby", ParamSizes: []int{4, 8, 4, 8, 8}}
	cfg := Grid1D(10, 32)
	if err := c.Launch(f, cfg); !errors.Is(err, ErrOutsideDo) {
		t.Fatalf("launch outside Do: %v", err)
	}
	c.active.Store(true)
	for _, tc := range []struct {
		args []any
		want string
	}{
		{[]any{float32(1), Buffer{}, float32(2), DevicePtr(0)}, "takes 5 arguments, got 4"},
		{[]any{float32(1), Buffer{}, float32(2), DevicePtr(0), 7}, "Go int"},
		{[]any{float32(1), Buffer{}, float32(2), DevicePtr(0), int32(7)}, "argument 4 is int32 (4 bytes) but the kernel's parameter is 8 bytes"},
		{[]any{1.5, Buffer{}, float32(2), DevicePtr(0), int64(7)}, "argument 0 is float64"},
		{[]any{float32(1), "x", float32(2), DevicePtr(0), int64(7)}, "unsupported type string"},
	} {
		err := c.Launch(f, cfg, tc.args...)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: got %v, want an error containing %q", tc.args, err, tc.want)
		}
	}
	empty := LaunchConfig{Block: Dim3{X: 32}}
	if err := c.Launch(f, empty, float32(1), Buffer{}, float32(2), DevicePtr(0), int64(7)); err == nil || !strings.Contains(err.Error(), "empty launch") {
		t.Errorf("empty grid: %v", err)
	}
}

func TestGrid1D(t *testing.T) {
	for _, tc := range []struct{ n, block, want int }{{1, 256, 1}, {256, 256, 1}, {257, 256, 2}, {0, 128, 1}} {
		if got := Grid1D(tc.n, tc.block).Grid.X; got != tc.want {
			t.Errorf("Grid1D(%d, %d) = %d blocks, want %d", tc.n, tc.block, got, tc.want)
		}
	}
}
