package dataset

import (
	"errors"
	"math/rand/v2"
	"path/filepath"
	"reflect"
	"slices"
	"testing"

	"gemmaft/internal/testenv"
)

// shuffledAs is the order Open promises for a shuffle of rows in P passes:
// row i in pass passOf(seed, i, P), each pass's rows in file order then
// permuted by PCG(seed, pass), the passes one after another.
func shuffledAs[T any](rows []T, seed uint64, passes int64) []T {
	var out []T
	for p := range passes {
		var pass []T
		for i, r := range rows {
			if passOf(seed, int64(i), passes) == p {
				pass = append(pass, r)
			}
		}
		rng := rand.New(rand.NewPCG(seed, uint64(p)))
		rng.Shuffle(len(pass), func(i, j int) { pass[i], pass[j] = pass[j], pass[i] })
		out = append(out, pass...)
	}
	return out
}

// TestShuffleOrder: the shuffle's two ways, through a spill (the whole
// input) and by reading again (a limit met in the first pass), deliver
// the promised order, with few passes (many chunks each in the spill) and
// with many.
func TestShuffleOrder(t *testing.T) {
	path := filepath.Join(testenv.AlpacaTR(t, ""), "parquet", "alpaca-tr.parquet")
	all := readAll(t, SourceOptions{Paths: []string{path}})
	s, err := Open(SourceOptions{Paths: []string{path}, Shuffle: true})
	if err != nil {
		t.Fatal(err)
	}
	text := s.textBytes
	s.Close()
	for _, memory := range []int64{text / 20, text / 300} {
		passes := shufflePasses(text, memory, int64(len(all)))
		want := shuffledAs(all, 11, passes)
		spilled := readAll(t, SourceOptions{Paths: []string{path}, Shuffle: true, Seed: 11, ShuffleMemory: memory, SpillDir: t.TempDir()})
		if !slices.EqualFunc(spilled, want, slices.Equal) {
			t.Errorf("%d passes through the spill: not the promised order", passes)
		}
		limit := int64(len(all)) / passes / 3
		reread := readAll(t, SourceOptions{Paths: []string{path}, Shuffle: true, Seed: 11, ShuffleMemory: memory, Limit: limit})
		if !slices.EqualFunc(reread, want[:limit], slices.Equal) {
			t.Errorf("%d passes, the first %d rows read again: not the promised order", passes, limit)
		}
		t.Logf("%d passes, %d rows", passes, len(spilled))
	}
}

// TestSpilledRecord: a record reads back from the spill as it was put,
// conversations, nulls and flaws included.
func TestSpilledRecord(t *testing.T) {
	in := []record{
		{v: [4]string{"Türkiye'nin başkenti?", "", "Ankara.", "Kısa yanıtla."}, null: 1 << 1, file: 3, pos: 20748},
		{file: 0, pos: -1, msgs: []rawMessage{
			{role: "human", content: "Merhaba"},
			{role: "gpt", null: true},
			{role: "user", parts: []string{"bir", " iki", ""}},
		}, null: 1<<nullContent | 1<<nullList, flaw: flawError{errors.New("message 1 is null")}},
		{},
	}
	for _, r := range in {
		got, err := readRecord(appendRecord(nil, r))
		if err != nil {
			t.Fatal(err)
		}
		if (got.flaw == nil) != (r.flaw == nil) || (r.flaw != nil && (got.flaw.Error() != r.flaw.Error() || !errors.As(got.flaw, new(flawError)))) {
			t.Errorf("flaw %v read back as %v", r.flaw, got.flaw)
		}
		got.flaw, r.flaw = nil, nil
		if !reflect.DeepEqual(got, r) {
			t.Errorf("spilled %+v, read back %+v", r, got)
		}
	}
	if _, err := readRecord(appendRecord(nil, in[0])[:10]); err == nil {
		t.Error("a cut record read back without an error")
	}
}
