package stages

import (
	"context"
	"fmt"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"gemmaft/internal/testenv"
	"gemmaft/pipeline"
)

// watchDisplay polls the trackers of a run and keeps, per stage, whether
// it was seen running with a known total not yet reached.
type watchDisplay struct {
	mu   sync.Mutex
	seen map[string]bool
}

func (d *watchDisplay) Start(ts []*pipeline.Tracker) func() {
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			for _, t := range ts {
				if p := t.Snapshot(); p.Running && p.Total > 0 && p.Rows < p.Total {
					d.mu.Lock()
					d.seen[t.Name] = true
					d.mu.Unlock()
				}
			}
			select {
			case <-done:
				return
			case <-time.After(time.Millisecond):
			}
		}
	}()
	return func() { close(done); wg.Wait() }
}

// TestStreamedStagesShowTotals: as a Parquet source streams through
// chat_template and tokenize into pack, each of them knows how many rows
// to expect while it runs (the source's count, passed on), so that the
// progress display can show a total and a time left.
func TestStreamedStagesShowTotals(t *testing.T) {
	r := newTestRun(t)
	data := filepath.Join(testenv.AlpacaTR(t, ""), "parquet", "alpaca-tr.parquet")
	spec := r.spec(fmt.Sprintf(`name: totals
stages:
  src: {kind: parquet, with: {paths: [%q]}}
  chat: {kind: chat_template, needs: [src]}
  tokens: {kind: tokenize, needs: [chat], with: {tokenizer: %q}}
  pack: {kind: pack, needs: [tokens], with: {seq_len: 2048}}
`, data, testenv.GemmaFile(t, "tokenizer.json")))
	dag, err := loadSpec(spec, Registry())
	if err != nil {
		t.Fatal(err)
	}
	d := &watchDisplay{seen: map[string]bool{}}
	if _, err := (&pipeline.Engine{Store: r.store, Progress: d}).Run(context.Background(), dag, pipeline.Options{}); err != nil {
		t.Fatal(err)
	}
	for _, stage := range []string{"chat", "tokens", "pack"} {
		if !d.seen[stage] {
			t.Errorf("stage %s never ran with a known total: %v", stage, d.seen)
		}
	}
}
