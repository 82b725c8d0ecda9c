package gpu

import (
	"testing"
	"time"

	"gemmaft/trainer/gpu/kernels"
)

// TestTokenClock: decode_token's clock readings of two blocks over one
// layer are split into each phase's average work, the wait for the
// slower block and the barrier after it, and the lm_head's phase.
func TestTokenClock(t *testing.T) {
	// Per block: start, (arrive, leave) at five barriers, finish; block 1
	// arrives 4 ns after block 0 at each barrier, both leave 3 ns after it.
	var readings []uint64
	for b := range 2 {
		at := uint64(1_764_547_200_000_000_000) // the clock counts from 1970: more bits than a float64's
		r := []uint64{at}
		for j := range 5 {
			arrive := at + uint64(10*(j+1)) + uint64(4*b)
			leave := at + uint64(10*(j+1)) + 4 + 3
			r = append(r, arrive, leave)
			at = leave
		}
		readings = append(append(readings, r...), at+100+uint64(2*b))
	}
	var tc tokenClock
	tc.add(readings, 2)
	tc.add(readings, 2)
	if tc.steps != 2 {
		t.Fatalf("%d steps, want 2", tc.steps)
	}
	for j := range 5 {
		// Block 0 works 10(j+1) ns and block 1 4 ns more: 2 ns more on
		// average, and the slower block arrives 2 ns after the average.
		want := []time.Duration{time.Duration(2 * (10*(j+1) + 2)), 2 * 2, 2 * 3}
		got := []time.Duration{tc.work[j], tc.waits[j], tc.barrier[j]}
		if got[0] != want[0] || got[1] != want[1] || got[2] != want[2] {
			t.Errorf("%s: work, wait, barrier %v, want %v", kernels.TokenPhases[j], got, want)
		}
	}
	last := len(kernels.TokenPhases) - 1
	if tc.work[last] != 2*101 || tc.waits[last] != 2*1 || tc.barrier[last] != 0 {
		t.Errorf("%s: work, wait, barrier %v %v %v, want 202ns 2ns 0s", kernels.TokenPhases[last], tc.work[last], tc.waits[last], tc.barrier[last])
	}
}
