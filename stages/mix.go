package stages

import (
	"context"
	"encoding/binary"
	"fmt"
	"hash/fnv"
	"io"
	"math"
	"math/rand/v2"
	"slices"
	"sort"
	"strings"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/memory"

	"gemmaft/dataset"
	"gemmaft/packer"
	"gemmaft/pipeline"
)

const mixKindName = "mix"

func init() { kinds[mixKindName] = mixKind{} }

// mixKind mixes the tokenized examples of several tokenize stages into one
// training set, in proportions given by example or by token, and holds out
// a share of each input's examples, by example, before anything is mixed:
// a held-out example never enters a training row, however often the mix
// repeats its input. The choice depends on the seed alone.
type mixKind struct{}

type mixParams struct {
	// Weights are the inputs' shares of the training mix, by stage name;
	// without them every input's examples are taken once.
	Weights map[string]float64 `json:"weights,omitempty"`
	// By is what the weights share out: examples or tokens (input tokens,
	// the trained ones and the others).
	By string `json:"by"`
	// Total is the size of the training mix, in examples or tokens (By);
	// 0 takes the largest mix in the weights' proportions that repeats no
	// example. A total beyond what an input holds repeats its examples.
	Total int64 `json:"total"`
	// HeldOut is the share of each input's examples held out of training
	// (at least one an input when positive), for the eval loss of the
	// qlora stage and of eval stages.
	HeldOut float64 `json:"heldout"`
	// Seed draws the held-out examples and the examples taken.
	Seed uint64 `json:"seed"`
}

func (mixKind) Version() int       { return 1 }
func (mixKind) Inputs() (int, int) { return 1, -1 }
func (mixKind) Params() any        { return &mixParams{By: mixByExamples} }

// Revision 1: a total, which may repeat examples, gives the pack stage
// after it copies to plan in rows apart (entries packed before put copies
// side by side in one row).
func (p *mixParams) Revision() int {
	if p.Total > 0 {
		return 1
	}
	return 0
}

// Values of by.
const (
	mixByExamples = "examples"
	mixByTokens   = "tokens"
)

// Columns a mix stage adds to the tokens' (TokensSchema).
const (
	// ColSource is the tokenize stage an example comes from.
	ColSource = "source"
	// ColHeldOut is true for a held-out example, which pack stages keep out
	// of the training rows.
	ColHeldOut = "heldout"
)

// MixSchema is the table a mix stage writes.
var MixSchema = arrow.NewSchema([]arrow.Field{
	{Name: packer.ColInputIDs, Type: arrow.ListOf(arrow.PrimitiveTypes.Int32)},
	{Name: packer.ColLabels, Type: arrow.ListOf(arrow.PrimitiveTypes.Int32)},
	{Name: ColSource, Type: arrow.BinaryTypes.String},
	{Name: ColHeldOut, Type: arrow.FixedWidthTypes.Boolean},
}, nil)

func (p *mixParams) Validate() error {
	bad := func(param, msg, fix string) error { return &pipeline.ParamError{Param: param, Msg: msg, Fix: fix} }
	if p.By != mixByExamples && p.By != mixByTokens {
		return bad("by", fmt.Sprintf("unknown %q", p.By), "use examples or tokens")
	}
	for name, w := range p.Weights {
		if !(w > 0) || math.IsInf(w, 0) {
			return bad("weights", fmt.Sprintf("%s: %v must be positive", name, w), "give each input a positive share, e.g. weights: {chat: 3, text: 1}")
		}
	}
	switch {
	case p.Total < 0:
		return bad("total", fmt.Sprintf("%d must not be negative", p.Total), "0 takes the largest mix that repeats no example")
	case p.Total > 0 && len(p.Weights) == 0:
		return bad("total", "without weights every example is taken once", "give weights, or remove total")
	case !(p.HeldOut >= 0 && p.HeldOut < 1):
		return bad("heldout", fmt.Sprintf("%v must be in [0, 1)", p.HeldOut), "hold out a small share, e.g. 0.05; 0 holds out nothing")
	}
	if len(p.Weights) == 0 {
		p.Weights = nil
	}
	return nil
}

// CheckInputs: a mix stage reads tokenize stages, and weights name each
// of them.
func (mixKind) CheckInputs(params any, needs []pipeline.Need) error {
	if err := readsKinds(mixKindName, "the tokens", needs, tokenizeKindName); err != nil {
		return err
	}
	p := params.(*mixParams)
	if len(p.Weights) == 0 {
		return nil
	}
	var names []string
	for _, n := range needs {
		names = append(names, n.Stage)
		if _, ok := p.Weights[n.Stage]; !ok {
			return &pipeline.ParamError{Param: "weights", Msg: fmt.Sprintf("no weight for %q", n.Stage),
				Fix: "give every stage in needs a weight, e.g. weights: {" + strings.Join(names, ": 1, ") + ": 1}"}
		}
	}
	for name := range p.Weights {
		if !slices.Contains(names, name) {
			return &pipeline.ParamError{Param: "weights", Msg: fmt.Sprintf("%q is not in needs", name),
				Fix: "weights name the tokenize stages in needs: " + strings.Join(names, ", ")}
		}
	}
	return nil
}

func (mixKind) Prepare(params any, _ string) (pipeline.Runner, error) {
	return &mixStage{p: params.(*mixParams)}, nil
}

type mixStage struct{ p *mixParams }

func (*mixStage) Files() []string { return nil }

// mixSource is one input's examples as the mix sees them.
type mixSource struct {
	name    string
	lens    []int32 // each example's tokens
	heldout []bool
	count   []int32 // how many times the mix takes each example
	weight  float64
}

// MixCounts are a mix stage's statistics for one input.
type MixCounts struct {
	// Available is the input's examples; HeldOut of them are held out.
	Available int64 `json:"available"`
	HeldOut   int64 `json:"heldout"`
	// Examples and Tokens are what the training mix took (repeats
	// counted), Unique the distinct examples among them, TrainedTokens the
	// tokens with labels.
	Examples      int64 `json:"examples"`
	Unique        int64 `json:"unique"`
	Tokens        int64 `json:"tokens"`
	TrainedTokens int64 `json:"trained_tokens"`
	// HeldOutTokens are the held-out examples' tokens.
	HeldOutTokens int64 `json:"heldout_tokens"`
	// Share is the input's share of the mix's examples or tokens (by).
	Share float64 `json:"share"`
}

func (s *mixStage) Run(ctx context.Context, t *pipeline.Task) error {
	// Pass 1: every input's example lengths, as the inputs stream in.
	srcs := make([]*mixSource, len(t.Inputs))
	for i, in := range t.Inputs {
		src := &mixSource{name: in.Name, weight: 1}
		if s.p.Weights != nil {
			src.weight = s.p.Weights[in.Name]
		}
		err := eachBatch(ctx, in, func(rec arrow.RecordBatch) error {
			ids, err := int32Lists(in, rec, packer.ColInputIDs, tokenizeKindName)
			if err != nil {
				return err
			}
			for r := 0; r < int(rec.NumRows()); r++ {
				a, b := ids.ValueOffsets(r)
				src.lens = append(src.lens, int32(b-a))
			}
			return nil
		})
		if err != nil {
			return err
		}
		if len(src.lens) == 0 {
			return fmt.Errorf("stage %s has no examples to mix", in.Name)
		}
		srcs[i] = src
	}
	if err := sameTokenizer(ctx, t.Inputs); err != nil {
		return err
	}
	if err := planMix(srcs, s.p); err != nil {
		return err
	}

	// Pass 2: the examples, read again from the inputs' entries, each as
	// often as the plan says.
	out, err := t.Output(MixSchema)
	if err != nil {
		return err
	}
	counts := map[string]*MixCounts{}
	var total MixCounts
	seen := &heldOutSeen{trained: map[uint64]bool{}}
	for i, in := range t.Inputs {
		c, err := writeMixed(ctx, in, srcs[i], out, seen)
		if err != nil {
			return err
		}
		counts[in.Name] = c
		total.Available += c.Available
		total.HeldOut += c.HeldOut
		total.Examples += c.Examples
		total.Unique += c.Unique
		total.Tokens += c.Tokens
		total.TrainedTokens += c.TrainedTokens
		total.HeldOutTokens += c.HeldOutTokens
	}
	for _, c := range counts {
		switch {
		case s.p.By == mixByTokens && total.Tokens > 0:
			c.Share = float64(c.Tokens) / float64(total.Tokens)
		case total.Examples > 0:
			c.Share = float64(c.Examples) / float64(total.Examples)
		}
	}
	if total.Examples == 0 {
		return fmt.Errorf("the mix took no examples: a total of %d %s is too small for the weights", s.p.Total, s.p.By)
	}
	t.SetStat("sources", statMap(counts))
	t.SetStat("examples", total.Examples)
	t.SetStat("tokens", total.Tokens)
	t.SetStat("trained_tokens", total.TrainedTokens)
	t.SetStat("heldout_examples", total.HeldOut)
	t.SetStat("heldout_tokens", total.HeldOutTokens)
	names := make([]string, 0, len(counts))
	for _, in := range t.Inputs {
		c := counts[in.Name]
		names = append(names, fmt.Sprintf("%s %d (%.1f%%, %d held out)", in.Name, c.Examples, 100*c.Share, c.HeldOut))
	}
	t.Log.Info("mixed", "examples", total.Examples, "tokens", total.Tokens, "held_out", total.HeldOut, "by_source", strings.Join(names, ", "))
	warnUnusedMix(t, s.p, counts, total)
	if n := seen.alsoTrained(); n > 0 {
		t.Log.Warn(fmt.Sprintf("%d of the %d held-out examples also train (the same tokens: duplicate records): their eval loss is partly a training loss", n, total.HeldOut),
			"fix", "remove the duplicates from the data")
	}
	if total.HeldOut > 0 {
		t.SetStat("heldout_also_trained", seen.alsoTrained())
	}
	return nil
}

// heldOutSeen collects the held-out examples and the trained ones by the
// hash of their tokens, to find held-out examples that train all the
// same: the data's duplicates, which make the eval loss a training loss.
type heldOutSeen struct {
	held    []uint64
	trained map[uint64]bool
	buf     []byte // an example's tokens as bytes, reused
}

func (h *heldOutSeen) add(ids []int32, heldOut bool) {
	h.buf = h.buf[:0]
	for _, id := range ids {
		h.buf = binary.LittleEndian.AppendUint32(h.buf, uint32(id))
	}
	f := fnv.New64a()
	f.Write(h.buf)
	if heldOut {
		h.held = append(h.held, f.Sum64())
	} else {
		h.trained[f.Sum64()] = true
	}
}

// alsoTrained counts the held-out examples whose tokens also train.
func (h *heldOutSeen) alsoTrained() int {
	n := 0
	for _, x := range h.held {
		if h.trained[x] {
			n++
		}
	}
	return n
}

// warnUnusedMix says when the mix leaves most of a source unused (weights
// without a total take the largest mix that repeats nothing, which the
// smallest source's share bounds) or holds out more than it trains on
// (heldout is a share of each source, not of the mix).
func warnUnusedMix(t *pipeline.Task, p *mixParams, counts map[string]*MixCounts, total MixCounts) {
	for _, in := range t.Inputs {
		c := counts[in.Name]
		if left := c.Available - c.HeldOut; p.Total == 0 && p.Weights != nil && c.Unique < left/2 {
			t.Log.Warn(fmt.Sprintf("the mix takes %d of the %d examples of %s: the weights bound the largest mix that repeats nothing by the smallest source's share", c.Unique, left, in.Name),
				"fix", "set total to repeat the smaller sources and take more of this one")
		}
		if c.Unique > 0 && c.Examples > 10*c.Unique {
			// As many epochs over that source: a model learns it by heart.
			t.Log.Warn(fmt.Sprintf("the mix repeats each example of %s about %.0f times (%d of %d distinct)", in.Name, float64(c.Examples)/float64(c.Unique), c.Examples, c.Unique),
				"fix", "lower total, or lower that source's weight")
		}
	}
	if total.HeldOut > total.Examples || total.HeldOutTokens > total.Tokens {
		t.Log.Warn(fmt.Sprintf("%d examples (%d tokens) are held out and %d (%d tokens) train: heldout is a share of each source's examples, not of the mix", total.HeldOut, total.HeldOutTokens, total.Examples, total.Tokens),
			"fix", "lower heldout, or set total")
	}
}

// sameTokenizer checks that every input was tokenized with the same
// tokenizer (the same file contents, or the same Hub file at the same
// commit): ids of two vocabularies cannot train one model.
func sameTokenizer(ctx context.Context, inputs []*pipeline.Input) error {
	var first, firstName string
	var firstTok any
	for _, in := range inputs {
		m, err := in.Manifest(ctx)
		if err != nil {
			return err
		}
		var sig []string
		for _, f := range m.Files {
			sig = append(sig, f.SHA256)
		}
		for _, r := range m.Refs {
			sig = append(sig, r.Name+"@"+r.Revision)
		}
		s := strings.Join(sig, ",")
		if firstName == "" {
			first, firstName, firstTok = s, in.Name, params(m)["tokenizer"]
			continue
		}
		if s != first {
			return fmt.Errorf("stages %s and %s tokenize with different tokenizers (%v and %v); a mix trains one model, with one vocabulary",
				firstName, in.Name, firstTok, params(m)["tokenizer"])
		}
	}
	return nil
}

// planMix decides, for every input, which examples are held out and how
// many times each of the others is taken.
//
// Each input's examples are put in an order drawn from the seed and the
// input's name (so adding an input changes nothing of another's draw):
// the first HeldOut of them are held out, and the mix takes the rest in
// that order, starting over in a new order each time they run out. By
// examples, an input's share of the total is rounded by largest
// remainder so that the shares add up to the total; by tokens, examples
// are taken until the input's tokens reach its share (overshooting by
// less than one example).
func planMix(srcs []*mixSource, p *mixParams) error {
	pools := make([][]int, len(srcs))
	for i, src := range srcs {
		n := len(src.lens)
		rng := rand.New(rand.NewPCG(p.Seed, nameSeed(src.name)))
		perm := rng.Perm(n)
		h := 0
		if p.HeldOut > 0 {
			h = max(1, int(math.Round(p.HeldOut*float64(n))))
		}
		if h >= n {
			return fmt.Errorf("holding out %d of the %d examples of stage %s (heldout %v) leaves none to train on; lower heldout", h, n, src.name, p.HeldOut)
		}
		src.heldout = make([]bool, n)
		for _, j := range perm[:h] {
			src.heldout[j] = true
		}
		pools[i] = perm[h:]
		src.count = make([]int32, n)
	}
	if p.Weights == nil {
		for _, src := range srcs {
			for j := range src.count {
				if !src.heldout[j] {
					src.count[j] = 1
				}
			}
		}
		return nil
	}
	var wsum float64
	for _, src := range srcs {
		wsum += src.weight
	}
	// avail is what an input holds of the unit shared out.
	avail := make([]float64, len(srcs))
	for i, src := range srcs {
		if p.By == mixByExamples {
			avail[i] = float64(len(pools[i]))
			continue
		}
		for _, j := range pools[i] {
			avail[i] += float64(src.lens[j])
		}
	}
	total := float64(p.Total)
	if p.Total == 0 {
		total = math.Inf(1)
		for i, src := range srcs {
			total = math.Min(total, avail[i]*wsum/src.weight)
		}
		total = math.Floor(total + 1e-9)
	}
	targets := make([]float64, len(srcs))
	for i, src := range srcs {
		targets[i] = total * src.weight / wsum
		if p.Total == 0 {
			targets[i] = math.Min(targets[i], avail[i]) // rounding never repeats
		}
	}
	if p.By == mixByExamples {
		targets = largestRemainder(targets, int64(total))
	}
	for i, src := range srcs {
		take(src, pools[i], targets[i], p)
	}
	return nil
}

// take takes examples of src from pool (in order, then in a new order on
// every further pass) until target examples or tokens are taken.
func take(src *mixSource, pool []int, target float64, p *mixParams) {
	order := pool
	var got float64
	for pass := uint64(1); got < target; pass++ {
		for _, j := range order {
			if got >= target {
				return
			}
			src.count[j]++
			if p.By == mixByExamples {
				got++
			} else {
				got += float64(src.lens[j])
			}
		}
		order = slices.Clone(pool)
		rng := rand.New(rand.NewPCG(p.Seed^pass*0x9e3779b97f4a7c15, nameSeed(src.name)))
		rng.Shuffle(len(order), func(a, b int) { order[a], order[b] = order[b], order[a] })
	}
}

// largestRemainder rounds shares to whole numbers that add up to total:
// each share's floor, and one more for the largest remainders (ties to
// the earlier input).
func largestRemainder(shares []float64, total int64) []float64 {
	out := make([]float64, len(shares))
	var sum int64
	idx := make([]int, len(shares))
	for i, s := range shares {
		out[i] = math.Floor(s)
		sum += int64(out[i])
		idx[i] = i
	}
	sort.SliceStable(idx, func(a, b int) bool { return shares[idx[a]]-out[idx[a]] > shares[idx[b]]-out[idx[b]] })
	for k := 0; sum < total && k < len(idx); k++ {
		out[idx[k]]++
		sum++
	}
	return out
}

// nameSeed is a stream number for an input's draws, from its name.
func nameSeed(name string) uint64 {
	h := fnv.New64a()
	h.Write([]byte(name))
	return h.Sum64()
}

// writeMixed writes one input's examples as its plan says: each held-out
// example once, marked, and every other as many times as it is taken, in
// the input's order.
func writeMixed(ctx context.Context, in *pipeline.Input, src *mixSource, out *pipeline.Output, seen *heldOutSeen) (*MixCounts, error) {
	path, err := in.TablePath(ctx)
	if err != nil {
		return nil, err
	}
	rd, err := dataset.OpenIPC(path)
	if err != nil {
		return nil, err
	}
	defer rd.Close()
	c := &MixCounts{Available: int64(len(src.lens))}
	row := 0
	for {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		rec, err := rd.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("reading the table of stage %s: %w", in.Name, err)
		}
		batch, err := mixBatch(in, rec, src, row, c, seen)
		row += int(rec.NumRows())
		rec.Release()
		if err != nil {
			return nil, err
		}
		err = out.Write(batch)
		batch.Release()
		if err != nil {
			return nil, err
		}
	}
	if row != len(src.lens) {
		return nil, fmt.Errorf("stage %s holds %d examples, %d when it was streamed", in.Name, row, len(src.lens))
	}
	return c, nil
}

// mixBatch is one batch of an input's table as the mix writes it; first
// is the batch's first row in the input.
func mixBatch(in *pipeline.Input, rec arrow.RecordBatch, src *mixSource, first int, c *MixCounts, seen *heldOutSeen) (arrow.RecordBatch, error) {
	ids, err := int32Lists(in, rec, packer.ColInputIDs, tokenizeKindName)
	if err != nil {
		return nil, err
	}
	labels, err := int32Lists(in, rec, packer.ColLabels, tokenizeKindName)
	if err != nil {
		return nil, err
	}
	idv := ids.ListValues().(*array.Int32).Int32Values()
	lv := labels.ListValues().(*array.Int32).Int32Values()
	b := array.NewRecordBuilder(memory.DefaultAllocator, MixSchema)
	defer b.Release()
	idsB, labB := b.Field(0).(*array.ListBuilder), b.Field(1).(*array.ListBuilder)
	idsV, labV := idsB.ValueBuilder().(*array.Int32Builder), labB.ValueBuilder().(*array.Int32Builder)
	srcB, heldB := b.Field(2).(*array.StringBuilder), b.Field(3).(*array.BooleanBuilder)
	for r := 0; r < int(rec.NumRows()); r++ {
		j := first + r
		a, z := ids.ValueOffsets(r)
		la, lz := labels.ValueOffsets(r)
		if int32(z-a) != src.lens[j] {
			return nil, fmt.Errorf("stage %s: example %d has %d tokens, %d when it was streamed", in.Name, j, z-a, src.lens[j])
		}
		n := 1
		if !src.heldout[j] {
			n = int(src.count[j])
		}
		if src.heldout[j] || n > 0 {
			seen.add(idv[a:z], src.heldout[j])
		}
		trained := int64(0)
		for _, l := range lv[min(la+1, lz):lz] { // the first token is no prediction: packing masks it
			if l != packer.IgnoreIndex {
				trained++
			}
		}
		for range n {
			idsB.Append(true)
			labB.Append(true)
			idsV.AppendValues(idv[a:z], nil)
			labV.AppendValues(lv[la:lz], nil)
			srcB.Append(in.Name)
			heldB.Append(src.heldout[j])
		}
		switch {
		case src.heldout[j]:
			c.HeldOut++
			c.HeldOutTokens += int64(z - a)
		case n > 0:
			c.Unique++
			c.Examples += int64(n)
			c.Tokens += int64(n) * int64(z-a)
			c.TrainedTokens += int64(n) * trained
		}
	}
	return b.NewRecordBatch(), nil
}
