package ranks

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// freeAddr is a loopback address with a port nothing listens on.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return "127.0.0.1:" + strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
}

// joinAll joins n ranks (goroutines) with the options of each and
// returns the groups and errors by rank.
func joinAll(t *testing.T, n int, opt func(rank int) Options, ranks ...int) ([]*Group, []error) {
	t.Helper()
	addr := freeAddr(t)
	if len(ranks) == 0 {
		for r := range n {
			ranks = append(ranks, r)
		}
	}
	groups, errs := make([]*Group, n), make([]error, n)
	var wg sync.WaitGroup
	for _, r := range ranks {
		wg.Add(1)
		go func() {
			defer wg.Done()
			groups[r], errs[r] = Join(context.Background(), Rank{Rank: r, Size: n, Addr: addr}, opt(r))
		}()
	}
	wg.Wait()
	t.Cleanup(func() {
		for _, g := range groups {
			if g != nil {
				g.Close()
			}
		}
	})
	return groups, errs
}

func token(tok string) func(int) Options {
	return func(int) Options { return Options{Token: tok, JoinTimeout: 10 * time.Second} }
}

// each runs f on every rank at once and returns the errors by rank.
func each(groups []*Group, f func(g *Group) error) []error {
	errs := make([]error, len(groups))
	var wg sync.WaitGroup
	for r, g := range groups {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[r] = f(g)
		}()
	}
	wg.Wait()
	return errs
}

// TestCollectives: sums over four ranks, the same bits everywhere, added in
// rank order; broadcasts from any rank.
func TestCollectives(t *testing.T) {
	groups, errs := joinAll(t, 4, token("spec abc"))
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	results := make([][]float64, 4)
	errs = each(groups, func(g *Group) error {
		// Values whose sum depends on the order: 1e16 + r + ... in float64.
		x := []float64{1e16, float64(g.Rank()) + 0.5, math.Pi * float64(g.Rank()+1)}
		if g.Rank() == 0 {
			x[0] = 1e16
		} else {
			x[0] = 1
		}
		if err := g.AllReduceSum(x); err != nil {
			return err
		}
		results[g.Rank()] = x
		return nil
	})
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	want := []float64{1e16, 0.5, math.Pi}
	for r := 1; r < 4; r++ {
		want[0] += 1
		want[1] += float64(r) + 0.5
		want[2] += math.Pi * float64(r+1)
	}
	for r, got := range results {
		for i := range want {
			if math.Float64bits(got[i]) != math.Float64bits(want[i]) {
				t.Errorf("rank %d: sum %d is %v, want %v (rank 0's value, then ranks 1, 2, 3 added in order)", r, i, got[i], want[i])
			}
		}
	}
	for root := range 4 {
		got := make([]string, 4)
		errs = each(groups, func(g *Group) error {
			b, err := g.Broadcast(root, []byte(fmt.Sprintf("from rank %d", g.Rank())))
			got[g.Rank()] = string(b)
			return err
		})
		if err := errors.Join(errs...); err != nil {
			t.Fatal(err)
		}
		for r, s := range got {
			if s != fmt.Sprintf("from rank %d", root) {
				t.Errorf("broadcast from %d: rank %d got %q", root, r, s)
			}
		}
	}
}

// TestRendezvousRefusesMismatch: a rank running another spec or binary
// fails the whole group, every rank saying why.
func TestRendezvousRefusesMismatch(t *testing.T) {
	_, errs := joinAll(t, 2, func(r int) Options {
		return Options{Token: []string{"spec abc", "spec abd"}[r], JoinTimeout: 10 * time.Second}
	})
	for r, err := range errs {
		if err == nil || !strings.Contains(err.Error(), "runs something else") {
			t.Errorf("rank %d: %v", r, err)
		}
	}
	_, errs = joinAll(t, 3, func(r int) Options { return Options{JoinTimeout: 10 * time.Second} }, 0, 1, 2)
	if err := errors.Join(errs...); err != nil {
		t.Fatalf("three ranks: %v", err)
	}
}

// TestRendezvousTimesOut: a rank that never comes, or a rank 0 that never
// comes, ends the others' wait with the reason, within the timeout.
func TestRendezvousTimesOut(t *testing.T) {
	opt := func(int) Options { return Options{JoinTimeout: time.Second} }
	start := time.Now()
	_, errs := joinAll(t, 3, opt, 0, 1) // rank 2 never starts
	if errs[0] == nil || !strings.Contains(errs[0].Error(), "ranks [2] did not join") {
		t.Errorf("rank 0: %v", errs[0])
	}
	if errs[1] == nil {
		t.Error("rank 1 joined a group without rank 2")
	}
	_, errs = joinAll(t, 2, opt, 1) // rank 0 never starts
	if errs[1] == nil || !strings.Contains(errs[1].Error(), "could not be reached") {
		t.Errorf("rank 1 without rank 0: %v", errs[1])
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("the failed rendezvous took %v", d)
	}
}

// TestRendezvousSaysWhoItWaitsFor: a rendezvous that waits says, while it
// waits, for whom: rank 0 how many have joined, another rank where it
// looks for rank 0 and why it has not reached it.
func TestRendezvousSaysWhoItWaitsFor(t *testing.T) {
	old := waitNoteEvery
	waitNoteEvery = 100 * time.Millisecond
	defer func() { waitNoteEvery = old }()
	var mu sync.Mutex
	var logs strings.Builder
	logger := slog.New(slog.NewTextHandler(lockedWriter{&mu, &logs}, nil))
	opt := func(int) Options { return Options{JoinTimeout: 700 * time.Millisecond, Log: logger} }
	joinAll(t, 3, opt, 0, 1) // rank 2 never starts
	joinAll(t, 2, opt, 1)    // rank 0 never starts
	mu.Lock()
	defer mu.Unlock()
	for _, want := range []string{"rank 0: 2 of 3 ranks joined; waiting for the others", "rank 1: waiting for rank 0 at", "connection refused", "gives_up_after=700ms"} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("the notes lack %q:\n%s", want, logs.String())
		}
	}
}

type lockedWriter struct {
	mu *sync.Mutex
	w  *strings.Builder
}

func (l lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// TestRankThatDies: a rank that goes away mid-run fails the others'
// next collective at once, naming it, and every later one.
func TestRankThatDies(t *testing.T) {
	groups, errs := joinAll(t, 3, token("x"))
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	groups[2].Close() // as a killed process's connections close
	start := time.Now()
	errs = each(groups[:2], func(g *Group) error { return g.AllReduceSum([]float64{1}) })
	if errs[0] == nil || !strings.Contains(errs[0].Error(), "rank 2 went away") {
		t.Errorf("rank 0: %v", errs[0])
	}
	if errs[1] == nil || !strings.Contains(errs[1].Error(), "rank 2 went away") {
		t.Errorf("rank 1: %v (want rank 0's word that rank 2 went away)", errs[1])
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("noticing took %v", d)
	}
	if err := groups[1].AllReduceSum([]float64{1}); err == nil {
		t.Error("a collective after the failure succeeded")
	}

	// Rank 0 dying ends the others too.
	groups, errs = joinAll(t, 2, token("x"))
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	groups[0].Close()
	if err := groups[1].AllReduceSum([]float64{1}); err == nil || !strings.Contains(err.Error(), "rank 0 went away") {
		t.Errorf("rank 1 after rank 0 died: %v", err)
	}
}

// TestRanksOutOfStep: ranks at different points of the run (one sums, the
// other broadcasts; or sums of different lengths) fail with that said.
func TestRanksOutOfStep(t *testing.T) {
	groups, errs := joinAll(t, 2, token("x"))
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	errs = each(groups, func(g *Group) error {
		if g.Rank() == 0 {
			return g.AllReduceSum([]float64{1, 2})
		}
		_, err := g.Broadcast(1, []byte("x"))
		return err
	})
	for r, err := range errs {
		if err == nil || !strings.Contains(err.Error(), "different points of the run") {
			t.Errorf("rank %d: %v", r, err)
		}
	}
	groups, _ = joinAll(t, 2, token("x"))
	errs = each(groups, func(g *Group) error { return g.AllReduceSum(make([]float64, 1+g.Rank())) })
	for r, err := range errs {
		if err == nil || !strings.Contains(err.Error(), "different points of the run") {
			t.Errorf("sums of different lengths, rank %d: %v", r, err)
		}
	}
}

func TestOneRankNeedsNoNetwork(t *testing.T) {
	g, err := Join(context.Background(), Rank{Size: 1, Addr: "nowhere:1"}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	x := []float64{3}
	if err := g.AllReduceSum(x); err != nil || x[0] != 3 {
		t.Errorf("sum over one rank: %v, %v", x, err)
	}
	if b, err := g.Broadcast(0, []byte("a")); err != nil || string(b) != "a" {
		t.Errorf("broadcast over one rank: %q, %v", b, err)
	}
}
