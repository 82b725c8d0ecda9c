package stages

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"

	"gemmaft/dataset"
	"gemmaft/internal/testenv"
	"gemmaft/pipeline"
)

// mixSources makes inputs of n examples each, of lengths from len.
func mixSources(names []string, ns []int, weights []float64, length func(src, i int) int32) []*mixSource {
	var out []*mixSource
	for s, name := range names {
		src := &mixSource{name: name, weight: weights[s]}
		for i := 0; i < ns[s]; i++ {
			src.lens = append(src.lens, length(s, i))
		}
		out = append(out, src)
	}
	return out
}

// taken sums what a plan takes of a source: examples, tokens, the largest
// and smallest count of a non-held-out example, and the held-out ones.
func taken(src *mixSource) (examples, tokens int64, most, least int32, held int) {
	least = math.MaxInt32
	for j, c := range src.count {
		if src.heldout[j] {
			held++
			if c != 0 {
				panic("a held-out example is taken")
			}
			continue
		}
		examples += int64(c)
		tokens += int64(c) * int64(src.lens[j])
		most, least = max(most, c), min(least, c)
	}
	return
}

func TestPlanMixByExamples(t *testing.T) {
	flat := func(int, int) int32 { return 10 }
	weights := map[string]float64{"a": 1, "b": 3}
	// No total: the largest mix in proportion that repeats nothing. b
	// runs out first: 100 of b are 3/4, so 133 in all.
	srcs := mixSources([]string{"a", "b"}, []int{100, 100}, []float64{1, 3}, flat)
	if err := planMix(srcs, &mixParams{Weights: weights, By: mixByExamples}); err != nil {
		t.Fatal(err)
	}
	ea, _, mostA, _, _ := taken(srcs[0])
	eb, _, mostB, leastB, _ := taken(srcs[1])
	if ea != 33 || eb != 100 || mostA != 1 || mostB != 1 || leastB != 1 {
		t.Errorf("a %d (most %d), b %d (most %d, least %d); want 33 and 100, none repeated", ea, mostA, eb, mostB, leastB)
	}

	// A total beyond the data repeats examples, each as evenly as passes
	// allow, and the shares add up to the total exactly.
	for _, total := range []int64{7, 1000, 1001, 12345} {
		srcs := mixSources([]string{"a", "b", "c"}, []int{100, 37, 5}, []float64{1, 3, 0.5}, flat)
		if err := planMix(srcs, &mixParams{Weights: map[string]float64{"a": 1, "b": 3, "c": 0.5}, By: mixByExamples, Total: total, Seed: 9}); err != nil {
			t.Fatal(err)
		}
		var sum int64
		for i, src := range srcs {
			e, _, most, least, _ := taken(src)
			sum += e
			want := float64(total) * src.weight / 4.5
			if math.Abs(float64(e)-want) > 1 {
				t.Errorf("total %d: %s takes %d, want %.2f", total, src.name, e, want)
			}
			if e >= int64(len(src.lens)) && most-least > 1 {
				t.Errorf("total %d: %s: counts from %d to %d; passes take every example before repeating any", total, src.name, least, most)
			}
			_ = i
		}
		if sum != total {
			t.Errorf("total %d: the mix takes %d", total, sum)
		}
	}
}

func TestPlanMixByTokens(t *testing.T) {
	// a's examples are short, b's long: by tokens b gets fewer examples.
	length := func(src, i int) int32 { return int32(5 + 40*src + i%7) }
	for _, total := range []int64{0, 5000, 100000} {
		srcs := mixSources([]string{"a", "b"}, []int{300, 200}, []float64{2, 1}, length)
		p := &mixParams{Weights: map[string]float64{"a": 2, "b": 1}, By: mixByTokens, Total: total, Seed: 1}
		if err := planMix(srcs, p); err != nil {
			t.Fatal(err)
		}
		_, ta, _, _, _ := taken(srcs[0])
		_, tb, _, _, _ := taken(srcs[1])
		all := ta + tb
		if total > 0 && (all < total || all > total+2*51) {
			t.Errorf("total %d: %d tokens taken", total, all)
		}
		if total == 0 {
			// The limit: all of a's tokens are 2/3 of the mix.
			var avail int64
			for _, l := range srcs[0].lens {
				avail += int64(l)
			}
			if ta != avail {
				t.Errorf("no total: a gives %d of its %d tokens, want all", ta, avail)
			}
			// b's share is half of that, overshot by less than one example.
			if d := float64(tb) - float64(ta)/2; d < 0 || d >= 51 {
				t.Errorf("no total: b has %d tokens, want %d and less than one example more", tb, ta/2)
			}
			continue
		}
		// Each share is within one example of its target.
		if d := float64(ta) - float64(total)*2/3; d < 0 || d >= 12 {
			t.Errorf("total %d: a has %d tokens, want %.0f and less than one example more", total, ta, float64(total)*2/3)
		}
		if d := float64(tb) - float64(total)/3; d < 0 || d >= 51 {
			t.Errorf("total %d: b has %d tokens, want %.0f and less than one example more", total, tb, float64(total)/3)
		}
		t.Logf("total %d: a %d tokens, b %d tokens (share %.4f)", total, ta, tb, float64(ta)/float64(all))
	}
}

func TestPlanMixHeldOutAndSeed(t *testing.T) {
	flat := func(int, int) int32 { return 3 }
	plan := func(names []string, ns []int, seed uint64, heldout float64) []*mixSource {
		w := make([]float64, len(names))
		for i := range w {
			w[i] = 1
		}
		srcs := mixSources(names, ns, w, flat)
		if err := planMix(srcs, &mixParams{By: mixByExamples, HeldOut: heldout, Seed: seed}); err != nil {
			t.Fatal(err)
		}
		return srcs
	}
	a := plan([]string{"a", "b"}, []int{50, 7}, 5, 0.1)
	if _, _, _, _, h := taken(a[0]); h != 5 {
		t.Errorf("a holds out %d of 50, want 5", h)
	}
	if _, _, _, _, h := taken(a[1]); h != 1 {
		t.Errorf("b holds out %d of 7, want 1 (at least one)", h)
	}
	// Without weights every other example is taken once.
	if e, _, most, least, _ := taken(a[0]); e != 45 || most != 1 || least != 1 {
		t.Errorf("a takes %d (counts %d to %d), want 45 once each", e, least, most)
	}
	// The same seed draws the same; another seed another; an input's draw
	// does not depend on the others.
	b := plan([]string{"a", "b"}, []int{50, 7}, 5, 0.1)
	c := plan([]string{"a", "b"}, []int{50, 7}, 6, 0.1)
	d := plan([]string{"c", "a"}, []int{20, 50}, 5, 0.1)
	if !slices.Equal(a[0].heldout, b[0].heldout) || !slices.Equal(a[0].count, b[0].count) {
		t.Error("the same seed drew differently")
	}
	if slices.Equal(a[0].heldout, c[0].heldout) {
		t.Error("another seed drew the same held-out examples")
	}
	if !slices.Equal(a[0].heldout, d[1].heldout) {
		t.Error("another input changed a's held-out examples")
	}
	// Holding out everything is an error.
	srcs := mixSources([]string{"a"}, []int{1}, []float64{1}, flat)
	if err := planMix(srcs, &mixParams{By: mixByExamples, HeldOut: 0.5}); err == nil || !strings.Contains(err.Error(), "leaves none to train on") {
		t.Errorf("holding out the only example: %v", err)
	}
}

// TestPackHeldOutAllDropped: when every held-out example is longer than
// seq_len, pack writes the training rows with a warning and no held-out
// file (the training stage then has no eval loss), instead of failing.
func TestPackHeldOutAllDropped(t *testing.T) {
	r := newTestRun(t)
	var logs bytes.Buffer
	r.log = slog.New(slog.NewTextHandler(&logs, nil))
	var records strings.Builder
	for i := range 10 {
		out := "Merhaba."
		if i >= 5 {
			out = strings.Repeat("Bu uzun bir cevaptır. ", 60)
		}
		fmt.Fprintf(&records, `{"instruction": "Soru %d", "input": "", "output": %q}`+"\n", i, out)
	}
	data := filepath.Join(r.dir, "data.jsonl")
	if err := os.WriteFile(data, []byte(records.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	// A seed whose one held-out example is among the long ones.
	seed := -1
	for s := range 100 {
		srcs := mixSources([]string{"tokens"}, []int{10}, []float64{1}, func(int, int) int32 { return 3 })
		if err := planMix(srcs, &mixParams{By: mixByExamples, HeldOut: 0.1, Seed: uint64(s)}); err != nil {
			t.Fatal(err)
		}
		if i := slices.Index(srcs[0].heldout, true); i >= 5 {
			seed = s
			break
		}
	}
	if seed < 0 {
		t.Fatal("no seed holds out a long example")
	}
	rec, err := r.run(r.spec(fmt.Sprintf(`name: heldout
stages:
  alpaca: {kind: jsonl, with: {paths: [%s]}}
  chat: {kind: chat_template, needs: [alpaca]}
  tokens: {kind: tokenize, needs: [chat], with: {tokenizer: %s}}
  mix: {kind: mix, needs: [tokens], with: {heldout: 0.1, seed: %d}}
  pack: {kind: pack, needs: [mix], with: {seq_len: 128, overlong: drop}}
`, data, testenv.GemmaFile(t, "tokenizer.json"), seed)), pipeline.Options{})
	if err != nil {
		t.Fatal(err)
	}
	dir := stageDir(t, r, rec, "pack")
	if n := len(packedExamples(t, filepath.Join(dir, pipeline.TableFile))); n != 5 {
		t.Errorf("%d examples in the training rows, want the 5 short ones", n)
	}
	if _, err := os.Stat(filepath.Join(dir, PackedHeldOutFile)); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("a held-out file without a held-out example: %v", err)
	}
	if h := stageStats(t, rec, "pack")["heldout"].(map[string]any); h["dropped"].(float64) != 1 {
		t.Errorf("held-out statistics %v, want the one dropped", h)
	}
	if !strings.Contains(logs.String(), "no held-out example was packed") {
		t.Errorf("no warning:\n%s", logs.String())
	}
}

// mixRow is a row of a mix stage's table.
type mixRow struct {
	ids, labels []int32
	source      string
	heldout     bool
}

func readMix(t *testing.T, r *testRun, rec *pipeline.RunRecord, stage string) []mixRow {
	var rows []mixRow
	forEach(t, r.table(rec, stage), func(b arrow.RecordBatch) {
		ids, labels := b.Column(0).(*array.List), b.Column(1).(*array.List)
		src, held := b.Column(2).(*array.String), b.Column(3).(*array.Boolean)
		for i := 0; i < int(b.NumRows()); i++ {
			rows = append(rows, mixRow{dataset.Int32Row(ids, i), dataset.Int32Row(labels, i), src.Value(i), held.Value(i)})
		}
	})
	return rows
}

// packedExamples splits packed rows into their examples' ids.
func packedExamples(t *testing.T, path string) [][]int32 {
	rd, err := dataset.OpenIPC(path)
	if err != nil {
		t.Fatal(err)
	}
	var out [][]int32
	forEach(t, rd, func(b arrow.RecordBatch) {
		ids, lens := b.Column(0).(*array.List), b.Column(3).(*array.List)
		for i := 0; i < int(b.NumRows()); i++ {
			id, ls := dataset.Int32Row(ids, i), dataset.Int32Row(lens, i)
			at := 0
			for _, n := range ls {
				out = append(out, id[at:at+int(n)])
				at += int(n)
			}
		}
	})
	return out
}

func stageStats(t *testing.T, rec *pipeline.RunRecord, name string) map[string]any {
	for _, s := range rec.Stages {
		if s.Name == name {
			// Through JSON, as a manifest holds them.
			b, _ := json.Marshal(s.Stats)
			var m map[string]any
			json.Unmarshal(b, &m)
			return m
		}
	}
	t.Fatalf("no stage %s", name)
	return nil
}

func stageDir(t *testing.T, r *testRun, rec *pipeline.RunRecord, name string) string {
	for _, s := range rec.Stages {
		if s.Name == name {
			return r.store.EntryDir(s.Key)
		}
	}
	t.Fatalf("no stage %s", name)
	return ""
}

// mixSpec mixes the demo's Alpaca records, its conversations and plain
// texts (the records' outputs) with the given mix parameters.
func mixSpec(t *testing.T, mix string) string {
	tok := testenv.GemmaFile(t, "tokenizer.json")
	return fmt.Sprintf(`name: mix
stages:
  alpaca: {kind: jsonl, with: {paths: [%[1]s]}}
  achat: {kind: chat_template, needs: [alpaca]}
  atok: {kind: tokenize, needs: [achat], with: {tokenizer: %[4]s}}
  conv: {kind: jsonl, with: {paths: [%[2]s], format: sharegpt}}
  cchat: {kind: chat_template, needs: [conv]}
  ctok: {kind: tokenize, needs: [cchat], with: {tokenizer: %[4]s}}
  texts: {kind: text, with: {paths: [%[3]s], column: output}}
  ttok: {kind: tokenize, needs: [texts], with: {tokenizer: %[4]s, eos: true}}
  mix: {kind: mix, needs: [atok, ctok, ttok], with: %[5]s}
  pack: {kind: pack, needs: [mix], with: {seq_len: 1024}}
`, demoFile(t, "alpaca-tr-demo.jsonl"), demoFile(t, "conversations-tr-demo.jsonl"), demoFile(t, "alpaca-tr-heldout.jsonl"), tok, mix)
}

// TestMixStage: weights by examples and by tokens, per-source counts in
// the manifest, the same mix from the same seed, and held-out examples
// that never enter a training row but are packed apart, all of them.
func TestMixStage(t *testing.T) {
	r := newTestRun(t)
	var logs bytes.Buffer
	r.log = slog.New(slog.NewTextHandler(&logs, nil))
	rec, err := r.run(r.spec(mixSpec(t, `{weights: {atok: 2, ctok: 1, ttok: 1}, heldout: 0.1, seed: 3}`)), pipeline.Options{})
	if err != nil {
		t.Fatal(err)
	}
	// Most of atok and ctok goes unused, and more is held out than trains:
	// both are said.
	for _, want := range []string{"the mix takes 22 of the 116 examples of atok", "the mix takes 11 of the 50 examples of ctok"} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("the log does not say %q:\n%s", want, logs.String())
		}
	}
	if strings.Contains(logs.String(), "examples of ttok") || strings.Contains(logs.String(), "held out and") {
		t.Errorf("ttok, wholly used, or the held-out share is warned of:\n%s", logs.String())
	}
	logs.Reset()
	if _, err := r.run(r.spec(mixSpec(t, `{weights: {atok: 1, ctok: 1, ttok: 6}, heldout: 0.4}`)), pipeline.Options{}); err != nil {
		t.Fatal(err)
	}
	if !regexp.MustCompile(`\d+ examples \(\d+ tokens\) are held out and \d+ \(\d+ tokens\) train`).MatchString(logs.String()) {
		t.Errorf("more held out than trained on, not said:\n%s", logs.String())
	}
	if strings.Contains(logs.String(), "repeats each example") {
		t.Errorf("a mix that repeats nothing warned of repeats:\n%s", logs.String())
	}
	// A total far past the sources: as many epochs over them.
	logs.Reset()
	if _, err := r.run(r.spec(mixSpec(t, `{weights: {atok: 1, ctok: 1, ttok: 1}, total: 3000}`)), pipeline.Options{}); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(logs.String(), "the mix repeats each example of ttok about") {
		t.Errorf("a total that repeats ttok many times, not said:\n%s", logs.String())
	}
	r.log = nil
	rows := readMix(t, r, rec, "mix")
	st := stageStats(t, rec, "mix")
	sources := st["sources"].(map[string]any)
	perSource := map[string][2]int{} // training, held out
	for _, row := range rows {
		c := perSource[row.source]
		if row.heldout {
			c[1]++
		} else {
			c[0]++
		}
		perSource[row.source] = c
	}
	avail := map[string]int{"atok": 129, "ctok": 56, "ttok": 12}
	for name, c := range perSource {
		s := sources[name].(map[string]any)
		if s["examples"].(float64) != float64(c[0]) || s["heldout"].(float64) != float64(c[1]) || s["available"].(float64) != float64(avail[name]) {
			t.Errorf("%s: statistics %v, table %d training and %d held out of %d", name, s, c[0], c[1], avail[name])
		}
		if want := int(math.Max(1, math.Round(0.1*float64(avail[name])))); c[1] != want {
			t.Errorf("%s: %d held out, want %d", name, c[1], want)
		}
	}
	// ttok has 11 texts left to train on at weight 1 of 4: 44 in all, no
	// repeats: atok 22, ctok 11, ttok 11.
	if perSource["atok"][0] != 22 || perSource["ctok"][0] != 11 || perSource["ttok"][0] != 11 {
		t.Errorf("by examples: %v, want 22, 11, 11", perSource)
	}
	t.Logf("mix statistics: %v", st)
	for _, stage := range []string{"mix", "pack"} {
		if _, err := pipeline.ReadManifest(stageDir(t, r, rec, stage)); err != nil {
			t.Errorf("the %s stage's manifest does not read back: %v", stage, err)
		}
	}

	// Held-out examples: never in a training row, all in the held-out rows.
	key := func(ids []int32) string { return fmt.Sprint(ids) }
	held, train := map[string]int{}, map[string]bool{}
	for _, row := range rows {
		if row.heldout {
			held[key(row.ids)]++
		} else {
			train[key(row.ids)] = true
		}
	}
	for k := range held {
		if train[k] {
			t.Fatal("an example is both held out and trained on")
		}
	}
	dir := stageDir(t, r, rec, "pack")
	for _, ex := range packedExamples(t, filepath.Join(dir, pipeline.TableFile)) {
		if held[key(ex)] > 0 {
			t.Fatal("a held-out example is in a training row")
		}
		if !train[key(ex)] {
			t.Fatal("a training row holds an example the mix did not take")
		}
	}
	got := map[string]int{}
	for _, ex := range packedExamples(t, filepath.Join(dir, PackedHeldOutFile)) {
		got[key(ex)]++
	}
	if fmt.Sprint(got) != fmt.Sprint(held) {
		t.Errorf("held-out rows hold %d examples, want the %d held out", len(got), len(held))
	}
	if ps := stageStats(t, rec, "pack"); ps["heldout"].(map[string]any)["examples"].(float64) != float64(len(rows)-44) {
		t.Errorf("pack statistics %v", ps)
	}

	// The same seed in another cache: the same table; another seed: not.
	digest := func(seed int) string {
		r2 := newTestRun(t)
		rec, err := r2.run(r2.spec(mixSpec(t, fmt.Sprintf(`{weights: {atok: 2, ctok: 1, ttok: 1}, heldout: 0.1, seed: %d}`, seed))), pipeline.Options{})
		if err != nil {
			t.Fatal(err)
		}
		return fmt.Sprint(readMix(t, r2, rec, "mix"))
	}
	if digest(3) != fmt.Sprint(rows) {
		t.Error("the same seed made another mix")
	}
	if digest(4) == fmt.Sprint(rows) {
		t.Error("another seed made the same mix")
	}

	// By tokens, with a total beyond the data: shares of tokens, repeats.
	rec, err = r.run(r.spec(mixSpec(t, `{weights: {atok: 1, ctok: 2, ttok: 1}, by: tokens, total: 60000}`)), pipeline.Options{})
	if err != nil {
		t.Fatal(err)
	}
	st = stageStats(t, rec, "mix")
	sources = st["sources"].(map[string]any)
	var sum float64
	for name, w := range map[string]float64{"atok": 1, "ctok": 2, "ttok": 1} {
		s := sources[name].(map[string]any)
		tokens := s["tokens"].(float64)
		sum += tokens
		if math.Abs(tokens-60000*w/4) > 700 { // within one example
			t.Errorf("by tokens: %s has %v tokens, want about %v", name, tokens, 60000*w/4)
		}
		if s["examples"].(float64) <= s["unique"].(float64) && name == "ttok" {
			t.Errorf("by tokens: %s is not repeated: %v", name, s)
		}
	}
	if sum < 60000 || st["tokens"].(float64) != sum {
		t.Errorf("by tokens: %v tokens in all, statistics %v", sum, st["tokens"])
	}
	t.Logf("by tokens: %v", sources)
	// The pack stage plans each copy in rows apart (packer's
	// TestCopiesPackedApart), and counts the copies.
	var copies float64
	for _, s := range sources {
		copies += s.(map[string]any)["examples"].(float64) - s.(map[string]any)["unique"].(float64)
	}
	if got := stageStats(t, rec, "pack")["repeated"]; copies <= 0 || got != copies {
		t.Errorf("pack counts %v repeated examples, the mix made %v copies", got, copies)
	}

	// eval_fraction on rows that repeat examples would score the adapter
	// on examples it trains on: refused before training.
	spec := mixSpec(t, `{weights: {atok: 1, ctok: 2, ttok: 1}, by: tokens, total: 60000}`) + `  base: {kind: model, with: {preset: tiny}}
  adapter: {kind: qlora, needs: [pack, base], with: {eval_fraction: 0.1, max_steps: 1, backend: cpu}}
`
	if _, err := r.run(r.spec(spec), pipeline.Options{}); err == nil || !strings.Contains(err.Error(), "so the rows eval_fraction holds out share examples with the rows trained on") {
		t.Errorf("eval_fraction over repeated examples: %v", err)
	}
}

// TestMixErrors: wiring and parameters a mix cannot work with.
func TestMixErrors(t *testing.T) {
	r := newTestRun(t)
	for _, c := range []struct{ mix, want string }{
		{`{weights: {atok: 1, ctok: 1}}`, `no weight for "ttok"`},
		{`{weights: {atok: 1, ctok: 1, ttok: 1, other: 1}}`, `"other" is not in needs`},
		{`{weights: {atok: 1, ctok: 0, ttok: 1}}`, "must be positive"},
		{`{total: 100}`, "without weights every example is taken once"},
		{`{heldout: 1}`, "must be in [0, 1)"},
		{`{by: bytes}`, `unknown "bytes"`},
	} {
		_, err := r.run(r.spec(mixSpec(t, c.mix)), pipeline.Options{})
		if err == nil || !pipeline.IsSpecError(err) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v", c.mix, err)
		}
	}
	spec := strings.Replace(mixSpec(t, "{}"), "needs: [atok, ctok, ttok]", "needs: [atok, cchat]", 1)
	if _, err := r.run(r.spec(spec), pipeline.Options{}); err == nil || !strings.Contains(err.Error(), `"cchat" is a chat_template stage, but a mix stage reads the tokens of a tokenize stage`) {
		t.Errorf("a chat stage in needs: %v", err)
	}
	// Two tokenizers cannot mix.
	tok := testenv.GemmaFile(t, "tokenizer.json")
	data, err := os.ReadFile(tok)
	if err != nil {
		t.Fatal(err)
	}
	other := filepath.Join(r.dir, "other-tokenizer.json")
	os.WriteFile(other, append(data, '\n'), 0o644)
	spec = strings.Replace(mixSpec(t, "{}"), "ttok: {kind: tokenize, needs: [texts], with: {tokenizer: "+tok, "ttok: {kind: tokenize, needs: [texts], with: {tokenizer: "+other, 1)
	if _, err := r.run(r.spec(spec), pipeline.Options{}); err == nil || !strings.Contains(err.Error(), "different tokenizers") {
		t.Errorf("two tokenizers: %v", err)
	}
}

// TestMixHeldOutTrainsAndEvaluates: a qlora stage over the packed mix
// computes its eval loss on the held-out examples (packed apart), and an
// eval stage reading the mix scores the same examples: with the adapter
// on the NF4 base, as trained, the two losses agree. eval_fraction beside
// such a split is refused.
func TestMixHeldOutTrainsAndEvaluates(t *testing.T) {
	base := mixSpec(t, `{weights: {atok: 2, ctok: 1, ttok: 1}, heldout: 0.1, seed: 3}`) + `  base: {kind: model, with: {preset: tiny, seed: 7, std: 0.3}}
  adapter:
    kind: qlora
    needs: [pack, base]
    with: {r: 4, alpha: 8, batch_size: 1, grad_accum: 2, lr: 1.0e-2, schedule: constant,
           max_steps: 2, eval_every: 1, log_every: 1, backend: cpu%s}
  eval:
    kind: eval
    needs: [adapter, base, mix]
    with: {tasks: [loss]}
`
	r := newTestRun(t)
	rec, err := r.run(r.spec(fmt.Sprintf(base, "")), pipeline.Options{})
	if err != nil {
		t.Fatal(err)
	}
	q := stageStats(t, rec, "adapter")
	if q["eval_rows"] == nil || q["eval_loss"] == nil {
		t.Fatalf("qlora statistics %v lack eval_rows and eval_loss", q)
	}
	res, _ := readEvalResults(t, stageDir(t, r, rec, "eval"))
	if res.Loss.Records != 20 {
		t.Errorf("eval scored %d records, want the 20 held out", res.Loss.Records)
	}
	trained := q["eval_loss"].(float64)
	scored := res.Loss.Scores["adapter"].Loss
	if math.Abs(trained-scored) > 1e-4*math.Abs(scored) {
		t.Errorf("the trainer's eval loss %v, the eval stage's %v on the same held-out examples", trained, scored)
	}
	t.Logf("held-out loss: trainer %v, eval stage %v (base %v), %d eval rows", trained, scored, res.Loss.Scores["base"].Loss, int(q["eval_rows"].(float64)))

	_, err = r.run(r.spec(fmt.Sprintf(base, ", eval_fraction: 0.1")), pipeline.Options{})
	if err == nil || !pipeline.IsSpecError(err) || !strings.Contains(err.Error(), "eval_fraction: holds training rows out, and mix stage") {
		t.Errorf("eval_fraction with held-out examples: %v", err)
	}
}

func readEvalResults(t *testing.T, entry string) (evalResultsFile, error) {
	var res evalResultsFile
	data, err := os.ReadFile(filepath.Join(entry, EvalResultsFile))
	if err != nil {
		t.Fatal(err)
	}
	return res, json.Unmarshal(data, &res)
}

// TestMixHeldOutDuplicates: held-out examples whose tokens also train
// (duplicate records) are counted and warned of; without duplicates, none.
func TestMixHeldOutDuplicates(t *testing.T) {
	r := newTestRun(t)
	var logs bytes.Buffer
	r.log = slog.New(slog.NewTextHandler(&logs, nil))
	var lines []string
	for i := range 10 {
		lines = append(lines, fmt.Sprintf(`{"instruction": "Soru %d?", "input": "", "output": "Cevap %d."}`, i, i))
	}
	for name, data := range map[string]string{"dup": strings.Join(append(lines, lines...), "\n"), "uniq": strings.Join(lines, "\n")} {
		path := filepath.Join(r.dir, name+".jsonl")
		os.WriteFile(path, []byte(data+"\n"), 0o644)
		logs.Reset()
		rec, err := r.run(r.spec(fmt.Sprintf(`name: %s
stages:
  src: {kind: jsonl, with: {paths: [%s]}}
  chat: {kind: chat_template, needs: [src]}
  tok: {kind: tokenize, needs: [chat], with: {tokenizer: %s}}
  mix: {kind: mix, needs: [tok], with: {heldout: 0.3, seed: 1}}
`, name, path, testenv.GemmaFile(t, "tokenizer.json"))), pipeline.Options{})
		if err != nil {
			t.Fatal(err)
		}
		n := stageStats(t, rec, "mix")["heldout_also_trained"]
		warned := strings.Contains(logs.String(), "held-out examples also train")
		if name == "dup" && (n == 0.0 || !warned) || name == "uniq" && (n != 0.0 || warned) {
			t.Errorf("%s: heldout_also_trained %v, warned %v\n%s", name, n, warned, logs.String())
		}
	}
}
