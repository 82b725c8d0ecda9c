// Package packer packs tokenized examples into training rows of exactly
// SeqLen tokens, keeping examples apart: position ids restart at 0 for every
// example, seq_lengths lists the examples of a row, and the first label of
// every example is -100 so that no token is trained to predict the start of
// the next, unrelated example.
//
// Rows are planned from the lengths, longest examples first, with a
// minimum-slack variant of first-fit-decreasing that closes rows exactly
// (see minimumSlack) or with textbook best-fit-decreasing; by default with
// both, keeping the plan with fewer rows. Either needs
// every length before the first row can be built, but the tokens of a large
// dataset do not fit in memory. A Packer therefore keeps only lengths in
// memory and spills the tokens to a file, then reads each example back by
// offset while it builds the rows.
package packer

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
)

// IgnoreIndex is the label of tokens that are not trained, as in PyTorch's
// cross-entropy and Hugging Face transformers.
const IgnoreIndex = -100

// Overlong says what happens to an example longer than SeqLen.
type Overlong int

const (
	Drop     Overlong = iota // leave the example out
	Truncate                 // keep its first SeqLen tokens
	Split                    // cut it into pieces of SeqLen tokens, each packed as an example
)

func (o Overlong) String() string {
	switch o {
	case Drop:
		return "drop"
	case Truncate:
		return "truncate"
	case Split:
		return "split"
	}
	return fmt.Sprintf("Overlong(%d)", int(o))
}

// ParseOverlong parses "drop", "truncate" or "split".
func ParseOverlong(s string) (Overlong, error) {
	for _, o := range []Overlong{Drop, Truncate, Split} {
		if s == o.String() {
			return o, nil
		}
	}
	return 0, fmt.Errorf("packer: unknown over-long policy %q (want drop, truncate or split)", s)
}

// Algorithm plans which examples share a row.
//
// On alpaca-tr tokenized for Gemma 3 at seq_len 4096, MinimumSlack fills
// 99.94% of the slots (the lower bound on the row count) and
// BestFitDecreasing 99.65%. When most examples are longer than half a row,
// best-fit-decreasing can be the better of the two; Auto plans with both and
// keeps the plan with fewer rows, which costs little next to reading the
// tokens back.
type Algorithm int

const (
	Auto              Algorithm = iota // the fewer rows of MinimumSlack and BestFitDecreasing
	MinimumSlack                       // fill row by row, closing rows exactly where possible
	BestFitDecreasing                  // each example, longest first, into the fullest row it fits
)

var algorithmNames = map[Algorithm]string{Auto: "auto", MinimumSlack: "min_slack", BestFitDecreasing: "bfd"}

func (a Algorithm) String() string {
	if name, ok := algorithmNames[a]; ok {
		return name
	}
	return fmt.Sprintf("Algorithm(%d)", int(a))
}

// ParseAlgorithm parses "auto", "min_slack" or "bfd".
func ParseAlgorithm(s string) (Algorithm, error) {
	for a, name := range algorithmNames {
		if s == name {
			return a, nil
		}
	}
	return 0, fmt.Errorf("packer: unknown packing algorithm %q (want auto, min_slack or bfd)", s)
}

// Options configures a Packer.
type Options struct {
	SeqLen    int      // tokens per row
	PadID     int32    // input id of padding; its labels are IgnoreIndex
	Overlong  Overlong // policy for examples longer than SeqLen
	Algorithm Algorithm
	Seed      uint64 // orders equal lengths and the output rows
	Dir       string // directory of the spill file; "" means os.TempDir()
}

// Row is one packed training row; every slice has SeqLen elements except
// SeqLengths, which holds the lengths of the row's examples in order
// (padding, at the end, is not an example). Padding takes position ids
// 0, 1, 2, … of its own, so that a trainer deriving example boundaries from
// position ids sees it as a separate segment.
type Row struct {
	InputIDs    []int32
	Labels      []int32
	PositionIDs []int32
	SeqLengths  []int32
}

// Stats describes a packing run. Every example given to Add is accounted for:
//
//	Examples = ExamplesIn - SkippedEmpty - Dropped - Split + SplitPieces - SkippedUntrained
type Stats struct {
	ExamplesIn       int64   `json:"examples_in"`        // calls to Add
	Examples         int64   `json:"examples"`           // examples (or pieces) placed in rows
	Rows             int64   `json:"rows"`               // rows emitted
	TokensIn         int64   `json:"tokens_in"`          // tokens given to Add
	RealTokens       int64   `json:"real_tokens"`        // tokens placed in rows
	Slots            int64   `json:"slots"`              // Rows * SeqLen
	Efficiency       float64 `json:"efficiency"`         // RealTokens / Slots
	Dropped          int64   `json:"dropped"`            // over-long examples left out
	Truncated        int64   `json:"truncated"`          // over-long examples cut to SeqLen
	Split            int64   `json:"split"`              // over-long examples cut into pieces
	SplitPieces      int64   `json:"split_pieces"`       // pieces made from them
	SkippedEmpty     int64   `json:"skipped_empty"`      // examples without tokens
	SkippedUntrained int64   `json:"skipped_untrained"`  // examples or pieces without a trained label
	Repeated         int64   `json:"repeated,omitempty"` // examples whose tokens an earlier one has, packed in other rows
	Longest          int64   `json:"longest"`            // tokens of the longest example given, for choosing SeqLen
}

// Spilled tokens take 4 bytes each: the id, with bit 31 set when the token's
// label equals its id (the usual case). Examples whose labels are anything
// else besides IgnoreIndex store the label as a second word.
const (
	trainedBit = 1 << 31
	wordSize   = 4
)

// example is what stays in memory per example: where its tokens are, and
// which copy of its tokens it is.
type example struct {
	off      int64
	n        int32
	round    int32 // earlier examples with the same tokens: its rows are planned apart from theirs
	explicit bool  // labels stored as a second word per token
}

// Packer collects examples with Add and packs them with Finish.
type Packer struct {
	opts     Options
	spill    *os.File
	w        *bufio.Writer
	off      int64
	examples []example
	copies   map[uint64]int32 // per digest of an example's ids, how many were added
	scratch  []byte
	stats    Stats
	finished bool
}

// New creates a Packer and its spill file.
func New(opts Options) (*Packer, error) {
	if opts.SeqLen < 2 {
		return nil, fmt.Errorf("packer: seq_len %d is too small", opts.SeqLen)
	}
	if opts.SeqLen > 1<<30 {
		return nil, fmt.Errorf("packer: seq_len %d is too large", opts.SeqLen)
	}
	if opts.PadID < 0 {
		return nil, fmt.Errorf("packer: pad id %d is negative", opts.PadID)
	}
	if opts.Overlong < Drop || opts.Overlong > Split {
		return nil, fmt.Errorf("packer: unknown over-long policy %d", int(opts.Overlong))
	}
	if _, ok := algorithmNames[opts.Algorithm]; !ok {
		return nil, fmt.Errorf("packer: unknown packing algorithm %d", int(opts.Algorithm))
	}
	f, err := os.CreateTemp(opts.Dir, "pack-*.tokens")
	if err != nil {
		return nil, fmt.Errorf("packer: spill file: %w", err)
	}
	// Unlinked at once where the system allows it, so that a crash leaves
	// nothing behind; Close removes it otherwise.
	os.Remove(f.Name())
	return &Packer{opts: opts, spill: f, w: bufio.NewWriterSize(f, 1<<20), copies: map[uint64]int32{}}, nil
}

// Add takes one tokenized example: its input ids and labels, of equal
// length, with IgnoreIndex for tokens that are not trained. The slices are
// not retained.
func (p *Packer) Add(inputIDs, labels []int32) error {
	if p.finished {
		return errors.New("packer: Add after Finish")
	}
	index := p.stats.ExamplesIn
	if len(inputIDs) != len(labels) {
		return fmt.Errorf("packer: example %d: %d input ids but %d labels", index, len(inputIDs), len(labels))
	}
	explicit := false
	for i, id := range inputIDs {
		if id < 0 {
			return fmt.Errorf("packer: example %d: token %d has negative id %d", index, i, id)
		}
		if l := labels[i]; l != IgnoreIndex && l != id {
			if l < 0 {
				return fmt.Errorf("packer: example %d: token %d has label %d, neither %d nor a token id", index, i, l, IgnoreIndex)
			}
			explicit = true
		}
	}
	p.stats.ExamplesIn++
	p.stats.TokensIn += int64(len(inputIDs))
	p.stats.Longest = max(p.stats.Longest, int64(len(inputIDs)))
	n := len(inputIDs)
	if n == 0 {
		p.stats.SkippedEmpty++
		return nil
	}

	// Copies of an example (a mix that repeats a source, duplicated data)
	// go to rows of their own round, so that no row holds one twice and a
	// step sees a repeated example no more often than another.
	d := digest(inputIDs)
	round := p.copies[d]
	p.copies[d] = round + 1
	if round > 0 {
		p.stats.Repeated++
	}

	seqLen := p.opts.SeqLen
	if n > seqLen {
		switch p.opts.Overlong {
		case Drop:
			p.stats.Dropped++
			return nil
		case Truncate:
			p.stats.Truncated++
			n = seqLen
		case Split:
			p.stats.Split++
			p.stats.SplitPieces += int64((n + seqLen - 1) / seqLen)
		}
	}
	off := p.off
	if err := p.write(inputIDs[:n], labels[:n], explicit); err != nil {
		return err
	}
	size := int64(wordSize)
	if explicit {
		size *= 2
	}
	for start := 0; start < n; start += seqLen {
		end := min(start+seqLen, n)
		// The first label of every example is masked when packed.
		if !slices.ContainsFunc(labels[start+1:end], func(l int32) bool { return l != IgnoreIndex }) {
			p.stats.SkippedUntrained++
			continue
		}
		p.examples = append(p.examples, example{off: off + int64(start)*size, n: int32(end - start), round: round, explicit: explicit})
	}
	return nil
}

// digest is a 64-bit FNV-1a hash of ids, which tells copies apart from
// other examples (a collision only plans an example in another round).
func digest(ids []int32) uint64 {
	h := uint64(14695981039346656037)
	for _, id := range ids {
		for range 4 {
			h ^= uint64(id & 0xff)
			h *= 1099511628211
			id >>= 8
		}
	}
	return h
}

func (p *Packer) write(ids, labels []int32, explicit bool) error {
	b := p.scratch[:0]
	for i, id := range ids {
		w := uint32(id)
		if explicit {
			b = binary.LittleEndian.AppendUint32(b, w)
			b = binary.LittleEndian.AppendUint32(b, uint32(labels[i]))
			continue
		}
		if labels[i] == id {
			w |= trainedBit
		}
		b = binary.LittleEndian.AppendUint32(b, w)
	}
	p.scratch = b
	if _, err := p.w.Write(b); err != nil {
		return fmt.Errorf("packer: spill file: %w", err)
	}
	p.off += int64(len(b))
	return nil
}

// ErrNothingToPack is Finish's error when no example was left to pack.
var ErrNothingToPack = errors.New("packer: nothing to pack")

// Finish plans the rows with the chosen algorithm, then builds each row from
// the spill file and passes it to emit, in an order shuffled by the seed so
// that training does not see rows sorted by how full they are. The Row's
// slices are reused: emit must copy what it keeps. Finish closes the Packer.
// Having no example to pack is an error, ErrNothingToPack.
func (p *Packer) Finish(emit func(Row) error) (Stats, error) {
	if p.finished {
		return p.stats, errors.New("packer: Finish called twice")
	}
	p.finished = true
	defer p.Close()
	if err := p.w.Flush(); err != nil {
		return p.stats, fmt.Errorf("packer: spill file: %w", err)
	}
	if len(p.examples) == 0 {
		st := p.stats
		err := fmt.Errorf("%w: of %d examples, %d were empty, %d longer than seq_len %d were dropped and %d had no trained label",
			ErrNothingToPack, st.ExamplesIn, st.SkippedEmpty, st.Dropped, p.opts.SeqLen, st.SkippedUntrained)
		if st.Dropped > 0 {
			err = fmt.Errorf("%w; raise seq_len (the longest example has %d tokens)", err, st.Longest)
		}
		return st, err
	}

	lengths := make([]int32, len(p.examples))
	for i, e := range p.examples {
		lengths[i] = e.n
	}
	rng := rand.New(rand.NewPCG(p.opts.Seed, 0x7061636b))
	order := planOrder(lengths, rng)
	// Each round's examples are planned into rows of their own.
	var rounds [][]int32
	for _, ex := range order {
		r := int(p.examples[ex].round)
		for len(rounds) <= r {
			rounds = append(rounds, nil)
		}
		rounds[r] = append(rounds[r], ex)
	}
	binOf := make([]int32, len(lengths))
	var bins int
	placed := make([]int32, 0, len(order))
	for _, round := range rounds {
		b, n, pl := p.plan(lengths, round)
		for _, ex := range round {
			binOf[ex] = b[ex] + int32(bins)
		}
		bins += n
		placed = append(placed, pl...)
	}

	// Gather each bin's examples, in the order they were placed.
	start := make([]int32, bins+1)
	for _, b := range binOf {
		start[b+1]++
	}
	for b := range bins {
		start[b+1] += start[b]
	}
	members := make([]int32, len(placed))
	fill := slices.Clone(start[:bins])
	for _, ex := range placed {
		b := binOf[ex]
		members[fill[b]] = ex
		fill[b]++
	}
	fill = nil

	seqLen := p.opts.SeqLen
	row := Row{
		InputIDs:    make([]int32, seqLen),
		Labels:      make([]int32, seqLen),
		PositionIDs: make([]int32, seqLen),
	}
	buf := make([]byte, 2*wordSize*seqLen)
	for _, b := range rng.Perm(bins) {
		row.SeqLengths = row.SeqLengths[:0]
		at := 0
		for _, ex := range members[start[b]:start[b+1]] {
			e := p.examples[ex]
			if err := p.read(e, buf, row.InputIDs[at:], row.Labels[at:]); err != nil {
				return p.stats, err
			}
			row.Labels[at] = IgnoreIndex
			for i := range int(e.n) {
				row.PositionIDs[at+i] = int32(i)
			}
			row.SeqLengths = append(row.SeqLengths, e.n)
			at += int(e.n)
		}
		p.stats.Examples += int64(len(row.SeqLengths))
		p.stats.RealTokens += int64(at)
		for i := at; i < seqLen; i++ {
			row.InputIDs[i] = p.opts.PadID
			row.Labels[i] = IgnoreIndex
			row.PositionIDs[i] = int32(i - at)
		}
		if err := emit(row); err != nil {
			return p.stats, err
		}
		p.stats.Rows++
		p.stats.Slots += int64(seqLen)
	}
	if p.stats.Slots > 0 {
		p.stats.Efficiency = float64(p.stats.RealTokens) / float64(p.stats.Slots)
	}
	return p.stats, nil
}

// plan assigns the examples of order (longest first) to bins with the
// chosen algorithm, as minimumSlack returns them; binOf is indexed by
// example, and holds only those of order.
func (p *Packer) plan(lengths, order []int32) (binOf []int32, bins int, placed []int32) {
	switch p.opts.Algorithm {
	case MinimumSlack:
		return minimumSlack(lengths, order, p.opts.SeqLen)
	case BestFitDecreasing:
		binOf, bins = bestFitDecreasing(lengths, order, p.opts.SeqLen)
		return binOf, bins, order
	}
	binOf, bins, placed = minimumSlack(lengths, order, p.opts.SeqLen)
	if bfdBinOf, bfdBins := bestFitDecreasing(lengths, order, p.opts.SeqLen); bfdBins < bins {
		return bfdBinOf, bfdBins, order
	}
	return binOf, bins, placed
}

// read decodes one spilled example into ids and labels.
func (p *Packer) read(e example, buf []byte, ids, labels []int32) error {
	size := wordSize
	if e.explicit {
		size *= 2
	}
	b := buf[:int(e.n)*size]
	if _, err := p.spill.ReadAt(b, e.off); err != nil {
		return fmt.Errorf("packer: reading spill file: %w", err)
	}
	for i := range int(e.n) {
		w := binary.LittleEndian.Uint32(b[i*size:])
		if e.explicit {
			ids[i] = int32(w)
			labels[i] = int32(binary.LittleEndian.Uint32(b[i*size+wordSize:]))
			continue
		}
		ids[i] = int32(w &^ trainedBit)
		labels[i] = IgnoreIndex
		if w&trainedBit != 0 {
			labels[i] = ids[i]
		}
	}
	return nil
}

// Stats returns the statistics so far.
func (p *Packer) Stats() Stats { return p.stats }

// Close removes the spill file. Finish calls it; call it yourself when
// abandoning a Packer.
func (p *Packer) Close() error {
	p.finished = true
	if p.spill == nil {
		return nil
	}
	err := p.spill.Close()
	os.Remove(p.spill.Name())
	p.spill = nil
	return err
}

// planOrder returns the examples longest first, equal lengths in an order
// drawn from rng.
func planOrder(lengths []int32, rng *rand.Rand) []int32 {
	order := make([]int32, len(lengths))
	for i := range order {
		order[i] = int32(i)
	}
	rng.Shuffle(len(order), func(i, j int) { order[i], order[j] = order[j], order[i] })
	slices.SortStableFunc(order, func(a, b int32) int { return int(lengths[b]) - int(lengths[a]) })
	return order
}
