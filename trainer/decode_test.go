package trainer

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"sort"
	"testing"
)

// decodeModel is a random tiny model whose sliding window (3) is shorter
// than the prompts, so that the decoder's trimmed caches are exercised.
func decodeModel(t *testing.T) (*Model, *Adapter) {
	t.Helper()
	c := tinyConfig()
	m := tinyModel(t, c)
	a, err := NewAdapter(c, LoRAConfig{R: 4, Alpha: 8, Targets: AllModules}, 3)
	if err != nil {
		t.Fatal(err)
	}
	randomizeB(a, 4)
	return m, a
}

func prompts(vocab int, lens ...int) [][]int32 {
	rng := rand.New(rand.NewPCG(9, 9))
	var out [][]int32
	for _, n := range lens {
		p := []int32{2}
		for len(p) < n {
			p = append(p, int32(rng.IntN(vocab)))
		}
		out = append(out, p)
	}
	return out
}

// TestGreedyDecodingMatchesRecomputation: decoding with the KV cache, a
// batch of prompts of different lengths at once, gives each prompt the
// tokens that re-running the whole sequence through the model and taking
// the argmax of the last position gives, with and without an adapter.
func TestGreedyDecodingMatchesRecomputation(t *testing.T) {
	m, a := decodeModel(t)
	ps := prompts(m.Config.VocabSize, 1, 5, 11)
	for _, ad := range []*Adapter{nil, a} {
		t.Run(fmt.Sprintf("adapter=%v", ad != nil), func(t *testing.T) {
			got, err := m.Generate(context.Background(), ad, ps, GenerateOptions{MaxNewTokens: 12}, nil)
			if err != nil {
				t.Fatal(err)
			}
			for i, p := range ps {
				seq := append([]int32(nil), p...)
				var want []int32
				for len(want) < 12 {
					b, err := NewBatch([]PackedRow{{InputIDs: seq, Labels: seq, SeqLengths: []int32{int32(len(seq))}}})
					if err != nil {
						t.Fatal(err)
					}
					logits, err := m.Logits(ad, b)
					if err != nil {
						t.Fatal(err)
					}
					v := m.Config.VocabSize
					next := int32(Argmax(logits[(len(seq)-1)*v:]))
					want, seq = append(want, next), append(seq, next)
				}
				if fmt.Sprint(got[i]) != fmt.Sprint(want) {
					t.Errorf("prompt %d (%d tokens): decoded %v, recomputed %v", i, len(p), got[i], want)
				}
			}
		})
	}
}

// TestDecodingStopsAndSamples: a stop token ends a sequence (and is
// kept), other sequences go on; sampling is reproducible per seed and
// per sequence, whatever else is in the batch; top-k 1 is greedy.
func TestDecodingStopsAndSamples(t *testing.T) {
	m, a := decodeModel(t)
	ps := prompts(m.Config.VocabSize, 4, 7)
	ctx := context.Background()
	greedy, err := m.Generate(ctx, a, ps, GenerateOptions{MaxNewTokens: 8}, nil)
	if err != nil {
		t.Fatal(err)
	}
	stop := greedy[0][2]
	got, err := m.Generate(ctx, a, ps, GenerateOptions{MaxNewTokens: 8, Stop: []int32{stop}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if n := len(got[0]); n > 3 || got[0][n-1] != stop {
		t.Errorf("sequence 0 did not stop at %d: %v (greedy %v)", stop, got[0], greedy[0])
	}
	sample := GenerateOptions{MaxNewTokens: 8, Temperature: 0.9, TopK: 20, TopP: 0.9, Seed: 11}
	s1, _ := m.Generate(ctx, a, ps, sample, nil)
	s2, _ := m.Generate(ctx, a, ps, sample, nil)
	alone, _ := m.Generate(ctx, a, ps[:1], sample, nil)
	if fmt.Sprint(s1) != fmt.Sprint(s2) || fmt.Sprint(s1[0]) != fmt.Sprint(alone[0]) {
		t.Errorf("sampling not reproducible: %v, %v, alone %v", s1, s2, alone)
	}
	other := sample
	other.Seed = 12
	if s3, _ := m.Generate(ctx, a, ps, other, nil); fmt.Sprint(s3) == fmt.Sprint(s1) {
		t.Error("another seed drew the same tokens")
	}
	k1 := sample
	k1.TopK = 1
	if g, _ := m.Generate(ctx, a, ps, k1, nil); fmt.Sprint(g) != fmt.Sprint(greedy) {
		t.Errorf("top_k 1 gave %v, greedy %v", g, greedy)
	}
	var emitted []int32
	m.Generate(ctx, a, ps[:1], GenerateOptions{MaxNewTokens: 5}, func(_ int, tok int32) { emitted = append(emitted, tok) })
	if fmt.Sprint(emitted) != fmt.Sprint(greedy[0][:5]) {
		t.Errorf("emitted %v, want %v", emitted, greedy[0][:5])
	}
	for _, bad := range []GenerateOptions{{}, {MaxNewTokens: 1, Temperature: -1}, {MaxNewTokens: 1, TopP: 2}} {
		if _, err := m.Generate(ctx, a, ps, bad, nil); err == nil {
			t.Errorf("%+v accepted", bad)
		}
	}
}

// likelierOrder returns every token id of logits in the order a draw
// from all of them takes (fullDraw.order's ids).
func likelierOrder(logits []float32) []int32 {
	pairs := new(fullDraw).order(logits)
	order := make([]int32, len(pairs))
	for i, x := range pairs {
		order[i] = int32(uint32(x))
	}
	return order
}

// pickBySorting is pick as first written: a stable sort of the whole
// vocabulary for every draw, and drawAll. pick must draw exactly the same
// tokens.
func pickBySorting(logits []float32, o GenerateOptions, rng *rand.Rand) int32 {
	idx := make([]int, len(logits))
	for i := range idx {
		idx[i] = i
	}
	sort.SliceStable(idx, func(a, b int) bool { return logits[idx[a]] > logits[idx[b]] })
	if o.TopK > 0 && o.TopK < len(idx) {
		idx = idx[:o.TopK]
	}
	vals := make([]float32, len(idx))
	for i, id := range idx {
		vals[i] = logits[id]
	}
	return int32(idx[drawAll(vals, o, rng)])
}

// drawAll is draw as first written: every weight's exponential, then the
// sums over all of them.
func drawAll(vals []float32, o GenerateOptions, rng *rand.Rand) int {
	p := make([]float64, len(vals))
	top := float64(vals[0]) / o.Temperature
	var sum float64
	for i, v := range vals {
		p[i] = math.Exp(float64(v)/o.Temperature - top)
		sum += p[i]
	}
	if o.TopP > 0 && o.TopP < 1 {
		var cum float64
		for i := range p {
			cum += p[i] / sum
			if cum >= o.TopP {
				p = p[:i+1]
				break
			}
		}
		sum = 0
		for _, v := range p {
			sum += v
		}
	}
	u := rng.Float64() * sum
	for i, v := range p {
		if u < v {
			return i
		}
		u -= v
	}
	return len(p) - 1
}

// tiedLogits is a row of 1 to 3,000 logits of few distinct values, so that
// ties are everywhere: negative and positive, zeros of both signs, and in
// every third row values far apart, so that most weights leave draw's sum
// unchanged.
func tiedLogits(rng *rand.Rand) []float32 {
	logits := make([]float32, 1+rng.IntN(3000))
	spread := float32(1)
	if rng.IntN(3) == 0 {
		spread = 40
	}
	for i := range logits {
		logits[i] = spread * float32(rng.IntN(12)-6) / 3
		if logits[i] == 0 && rng.IntN(2) == 0 {
			logits[i] = float32(math.Copysign(0, -1))
		}
	}
	return logits
}

// TestDrawSumsAllWeights: the sum of a draw's weights that stops at the
// first weight leaving it unchanged is, bit for bit, the sum of every
// weight in the same order.
// canceledAfter is a context that reports itself canceled from its n-th
// Err on: it cancels at a chosen point of a computation, without timing.
type canceledAfter struct {
	context.Context
	n     int
	calls int
}

func (c *canceledAfter) Err() error {
	if c.calls++; c.calls >= c.n {
		return context.Canceled
	}
	return nil
}

// TestDecodingStopsWithinAStep: a context canceled while a step runs (a
// long prompt) stops the step itself, not only the loop after it: no
// token comes, and the error is the context's.
func TestDecodingStopsWithinAStep(t *testing.T) {
	m, a := decodeModel(t)
	ps := prompts(m.Config.VocabSize, 40, 33)
	ctx := &canceledAfter{Context: context.Background(), n: 2} // the loop's first check passes
	var emitted int
	_, err := m.Generate(ctx, a, ps, GenerateOptions{MaxNewTokens: 4}, func(int, int32) { emitted++ })
	if !errors.Is(err, context.Canceled) || emitted != 0 {
		t.Errorf("canceled in the first step: %v, %d tokens", err, emitted)
	}
}

func TestDrawSumsAllWeights(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	stopped := 0
	for trial := range 302 {
		logits := tiedLogits(rng)
		if trial >= 300 { // Gemma's vocabulary: weights computed in spans on several cores
			logits = make([]float32, 262144)
			for i := range logits {
				logits[i] = float32(rng.NormFloat64() * 2)
			}
		}
		order := likelierOrder(logits)
		vals := make([]float32, len(order))
		for i, id := range order {
			vals[i] = logits[id]
		}
		temperature := []float64{0.3, 0.7, 1, 2}[trial%4]
		w := weights{vals: vals, temperature: temperature, top: float64(vals[0]) / temperature}
		var want float64
		still := false // a weight after one that left the sum unchanged
		for i, v := range vals {
			e := math.Exp(float64(v)/temperature - float64(vals[0])/temperature)
			still = still || want+e == want && i < len(vals)-1
			want += e
		}
		if got := w.sum(len(vals)); got != want {
			t.Fatalf("trial %d (%d logits, temperature %v): sum %v, every weight's %v", trial, len(vals), temperature, got, want)
		}
		if still {
			stopped++
		}
	}
	if stopped == 0 {
		t.Error("no sum stopped before the last weight: the test does not reach what it checks")
	}
}

// TestLikelierOrder: the radix sort orders every token as a stable sort by
// descending logit does, ties, signed zeros and all, at Gemma's vocabulary.
func TestLikelierOrder(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	for trial := range 20 {
		var logits []float32
		if trial%2 == 0 {
			logits = tiedLogits(rng)
		} else {
			logits = make([]float32, 262144)
			for i := range logits {
				logits[i] = float32(rng.NormFloat64() * 4)
				if rng.IntN(50) == 0 {
					logits[i] = float32(rng.IntN(5) - 2) // ties among the normal values
				}
			}
		}
		want := make([]int32, len(logits))
		for i := range want {
			want[i] = int32(i)
		}
		sort.SliceStable(want, func(a, b int) bool { return logits[want[a]] > logits[want[b]] })
		if got := likelierOrder(logits); !slices.Equal(got, want) {
			t.Fatalf("trial %d (%d logits): the radix order differs from a stable sort's", trial, len(logits))
		}
	}
}

// TestPickDrawsAsSortingDid: selecting the top k with a heap and sorting
// with ties broken by id draws the very tokens a stable sort of the whole
// vocabulary drew, ties and all.
func TestPickDrawsAsSortingDid(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for trial := range 40 {
		logits := tiedLogits(rng)
		n := len(logits)
		o := GenerateOptions{MaxNewTokens: 1, Temperature: []float64{0.3, 1, 2}[trial%3],
			TopK: []int{0, 1, 5, 64, n, n + 3}[trial%6], TopP: []float64{0, 0.5, 0.95, 1}[trial%4]}
		a, b := rand.New(rand.NewPCG(uint64(trial), 0)), rand.New(rand.NewPCG(uint64(trial), 0))
		for draw := range 50 {
			if got, want := pick(logits, o, a), pickBySorting(logits, o, b); got != want {
				t.Fatalf("trial %d (n %d, %+v) draw %d: %d, sorting drew %d", trial, n, o, draw, got, want)
			}
		}
	}
	// At Gemma's vocabulary, where the weights are computed in spans on
	// several cores.
	logits := make([]float32, 262144)
	for i := range logits {
		logits[i] = float32(rng.NormFloat64() * 3)
		if rng.IntN(50) == 0 {
			logits[i] = float32(rng.IntN(5) - 2)
		}
	}
	for i, o := range []GenerateOptions{{Temperature: 0.7}, {Temperature: 1, TopP: 0.95}, {Temperature: 2, TopP: 0.5}} {
		o.MaxNewTokens = 1
		a, b := rand.New(rand.NewPCG(uint64(i), 9)), rand.New(rand.NewPCG(uint64(i), 9))
		for draw := range 4 {
			if got, want := pick(logits, o, a), pickBySorting(logits, o, b); got != want {
				t.Fatalf("262,144 logits, %+v, draw %d: %d, sorting drew %d", o, draw, got, want)
			}
		}
	}
}

// TestStreamsNameTheDraws: a sequence given stream s draws what the
// sequence at place s of a batch draws, so a caller can keep a prompt's
// draws whatever batch it decodes it in.
func TestStreamsNameTheDraws(t *testing.T) {
	m, a := decodeModel(t)
	ps := prompts(m.Config.VocabSize, 4, 7, 9)
	o := GenerateOptions{MaxNewTokens: 8, Temperature: 1.5, TopK: 20, Seed: 3}
	all, err := m.Generate(context.Background(), a, ps, o, nil)
	if err != nil {
		t.Fatal(err)
	}
	o.Streams = []uint64{2}
	one, err := m.Generate(context.Background(), a, ps[2:], o, nil)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(one[0]) != fmt.Sprint(all[2]) {
		t.Errorf("stream 2 alone drew %v, third in the batch %v", one[0], all[2])
	}
	o.Streams = []uint64{0, 1}
	if _, err := m.Generate(context.Background(), a, ps, o, nil); err == nil {
		t.Error("two streams for three prompts were taken")
	}
}

// TestCandidatesDrawAsLogitsDo: a draw among candidates that hold the top
// k (in any order, with other tokens beside them, as a device hands them
// over) is the draw pick makes from the whole vocabulary, ties and all.
func TestCandidatesDrawAsLogitsDo(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for trial := range 60 {
		logits := tiedLogits(rng)
		n := len(logits)
		k := []int{1, 2, 5, 64, n, n + 3}[trial%6]
		o := GenerateOptions{MaxNewTokens: 1, Temperature: []float64{0.3, 1, 2}[trial%3], TopK: k, TopP: []float64{0, 0.5, 0.95, 1}[trial%4]}
		// The top k by pick's order, then some others, shuffled.
		top := likeliestK(logits, min(k, n))
		in := map[int]bool{}
		for _, id := range top {
			in[id] = true
		}
		for range rng.IntN(20) {
			in[rng.IntN(n)] = true
		}
		var c Candidates
		for id := range in {
			c.IDs, c.Logits = append(c.IDs, int32(id)), append(c.Logits, logits[id])
		}
		rng.Shuffle(len(c.IDs), func(i, j int) {
			c.IDs[i], c.IDs[j] = c.IDs[j], c.IDs[i]
			c.Logits[i], c.Logits[j] = c.Logits[j], c.Logits[i]
		})
		a, b := rand.New(rand.NewPCG(uint64(trial), 1)), rand.New(rand.NewPCG(uint64(trial), 1))
		for d := range 50 {
			if got, want := pickAmong(c, o, a), pick(logits, o, b); got != want {
				t.Fatalf("trial %d (n %d, %+v) draw %d: candidates drew %d, the logits %d", trial, n, o, d, got, want)
			}
		}
	}
}

// BenchmarkPick times one draw from Gemma's vocabulary (262,144 logits of
// a normal spread) as the host makes it for each sequence of a sampling
// step that hands over whole logits.
func BenchmarkPick(b *testing.B) {
	rng := rand.New(rand.NewPCG(1, 2))
	logits := make([]float32, 262144)
	for i := range logits {
		logits[i] = float32(rng.NormFloat64() * 3)
	}
	for _, o := range []GenerateOptions{
		{Temperature: 0.7}, {Temperature: 0.7, TopP: 0.95}, {Temperature: 1, TopK: 64, TopP: 0.95},
	} {
		b.Run(fmt.Sprintf("top_k=%d,top_p=%v", o.TopK, o.TopP), func(b *testing.B) {
			for b.Loop() {
				pick(logits, o, rng)
			}
		})
	}
}
