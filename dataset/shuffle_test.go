package dataset

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"gemmaft/chat"
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
			{role: "system", parts: []string{}}, // refused, where no parts is a text
		}, null: 1<<nullContent | 1<<nullList, flaw: flawError{errors.New("message 1 is null")}},
		{msgs: []rawMessage{}}, // an empty conversation
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

// TestSpilledConversations: conversations shuffled through the spill come
// out as read again pass by pass: the same messages, the same dropped as
// invalid (null lists and messages, system texts as lists of parts, empty
// ones among them, turns out of order) and the same nulls counted.
func TestSpilledConversations(t *testing.T) {
	var b strings.Builder
	for i := range 2100 {
		switch i % 7 {
		case 0:
			fmt.Fprintf(&b, `{"messages": [{"role": "user", "content": "soru %d"}, {"role": "assistant", "content": "yanıt %d"}]}`+"\n", i, i)
		case 1:
			fmt.Fprintf(&b, `{"messages": [{"role": "system", "content": [{"type": "text", "text": "Kısa yanıtla."}]}, {"role": "user", "content": "soru %d"}, {"role": "assistant", "content": "yanıt %d"}]}`+"\n", i, i)
		case 2:
			fmt.Fprintf(&b, `{"messages": null}`+"\n")
		case 3:
			fmt.Fprintf(&b, `{"messages": [{"role": "user", "content": null}, {"role": "assistant", "content": "yanıt %d"}]}`+"\n", i)
		case 4:
			fmt.Fprintf(&b, `{"messages": [null, {"role": "assistant", "content": "yanıt %d"}]}`+"\n", i)
		case 5:
			fmt.Fprintf(&b, `{"messages": [{"role": "system", "content": []}, {"role": "user", "content": [{"type": "text", "text": " soru %d "}]}, {"role": "assistant", "content": "yanıt"}]}`+"\n", i)
		case 6:
			fmt.Fprintf(&b, `{"messages": [{"role": "assistant", "content": "yanıt %d"}]}`+"\n", i)
		}
	}
	path := filepath.Join(t.TempDir(), "sohbet.jsonl")
	if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, nulls := range []NullPolicy{NullsEmpty, NullsDrop} {
		read := func(reread bool) ([][]chat.Message, NullReport, InvalidReport) {
			rereadShuffles = reread
			defer func() { rereadShuffles = false }()
			s, err := Open(SourceOptions{Paths: []string{path}, Layout: LayoutOpenAI, Shuffle: true, Seed: 5, ShuffleMemory: 4 << 10,
				DropInvalid: true, Nulls: nulls, SpillDir: t.TempDir()})
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			convs, err := drainConversations(s)
			if err != nil {
				t.Fatal(err)
			}
			return convs, s.Nulls(), s.Invalid()
		}
		wantConvs, wantNulls, wantInvalid := read(true)
		convs, nullsSeen, invalid := read(false)
		if !reflect.DeepEqual(convs, wantConvs) || !reflect.DeepEqual(nullsSeen, wantNulls) || !reflect.DeepEqual(invalid, wantInvalid) {
			t.Errorf("nulls %q: through the spill %d conversations, %d invalid, nulls %+v; read again %d, %d, %+v",
				nulls, len(convs), invalid.Dropped, nullsSeen, len(wantConvs), wantInvalid.Dropped, wantNulls)
		}
	}
}
