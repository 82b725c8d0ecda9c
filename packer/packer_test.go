package packer

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
)

// referenceBFD is best-fit-decreasing written the obvious way: for each
// example, longest first, scan every bin for the smallest remaining capacity
// that fits, taking the first such bin.
func referenceBFD(lengths []int32, order []int32, capacity int) ([]int32, int) {
	binOf := make([]int32, len(lengths))
	var remaining []int
	for _, ex := range order {
		n := int(lengths[ex])
		best := -1
		for b, r := range remaining {
			if r >= n && (best < 0 || r < remaining[best]) {
				best = b
			}
		}
		if best < 0 {
			best = len(remaining)
			remaining = append(remaining, capacity)
		}
		remaining[best] -= n
		binOf[ex] = int32(best)
	}
	return binOf, len(remaining)
}

// optimalBins finds the fewest bins by exhaustive search (small inputs only).
func optimalBins(lengths []int32, capacity int) int {
	sorted := slices.Clone(lengths)
	slices.Sort(sorted)
	slices.Reverse(sorted)
	best := len(sorted)
	var loads []int
	var place func(i int)
	place = func(i int) {
		if len(loads) >= best {
			return
		}
		if i == len(sorted) {
			best = len(loads)
			return
		}
		n := int(sorted[i])
		seen := map[int]bool{}
		for b := range loads {
			if loads[b]+n <= capacity && !seen[loads[b]] {
				seen[loads[b]] = true
				loads[b] += n
				place(i + 1)
				loads[b] -= n
			}
		}
		loads = append(loads, n)
		place(i + 1)
		loads = loads[:len(loads)-1]
	}
	place(0)
	return best
}

func TestBestFitDecreasingMatchesReference(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for trial := range 3000 {
		capacity := 8 + rng.IntN(120)
		if trial%10 == 0 {
			capacity = 64*64*3 + rng.IntN(5000) // exercises the summary bitmap
		}
		lengths := make([]int32, 1+rng.IntN(60))
		for i := range lengths {
			lengths[i] = int32(1 + rng.IntN(capacity))
			if rng.IntN(3) == 0 {
				lengths[i] = int32(1 + rng.IntN(max(1, capacity/4)))
			}
		}
		order := planOrder(lengths, rand.New(rand.NewPCG(uint64(trial), 0)))
		for i := 1; i < len(order); i++ {
			if lengths[order[i]] > lengths[order[i-1]] {
				t.Fatalf("trial %d: order not decreasing", trial)
			}
		}
		got, gotBins := bestFitDecreasing(lengths, order, capacity)
		want, wantBins := referenceBFD(lengths, order, capacity)
		if gotBins != wantBins || !slices.Equal(got, want) {
			t.Fatalf("trial %d (capacity %d, lengths %v):\ngot  %v (%d bins)\nwant %v (%d bins)",
				trial, capacity, lengths, got, gotBins, want, wantBins)
		}
		if len(lengths) <= 10 {
			// BFD uses at most 11/9 OPT + 6/9 bins (Dósa, 2007).
			if opt := optimalBins(lengths, capacity); 9*gotBins > 11*opt+6 {
				t.Fatalf("trial %d: %d bins, optimum %d", trial, gotBins, opt)
			}
		}
	}
}

// referenceMinimumSlack is minimumSlack written with linear scans over a
// count per length.
func referenceMinimumSlack(lengths []int32, order []int32, capacity int) ([]int32, int) {
	binOf := make([]int32, len(lengths))
	queue := make([][]int32, capacity+1) // per length, examples in order
	for _, ex := range order {
		queue[lengths[ex]] = append(queue[lengths[ex]], ex)
	}
	take := func(n, b int) {
		binOf[queue[n][0]] = int32(b)
		queue[n] = queue[n][1:]
	}
	bins := 0
	for left := len(order); left > 0; bins++ {
		gap := capacity
	fill:
		for gap > 0 && left > 0 {
			if len(queue[gap]) > 0 {
				take(gap, bins)
				left--
				break
			}
			for a := gap / 2; a >= 1; a-- {
				need := 1
				if a == gap-a {
					need = 2
				}
				if len(queue[a]) >= need && len(queue[gap-a]) >= 1 {
					take(gap-a, bins)
					take(a, bins)
					left -= 2
					break fill
				}
			}
			n := gap
			for n > 0 && len(queue[n]) == 0 {
				n--
			}
			if n == 0 {
				break
			}
			take(n, bins)
			left--
			gap -= n
		}
	}
	return binOf, bins
}

func TestMinimumSlackMatchesReference(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for trial := range 2000 {
		capacity := 8 + rng.IntN(120)
		if trial%10 == 0 {
			capacity = 64*64*3 + rng.IntN(5000)
		}
		lengths := make([]int32, 1+rng.IntN(80))
		for i := range lengths {
			lengths[i] = int32(1 + rng.IntN(capacity))
			if rng.IntN(2) == 0 {
				lengths[i] = int32(1 + rng.IntN(max(1, capacity/5)))
			}
		}
		order := planOrder(lengths, rand.New(rand.NewPCG(uint64(trial), 1)))
		got, gotBins, placed := minimumSlack(lengths, order, capacity)
		want, wantBins := referenceMinimumSlack(lengths, order, capacity)
		if gotBins != wantBins || !slices.Equal(got, want) {
			t.Fatalf("trial %d (capacity %d, lengths %v):\ngot  %v (%d bins)\nwant %v (%d bins)",
				trial, capacity, lengths, got, gotBins, want, wantBins)
		}
		loads := make([]int, gotBins)
		for ex, b := range got {
			loads[b] += int(lengths[ex])
		}
		for b, l := range loads {
			if l > capacity || l == 0 {
				t.Fatalf("trial %d: bin %d holds %d of %d", trial, b, l, capacity)
			}
		}
		sortedPlaced := slices.Clone(placed)
		slices.Sort(sortedPlaced)
		for i, ex := range sortedPlaced {
			if int(ex) != i {
				t.Fatalf("trial %d: placement order is not a permutation", trial)
			}
		}
		for i := 1; i < len(placed); i++ {
			if got[placed[i]] < got[placed[i-1]] {
				t.Fatalf("trial %d: placement order not bin by bin", trial)
			}
		}
	}
}

func TestBitset(t *testing.T) {
	rng := rand.New(rand.NewPCG(9, 9))
	for _, size := range []int{1, 63, 64, 65, 4096, 64*64 + 1, 131072} {
		s := newBitset(size)
		ref := make([]bool, size+1)
		for range 3000 {
			i := rng.IntN(size + 1)
			if rng.IntN(3) == 0 {
				s.clear(i)
				ref[i] = false
			} else {
				s.set(i)
				ref[i] = true
			}
			q := rng.IntN(size+3) - 1
			wantCeil, wantFloor := -1, -1
			for j := max(q, 0); j <= size; j++ {
				if ref[j] {
					wantCeil = j
					break
				}
			}
			for j := min(q, size); j >= 0; j-- {
				if ref[j] {
					wantFloor = j
					break
				}
			}
			if got := s.ceil(q); got != wantCeil {
				t.Fatalf("size %d: ceil(%d) = %d, want %d", size, q, got, wantCeil)
			}
			if got := s.floor(q); got != wantFloor {
				t.Fatalf("size %d: floor(%d) = %d, want %d", size, q, got, wantFloor)
			}
			if q >= 0 && q <= size && s.has(q) != ref[q] {
				t.Fatalf("size %d: has(%d) wrong", size, q)
			}
			sum := rng.IntN(size + 1)
			want := -1
			for a := (sum - 1) / 2; a >= 1; a-- {
				if ref[a] && ref[sum-a] {
					want = sum - a
					break
				}
			}
			if got := s.mostEvenPair(sum); got != want {
				t.Fatalf("size %d: mostEvenPair(%d) = %d, want %d", size, sum, got, want)
			}
		}
	}
}

// example is a generated input; its token ids encode where each token came
// from, so that a packed row can be traced back to its examples.
type genExample struct {
	ids, labels []int32
}

func tokenID(example, pos int) int32 { return int32(example*8192 + pos + 1) }

func generate(rng *rand.Rand, count, seqLen int) []genExample {
	out := make([]genExample, count)
	for e := range out {
		var n int
		switch rng.IntN(20) {
		case 0:
			n = 0
		case 1:
			n = seqLen + rng.IntN(2*seqLen) // over-long
		case 2:
			n = seqLen
		default:
			n = 1 + rng.IntN(seqLen/2)
		}
		ids := make([]int32, n)
		labels := make([]int32, n)
		prompt := rng.IntN(n + 1)
		explicit := rng.IntN(10) == 0
		for i := range n {
			ids[i] = tokenID(e, i)
			labels[i] = IgnoreIndex
			if i >= prompt {
				labels[i] = ids[i]
				if explicit {
					labels[i] = int32(rng.IntN(1000))
				}
			}
		}
		out[e] = genExample{ids, labels}
	}
	return out
}

type copiedRow struct{ ids, labels, pos, lens []int32 }

func pack(t *testing.T, opts Options, examples []genExample) ([]copiedRow, Stats) {
	t.Helper()
	opts.Dir = t.TempDir()
	p, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range examples {
		if err := p.Add(e.ids, e.labels); err != nil {
			t.Fatal(err)
		}
	}
	var rows []copiedRow
	stats, err := p.Finish(func(r Row) error {
		rows = append(rows, copiedRow{slices.Clone(r.InputIDs), slices.Clone(r.Labels), slices.Clone(r.PositionIDs), slices.Clone(r.SeqLengths)})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return rows, stats
}

func TestPackProperties(t *testing.T) {
	for _, algo := range []Algorithm{Auto, MinimumSlack, BestFitDecreasing} {
		for _, policy := range []Overlong{Drop, Truncate, Split} {
			for _, seqLen := range []int{16, 64, 300} {
				testPackProperties(t, algo, policy, seqLen)
			}
		}
	}
}

func testPackProperties(t *testing.T, algo Algorithm, policy Overlong, seqLen int) {
	t.Run(fmt.Sprintf("%s/%s/%d", algo, policy, seqLen), func(t *testing.T) {
		rng := rand.New(rand.NewPCG(uint64(seqLen), uint64(policy)))
		examples := generate(rng, 400, seqLen)
		opts := Options{SeqLen: seqLen, PadID: 7, Overlong: policy, Seed: 42, Algorithm: algo}
		rows, stats := pack(t, opts, examples)
		checkRows(t, opts, examples, rows, stats)

		again, _ := pack(t, opts, examples)
		if !slices.EqualFunc(rows, again, rowsEqual) {
			t.Error("same seed, different output")
		}
		opts.Seed = 43
		other, _ := pack(t, opts, examples)
		if slices.EqualFunc(rows, other, rowsEqual) {
			t.Error("different seed, same output")
		}
	})
}

func rowsEqual(a, b copiedRow) bool {
	return slices.Equal(a.ids, b.ids) && slices.Equal(a.labels, b.labels) &&
		slices.Equal(a.pos, b.pos) && slices.Equal(a.lens, b.lens)
}

// checkRows verifies every promise of Finish on rows built from examples.
func checkRows(t *testing.T, opts Options, examples []genExample, rows []copiedRow, stats Stats) {
	t.Helper()
	seqLen := opts.SeqLen
	type piece struct{ example, start int }
	seen := map[piece]int{}
	var real int64
	for r, row := range rows {
		if len(row.ids) != seqLen || len(row.labels) != seqLen || len(row.pos) != seqLen {
			t.Fatalf("row %d: lengths %d/%d/%d, want %d", r, len(row.ids), len(row.labels), len(row.pos), seqLen)
		}
		if len(row.lens) == 0 {
			t.Fatalf("row %d has no example", r)
		}
		// Segments as a trainer derives them from position ids: a new one
		// starts wherever the position id is 0.
		var segments []int
		for i, p := range row.pos {
			if p == 0 {
				segments = append(segments, 0)
			} else if len(segments) == 0 || p != row.pos[i-1]+1 {
				t.Fatalf("row %d, token %d: position id %d does not continue %d", r, i, p, row.pos[max(i-1, 0)])
			}
			segments[len(segments)-1]++
		}
		used := 0
		for _, n := range row.lens {
			used += int(n)
		}
		wantSegments := slices.Clone(row.lens)
		if used < seqLen {
			wantSegments = append(wantSegments, int32(seqLen-used))
		}
		if !slices.Equal(toInt32(segments), wantSegments) {
			t.Fatalf("row %d: position ids give segments %v, seq_lengths %v", r, segments, row.lens)
		}
		at := 0
		for _, n := range row.lens {
			// Every token of a segment comes from one example, in order,
			// so attention within the segment never sees another example.
			ex := int(row.ids[at]-1) / 8192
			start := int(row.ids[at]-1) % 8192
			if ex >= len(examples) || start%seqLen != 0 {
				t.Fatalf("row %d: segment at %d starts with token %d of example %d", r, at, start, ex)
			}
			src := examples[ex]
			if start+int(n) > len(src.ids) || !slices.Equal(row.ids[at:at+int(n)], src.ids[start:start+int(n)]) {
				t.Fatalf("row %d: segment at %d is not a contiguous piece of example %d", r, at, ex)
			}
			if row.labels[at] != IgnoreIndex {
				t.Fatalf("row %d: first label of the example at %d is %d", r, at, row.labels[at])
			}
			if !slices.Equal(row.labels[at+1:at+int(n)], src.labels[start+1:start+int(n)]) {
				t.Fatalf("row %d: labels of example %d changed", r, ex)
			}
			seen[piece{ex, start}] += int(n)
			at += int(n)
			real += int64(n)
		}
		for i := at; i < seqLen; i++ {
			if row.ids[i] != opts.PadID || row.labels[i] != IgnoreIndex {
				t.Fatalf("row %d: padding token %d is %d with label %d", r, i, row.ids[i], row.labels[i])
			}
		}
	}

	// Every example is packed exactly once, or accounted for.
	var dropped, truncated, split, pieces, empty, untrained int64
	for e, src := range examples {
		n := len(src.ids)
		if n == 0 {
			empty++
			continue
		}
		if n > seqLen {
			switch opts.Overlong {
			case Drop:
				dropped++
				for key := range seen {
					if key.example == e {
						t.Fatalf("dropped example %d was packed", e)
					}
				}
				continue
			case Truncate:
				truncated++
				n = seqLen
			case Split:
				split++
			}
		}
		for start := 0; start < n; start += seqLen {
			end := min(start+seqLen, n)
			if n > seqLen {
				pieces++
			}
			trained := slices.ContainsFunc(src.labels[start+1:end], func(l int32) bool { return l != IgnoreIndex })
			got := seen[piece{e, start}]
			switch {
			case !trained:
				untrained++
				if got != 0 {
					t.Fatalf("example %d (piece at %d) has no trained label but was packed", e, start)
				}
			case got != end-start:
				t.Fatalf("example %d (piece at %d): %d tokens packed, want %d", e, start, got, end-start)
			}
			delete(seen, piece{e, start})
		}
	}
	if len(seen) != 0 {
		t.Fatalf("rows hold pieces that should not exist: %v", seen)
	}
	want := Stats{
		ExamplesIn: int64(len(examples)), Rows: int64(len(rows)), RealTokens: real, Slots: int64(len(rows) * seqLen),
		Dropped: dropped, Truncated: truncated, Split: split, SplitPieces: pieces, SkippedEmpty: empty, SkippedUntrained: untrained,
	}
	want.Examples = want.ExamplesIn - empty - dropped - split + pieces - untrained
	want.Efficiency = float64(real) / float64(want.Slots)
	for _, e := range examples {
		want.TokensIn += int64(len(e.ids))
		want.Longest = max(want.Longest, int64(len(e.ids)))
	}
	if stats != want {
		t.Fatalf("stats\n%+v\nwant\n%+v", stats, want)
	}
}

func toInt32(s []int) []int32 {
	out := make([]int32, len(s))
	for i, v := range s {
		out[i] = int32(v)
	}
	return out
}

func TestRowsNotSortedByFill(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 5))
	examples := generate(rng, 2000, 64)
	rows, _ := pack(t, Options{SeqLen: 64, Seed: 1}, examples)
	fill := func(r copiedRow) int32 {
		var s int32
		for _, n := range r.lens {
			s += n
		}
		return s
	}
	if slices.IsSortedFunc(rows, func(a, b copiedRow) int { return int(fill(b) - fill(a)) }) {
		t.Error("rows come out sorted by fill")
	}
}

func TestBadOptionsAndInput(t *testing.T) {
	for _, opts := range []Options{{SeqLen: 1}, {SeqLen: 16, PadID: -1}, {SeqLen: 16, Overlong: 9}, {SeqLen: 16, Algorithm: 5}, {SeqLen: 16, Dir: "/nonexistent/dir"}} {
		if _, err := New(opts); err == nil {
			t.Errorf("New(%+v) accepted", opts)
		}
	}
	p, err := New(Options{SeqLen: 16, Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if err := p.Add([]int32{1, 2}, []int32{1}); err == nil {
		t.Error("mismatched lengths accepted")
	}
	if err := p.Add([]int32{1, -2}, []int32{1, 2}); err == nil {
		t.Error("negative id accepted")
	}
	if err := p.Add([]int32{1, 2}, []int32{1, -1}); err == nil {
		t.Error("negative label other than -100 accepted")
	}
	if st := p.Stats(); st.ExamplesIn != 0 {
		t.Errorf("rejected examples counted: %+v", st)
	}
	if _, err := ParseOverlong("wrap"); err == nil {
		t.Error("unknown policy parsed")
	}
	for _, o := range []Overlong{Drop, Truncate, Split} {
		if got, err := ParseOverlong(o.String()); err != nil || got != o {
			t.Errorf("ParseOverlong(%q) = %v, %v", o, got, err)
		}
	}
	for _, a := range []Algorithm{Auto, MinimumSlack, BestFitDecreasing} {
		if got, err := ParseAlgorithm(a.String()); err != nil || got != a {
			t.Errorf("ParseAlgorithm(%q) = %v, %v", a, got, err)
		}
	}
	if _, err := ParseAlgorithm("ffd"); err == nil {
		t.Error("unknown algorithm parsed")
	}
}

// TestOverlongPolicies pins each policy on one example of 10 tokens with
// seq_len 4.
func TestOverlongPolicies(t *testing.T) {
	ids := []int32{11, 12, 13, 14, 15, 16, 17, 18, 19, 20}
	labels := slices.Clone(ids)
	labels[0] = IgnoreIndex
	cases := []struct {
		policy Overlong
		rows   [][]int32 // input ids, in any order
		labels [][]int32
	}{
		{Truncate, [][]int32{{11, 12, 13, 14}}, [][]int32{{-100, 12, 13, 14}}},
		{Split, [][]int32{{11, 12, 13, 14}, {15, 16, 17, 18}, {19, 20, 0, 0}},
			[][]int32{{-100, 12, 13, 14}, {-100, 16, 17, 18}, {-100, 20, -100, -100}}},
	}
	// Dropping the only example leaves nothing to pack, which is an error.
	p, err := New(Options{SeqLen: 4, Overlong: Drop, Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Add(ids, labels); err != nil {
		t.Fatal(err)
	}
	if st, err := p.Finish(func(Row) error { return nil }); err == nil || st.Dropped != 1 || st.Rows != 0 {
		t.Errorf("drop: %+v, %v", st, err)
	}
	for _, c := range cases {
		rows, stats := pack(t, Options{SeqLen: 4, Overlong: c.policy}, []genExample{{ids, labels}})
		var gotIDs, gotLabels [][]int32
		for _, r := range rows {
			gotIDs = append(gotIDs, r.ids)
			gotLabels = append(gotLabels, r.labels)
		}
		sortRows := func(rs, ls [][]int32) {
			idx := make([]int, len(rs))
			for i := range idx {
				idx[i] = i
			}
			slices.SortFunc(idx, func(a, b int) int { return slices.Compare(rs[a], rs[b]) })
			r2, l2 := slices.Clone(rs), slices.Clone(ls)
			for i, j := range idx {
				rs[i], ls[i] = r2[j], l2[j]
			}
		}
		sortRows(gotIDs, gotLabels)
		if !slices.EqualFunc(gotIDs, c.rows, slices.Equal) || !slices.EqualFunc(gotLabels, c.labels, slices.Equal) {
			t.Errorf("%s: ids %v labels %v; want %v %v", c.policy, gotIDs, gotLabels, c.rows, c.labels)
		}
		counted := map[Overlong]int64{Truncate: stats.Truncated, Split: stats.Split}
		if counted[c.policy] != 1 {
			t.Errorf("%s: stats %+v", c.policy, stats)
		}
	}
}

// TestAutoKeepsFewerRows packs inputs where best-fit-decreasing beats the
// minimum-slack planner (most examples longer than half a row) and others
// where it does not; Auto must always give the fewer rows.
func TestAutoKeepsFewerRows(t *testing.T) {
	const seqLen = 1000
	bfdWon, slackWon := false, false
	for trial := range 20 {
		rng := rand.New(rand.NewPCG(uint64(trial), 7))
		longest := 300 + rng.IntN(500)
		lengths := make([]int32, 600)
		examples := make([]genExample, len(lengths))
		for i := range lengths {
			lengths[i] = int32(2 + rng.IntN(longest))
			ids := make([]int32, lengths[i])
			for j := range ids {
				ids[j] = int32(i*seqLen + j + 1) // no two alike: copies are planned apart
			}
			examples[i] = genExample{ids, ids}
		}
		_, st := pack(t, Options{SeqLen: seqLen, Seed: uint64(trial)}, examples)

		lengthsAsPacked := slices.Clone(lengths)
		order := planOrder(lengthsAsPacked, rand.New(rand.NewPCG(uint64(trial), 0x7061636b)))
		_, slackBins, _ := minimumSlack(lengthsAsPacked, order, seqLen)
		_, bfdBins := bestFitDecreasing(lengthsAsPacked, order, seqLen)
		if want := min(slackBins, bfdBins); st.Rows != int64(want) {
			t.Fatalf("trial %d: auto gave %d rows; min_slack %d, bfd %d", trial, st.Rows, slackBins, bfdBins)
		}
		bfdWon = bfdWon || bfdBins < slackBins
		slackWon = slackWon || slackBins < bfdBins
	}
	if !bfdWon || !slackWon {
		t.Fatalf("the inputs do not exercise both outcomes (bfd won: %v, min_slack won: %v)", bfdWon, slackWon)
	}
}

// TestCopiesPackedApart: an example given several times (a mix repeating a
// small source) never shares a row with its own copy, whatever the
// algorithm; all its copies are packed.
func TestCopiesPackedApart(t *testing.T) {
	for _, algo := range []Algorithm{Auto, MinimumSlack, BestFitDecreasing} {
		var examples []genExample
		for i := range 40 {
			ids := []int32{int32(1000 + i), 5, 6, 7}
			for range 9 { // nine copies of each: many would fit a row of 64
				examples = append(examples, genExample{ids, ids})
			}
		}
		rows, st := pack(t, Options{SeqLen: 64, Algorithm: algo, Seed: 3}, examples)
		if st.Examples != int64(len(examples)) || st.Repeated != int64(len(examples)-40) {
			t.Fatalf("%v: stats %+v", algo, st)
		}
		for r, row := range rows {
			seen := map[int32]bool{}
			at := 0
			for _, n := range row.lens {
				if first := row.ids[at]; seen[first] {
					t.Fatalf("%v: row %d holds example %d twice", algo, r, first)
				} else {
					seen[first] = true
				}
				at += int(n)
			}
		}
	}
}
