package pipeline

import (
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"
)

// BenchmarkNoopRerun measures what a nightly cron run costs when nothing
// changed: a 5-stage DAG whose source file is 100 MB, fully cached. Each
// iteration does what a new process does: load the spec, open the store
// (reading the stat cache), plan, find every stage cached, record the run.
func BenchmarkNoopRerun(b *testing.B) {
	e := newTestEnv(b)
	big := make([]byte, 100<<20)
	rand.Read(big)
	src := e.write("big.bin", string(big))
	old := time.Now().Add(-time.Hour)
	os.Chtimes(src, old, old)
	spec := e.write("five.yaml", `name: five
stages:
  src: {kind: gen, with: {rows: 10000, batch: 1000, file: big.bin}}
  a: {kind: double, needs: [src]}
  b: {kind: double, needs: [a]}
  c: {kind: double, needs: [b]}
  total: {kind: count, needs: [c]}
`)
	e.mustRun(spec, Options{})
	// The source was written moments ago, so its digest is not trusted from
	// stat yet (racy); the second run hashes it once more and records it.
	time.Sleep(2 * racyWindow)
	e.mustRun(spec, Options{})
	e.store.Close()
	for b.Loop() {
		st, err := OpenStore(e.store.Root)
		if err != nil {
			b.Fatal(err)
		}
		dag, err := Load(spec, e.reg)
		if err != nil {
			b.Fatal(err)
		}
		rec, err := (&Engine{Store: st}).Run(context.Background(), dag, Options{})
		if err != nil {
			b.Fatal(err)
		}
		if rec.HashedBytes != 0 || stateOfStage(rec, "total") != "cached" {
			b.Fatalf("not a no-op: hashed %d bytes, total %s", rec.HashedBytes, stateOfStage(rec, "total"))
		}
		st.Close()
	}
}

// BenchmarkPlan measures loading and planning a cached chain of N stages;
// the time per stage should stay flat as N grows.
func BenchmarkPlan(b *testing.B) {
	for _, n := range []int{10, 100, 1000} {
		b.Run(fmt.Sprintf("stages=%d", n), func(b *testing.B) {
			e := newTestEnv(b)
			var sb strings.Builder
			sb.WriteString("name: long\nstages:\n  s0: {kind: gen, with: {rows: 10}}\n")
			for i := 1; i < n; i++ {
				fmt.Fprintf(&sb, "  s%d: {kind: double, needs: [s%d]}\n", i, i-1)
			}
			spec := e.write("long.yaml", sb.String())
			e.mustRun(spec, Options{})
			time.Sleep(2 * racyWindow)
			for b.Loop() {
				dag, err := Load(spec, e.reg)
				if err != nil {
					b.Fatal(err)
				}
				plan, err := e.store.Plan(dag, Options{})
				if err != nil {
					b.Fatal(err)
				}
				if plan.Steps[n-1].Compute {
					b.Fatal("last stage not cached")
				}
			}
			b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(b.N)/float64(n), "µs/stage")
		})
	}
}
