package packer

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"

	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/ipc"

	"gemmaft/dataset"
	"gemmaft/internal/testenv"
	"gemmaft/tokenizer"
)

// estimateTokens stands in for the Gemma 3 chat template and tokenizer:
// about 3.4 bytes of Turkish text per token, plus the template's turn
// markers. The prompt is untrained, the answer trained.
func estimateTokens(instruction, input, output string, ids, labels []int32) ([]int32, []int32) {
	prompt := instruction
	if input != "" {
		prompt += "\n\n" + input
	}
	promptTokens := 9 + int(float64(len(prompt))/3.4+0.5) // <bos>, two turn openings, one closing
	answerTokens := 2 + int(float64(len(output))/3.4+0.5) // the answer and its closing turn
	ids, labels = ids[:0], labels[:0]
	for i := range promptTokens + answerTokens {
		id := int32(2 + (i*7919+len(output))%262000)
		ids = append(ids, id)
		if i < promptTokens {
			labels = append(labels, IgnoreIndex)
		} else {
			labels = append(labels, id)
		}
	}
	return ids, labels
}

// chainResult is what runChain measures.
type chainResult struct {
	stats  Stats
	digest [32]byte // of the packed Arrow rows, in order
}

// runChain reads a source, tokenizes it (with tok, or by estimate when tok
// is nil), packs the tokens and writes the rows to an Arrow IPC file, as the
// parquet, tokenize and pack stages do in a run. With check it reads the
// file back and verifies every row's structure.
func runChain(t testing.TB, src dataset.SourceOptions, opts Options, out string, check bool, tok *tokenizer.Tokenizer) chainResult {
	t.Helper()
	ctx := context.Background()
	s, err := dataset.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	p, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	var ids, labels []int32
	for {
		rec, err := s.Next(ctx)
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		cols := [3]*array.String{}
		for c := range cols {
			cols[c] = rec.Column(c).(*array.String)
		}
		if tok != nil {
			if err := addTokenized(p, tok, cols); err != nil {
				t.Fatal(err)
			}
			rec.Release()
			continue
		}
		for i := range int(rec.NumRows()) {
			ids, labels = estimateTokens(cols[0].Value(i), cols[1].Value(i), cols[2].Value(i), ids, labels)
			if err := p.Add(ids, labels); err != nil {
				t.Fatal(err)
			}
		}
		rec.Release()
	}

	f, err := os.Create(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	w, err := ipc.NewFileWriter(f, ipc.WithSchema(Schema()))
	if err != nil {
		t.Fatal(err)
	}
	bb := NewBatchBuilder(nil)
	defer bb.Release()
	var written int64
	flush := func() error {
		rec := bb.NewRecordBatch()
		defer rec.Release()
		written += rec.NumRows()
		return w.Write(rec)
	}
	stats, err := p.Finish(func(r Row) error {
		bb.Append(r)
		if bb.Len() == 64 {
			return flush()
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if bb.Len() > 0 {
		if err := flush(); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if written != stats.Rows {
		t.Fatalf("wrote %d rows, stats say %d", written, stats.Rows)
	}

	r, err := dataset.OpenIPC(out)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	h := sha256.New()
	var buf []byte
	var rows, real int64
	for {
		rec, err := r.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		for i := range int(rec.NumRows()) {
			row, err := RowAt(rec, i)
			if err != nil {
				t.Fatal(err)
			}
			for _, col := range [][]int32{row.InputIDs, row.Labels, row.PositionIDs, row.SeqLengths} {
				buf = binary.LittleEndian.AppendUint32(buf[:0], uint32(len(col)))
				for _, v := range col {
					buf = binary.LittleEndian.AppendUint32(buf, uint32(v))
				}
				h.Write(buf)
			}
			if check {
				real += checkIsolation(t, opts, row)
			}
			rows++
		}
		rec.Release()
	}
	if rows != stats.Rows || (check && real != stats.RealTokens) {
		t.Fatalf("file holds %d rows and %d real tokens; stats say %d and %d", rows, real, stats.Rows, stats.RealTokens)
	}
	return chainResult{stats, [32]byte(h.Sum(nil))}
}

// checkIsolation verifies one row read back from Arrow: exactly SeqLen
// tokens, position ids restarting at 0 exactly where seq_lengths start a new
// example, first labels masked, padding masked. It returns the real tokens.
func checkIsolation(t testing.TB, opts Options, row Row) int64 {
	t.Helper()
	n := opts.SeqLen
	if len(row.InputIDs) != n || len(row.Labels) != n || len(row.PositionIDs) != n {
		t.Fatalf("row of %d/%d/%d tokens, want %d", len(row.InputIDs), len(row.Labels), len(row.PositionIDs), n)
	}
	at := 0
	for _, l := range row.SeqLengths {
		if l <= 0 || at+int(l) > n {
			t.Fatalf("bad seq_lengths %v", row.SeqLengths)
		}
		if row.Labels[at] != IgnoreIndex {
			t.Fatalf("first label of an example is %d", row.Labels[at])
		}
		for i := range int(l) {
			if row.PositionIDs[at+i] != int32(i) {
				t.Fatalf("seq_lengths %v but position_ids[%d] = %d", row.SeqLengths, at+i, row.PositionIDs[at+i])
			}
		}
		at += int(l)
	}
	for i := at; i < n; i++ {
		if row.InputIDs[i] != opts.PadID || row.Labels[i] != IgnoreIndex || row.PositionIDs[i] != int32(i-at) {
			t.Fatalf("padding token %d: id %d, label %d, position %d", i, row.InputIDs[i], row.Labels[i], row.PositionIDs[i])
		}
	}
	return int64(at)
}

// TestAlpacaChain packs alpaca-tr at seq_len 4096 from each of its three
// layouts: the packed rows must be identical, isolated, and at least 99.8%
// full.
func TestAlpacaChain(t *testing.T) {
	dir := testenv.AlpacaTR(t, "")
	shards, err := dataset.ExpandGlobs(dir, []string{"parquet/train-*.parquet"})
	if err != nil {
		t.Fatal(err)
	}
	sources := map[string]dataset.SourceOptions{
		"parquet": {Paths: []string{filepath.Join(dir, "parquet", "alpaca-tr.parquet")}},
		"shards": {Paths: shards, Columns: map[string]string{
			dataset.ColInstruction: "instruction-turkish", dataset.ColInput: "input-turkish", dataset.ColOutput: "output-turkish"}},
		"jsonl": {Paths: []string{filepath.Join(dir, "alpaca-tr.jsonl.gz")}},
	}
	tmp := t.TempDir()
	opts := Options{SeqLen: 4096, Seed: 3407, Dir: tmp}
	var first *chainResult
	for _, name := range []string{"parquet", "shards", "jsonl"} {
		res := runChain(t, sources[name], opts, filepath.Join(tmp, name+".arrow"), true, nil)
		st := res.stats
		t.Logf("%s: %d examples in %d rows, efficiency %.5f%%, %d real tokens of %d slots", name, st.Examples, st.Rows, 100*st.Efficiency, st.RealTokens, st.Slots)
		if st.ExamplesIn != 20748 || st.Examples != 20748 {
			t.Fatalf("%s: %+v", name, st)
		}
		if st.Efficiency < 0.998 {
			t.Errorf("%s: packing efficiency %.5f%%, want at least 99.8%%", name, 100*st.Efficiency)
		}
		if first == nil {
			first = &res
		} else if res.digest != first.digest || res.stats != first.stats {
			t.Errorf("%s: packed rows differ from the single Parquet file's", name)
		}
	}
}

// TestAlpacaOverlong packs alpaca-tr at a seq_len shorter than many records,
// under each policy, checking the accounting against the records' lengths.
func TestAlpacaOverlong(t *testing.T) {
	dir := testenv.AlpacaTR(t, "")
	src := dataset.SourceOptions{Paths: []string{filepath.Join(dir, "parquet", "alpaca-tr.parquet")}}
	tmp := t.TempDir()
	for _, policy := range []Overlong{Drop, Truncate, Split} {
		opts := Options{SeqLen: 512, Overlong: policy, Seed: 1, Dir: tmp}
		res := runChain(t, src, opts, filepath.Join(tmp, policy.String()+".arrow"), true, nil)
		st := res.stats
		t.Logf("%s: %+v", policy, st)
		counted := map[Overlong]int64{Drop: st.Dropped, Truncate: st.Truncated, Split: st.Split}
		if counted[policy] < 1000 {
			t.Errorf("%s: only %d over-long records counted at seq_len 512", policy, counted[policy])
		}
		if st.Examples != st.ExamplesIn-st.SkippedEmpty-st.Dropped-st.Split+st.SplitPieces-st.SkippedUntrained {
			t.Errorf("%s: counts do not add up: %+v", policy, st)
		}
	}
}

// peakRSS reads the process's peak resident set size (Linux only).
func peakRSS() (mib float64, ok bool) {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return 0, false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, found := strings.CutPrefix(sc.Text(), "VmHWM:"); found {
			kb, err := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(rest), " kB"))
			return float64(kb) / 1024, err == nil
		}
	}
	return 0, false
}

// resetPeakRSS starts a new peak RSS measurement (Linux 4.0 and later).
func resetPeakRSS() {
	runtime.GC()
	os.WriteFile("/proc/self/clear_refs", []byte("5"), 0)
}

// BenchmarkChain runs Parquet → tokens → pack → Arrow IPC on alpaca-tr (x1)
// and on ten copies of it (x10): with estimated tokens in file order and
// shuffled, and with the Gemma 3 tokenizer (loaded before the measurement
// starts), reporting the peak RSS of the process during the run. Run one case per
// process for a clean peak:
//
//	go test ./packer -run '^$' -bench 'Chain/x10$' -benchtime 1x
func BenchmarkChain(b *testing.B) {
	dir := testenv.AlpacaTR(b, "")
	path := filepath.Join(dir, "parquet", "alpaca-tr.parquet")
	for _, run := range []struct {
		copies    int
		shuffle   bool
		tokenized bool
	}{{1, false, false}, {10, false, false}, {1, true, false}, {10, true, false}, {1, false, true}, {10, false, true}} {
		name := fmt.Sprintf("x%d", run.copies)
		if run.shuffle {
			name += "-shuffled"
		}
		if run.tokenized {
			name += "-tokenized"
		}
		copies := run.copies
		b.Run(name, func(b *testing.B) {
			paths := make([]string, copies)
			for i := range paths {
				paths[i] = path
			}
			tmp := b.TempDir()
			var tok *tokenizer.Tokenizer
			if run.tokenized {
				tok = loadTokenizer(b)
			}
			resetPeakRSS()
			var st Stats
			for b.Loop() {
				st = runChain(b, dataset.SourceOptions{Paths: paths, Shuffle: run.shuffle, Seed: 1}, Options{SeqLen: 4096, Dir: tmp}, filepath.Join(tmp, "packed.arrow"), false, tok).stats
			}
			if mib, ok := peakRSS(); ok {
				b.ReportMetric(mib, "peak-RSS-MiB")
			}
			b.ReportMetric(float64(st.ExamplesIn), "examples")
			b.ReportMetric(100*st.Efficiency, "efficiency-%")
		})
	}
}

// BenchmarkPack measures the packer alone on estimated alpaca-tr lengths.
func BenchmarkPack(b *testing.B) {
	dir := testenv.AlpacaTR(b, "")
	s, err := dataset.Open(dataset.SourceOptions{Paths: []string{filepath.Join(dir, "parquet", "alpaca-tr.parquet")}})
	if err != nil {
		b.Fatal(err)
	}
	var examples []genExample
	for {
		rec, err := s.Next(context.Background())
		if err == io.EOF {
			break
		}
		if err != nil {
			b.Fatal(err)
		}
		for i := range int(rec.NumRows()) {
			c := func(k int) string { return rec.Column(k).(*array.String).Value(i) }
			ids, labels := estimateTokens(c(0), c(1), c(2), nil, nil)
			examples = append(examples, genExample{ids, labels})
		}
		rec.Release()
	}
	s.Close()
	for _, copies := range []int{1, 10} {
		b.Run(fmt.Sprintf("x%d", copies), func(b *testing.B) {
			tmp := b.TempDir()
			for b.Loop() {
				p, err := New(Options{SeqLen: 4096, Dir: tmp})
				if err != nil {
					b.Fatal(err)
				}
				for range copies {
					for _, e := range examples {
						if err := p.Add(e.ids, e.labels); err != nil {
							b.Fatal(err)
						}
					}
				}
				if _, err := p.Finish(func(Row) error { return nil }); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(copies*len(examples)), "examples")
		})
	}
}
