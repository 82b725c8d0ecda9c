package stages

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/ipc"
	"github.com/apache/arrow-go/v18/arrow/memory"

	"gemmaft/packer"
	"gemmaft/pipeline"
)

const packKindName = "pack"

func init() { kinds[packKindName] = packKind{} }

// packKind packs tokenized examples into rows of exactly seq_len tokens
// (best fit decreasing, or a minimum-slack planner where it needs fewer rows).
// A mix stage's held-out examples are packed apart, into the rows of
// PackedHeldOutFile, so that no training row holds one.
type packKind struct{}

// PackedHeldOutFile holds, in a pack stage's entry, the packed rows of the
// held-out examples of a mix stage (the table's schema); the qlora stage
// computes its eval loss on them.
const PackedHeldOutFile = "heldout.arrow"

type packParams struct {
	SeqLen int `json:"seq_len"`
	// Overlong is what happens to an example longer than seq_len: drop,
	// truncate or split.
	Overlong string `json:"overlong"`
	// Algorithm plans the rows: auto (the fewer rows of min_slack and
	// bfd), min_slack, or bfd (best fit decreasing).
	Algorithm string `json:"algorithm"`
	PadID     int32  `json:"pad_id"`
	Seed      uint64 `json:"seed"`
}

// Synonyms are TRL's and Axolotl's names for the row length, and
// ParamNotes their switches for packing, which is this stage's whole work.
func (packKind) Synonyms() map[string]string {
	return map[string]string{"max_seq_length": "seq_len", "max_length": "seq_len", "sequence_len": "seq_len"}
}

func (packKind) ParamNotes() map[string]string {
	always := "this stage always packs examples into rows of seq_len tokens (overlong says what happens to longer ones)"
	return map[string]string{"packing": always, "sample_packing": always,
		"packing_strategy": "TRL's bfd truncates an over-long example (overlong: truncate here) and bfd_split cuts it into pieces (overlong: split); this stage drops it by default (overlong: drop), and plans rows with algorithm: auto, min_slack or bfd"}
}

func (packKind) Version() int       { return 1 }
func (packKind) Inputs() (int, int) { return 1, 1 }
func (packKind) Params() any {
	return &packParams{SeqLen: 4096, Overlong: packer.Drop.String(), Algorithm: packer.Auto.String()}
}

func (p *packParams) Validate() error {
	if p.SeqLen < 2 || p.SeqLen > 1<<20 {
		return &pipeline.ParamError{Param: "seq_len", Msg: fmt.Sprintf("%d is out of range [2, %d]", p.SeqLen, 1<<20), Fix: "use the model's training length, e.g. 4096"}
	}
	if _, err := packer.ParseOverlong(p.Overlong); err != nil {
		return &pipeline.ParamError{Param: "overlong", Msg: fmt.Sprintf("unknown policy %q", p.Overlong), Fix: "use drop, truncate or split"}
	}
	if _, err := packer.ParseAlgorithm(p.Algorithm); err != nil {
		return &pipeline.ParamError{Param: "algorithm", Msg: fmt.Sprintf("unknown algorithm %q", p.Algorithm), Fix: "use auto, min_slack or bfd"}
	}
	if p.PadID < 0 {
		return &pipeline.ParamError{Param: "pad_id", Msg: "must not be negative", Fix: "Gemma 3 pads with id 0"}
	}
	return nil
}

func (packKind) Prepare(params any, _ string) (pipeline.Runner, error) {
	return &packStage{p: params.(*packParams)}, nil
}

type packStage struct{ p *packParams }

func (*packStage) Files() []string { return nil }

// rowsPerBatch keeps a packed batch near 4 MiB at seq_len 4096.
const rowsPerBatch = 64

func (s *packStage) Run(ctx context.Context, t *pipeline.Task) error {
	overlong, _ := packer.ParseOverlong(s.p.Overlong)
	algorithm, _ := packer.ParseAlgorithm(s.p.Algorithm)
	opts := packer.Options{SeqLen: s.p.SeqLen, PadID: s.p.PadID, Overlong: overlong,
		Algorithm: algorithm, Seed: s.p.Seed, Dir: t.Dir}
	pk, err := packer.New(opts)
	if err != nil {
		return err
	}
	defer pk.Close()

	in := t.Inputs[0]
	var held *packer.Packer // for held-out examples, once one comes
	newHeld := func() (*packer.Packer, error) {
		if held != nil {
			return held, nil
		}
		h, err := packer.New(opts)
		if err != nil {
			return nil, err
		}
		held = h
		return held, nil
	}
	err = eachBatch(ctx, in, func(rec arrow.RecordBatch) error { return addExamples(pk, newHeld, in, rec) })
	if held != nil {
		defer held.Close()
	}
	if err != nil {
		return err
	}

	out, err := t.Output(packer.Schema())
	if err != nil {
		return err
	}
	stats, err := finishRows(ctx, pk, out.Write)
	if err != nil {
		return err
	}
	setStats(t, stats)
	t.Log.Info("packed", "rows", stats.Rows, "examples", stats.Examples, "efficiency", fmt.Sprintf("%.4f", stats.Efficiency),
		"dropped", stats.Dropped, "truncated", stats.Truncated, "split", stats.Split, "untrained", stats.SkippedUntrained,
		"repeated_in_rows_apart", stats.Repeated)
	if lost := stats.Dropped + stats.SkippedUntrained; lost > 0 {
		// Examples that will not be trained on are worth a word above INFO.
		what, of := "examples left out of the packed rows", stats.ExamplesIn
		if stats.Split > 0 { // each piece of a split example is packed, or left out, alone
			what, of = "examples, and pieces of split examples, left out of the packed rows", stats.ExamplesIn-stats.Split+stats.SplitPieces
		}
		t.Log.Warn(what, "longer_than_seq_len", stats.Dropped, "no_trained_token", stats.SkippedUntrained,
			"of", of, "longest", stats.Longest, "fix", "raise seq_len, or keep their first seq_len tokens with overlong: truncate (overlong: split suits plain texts, not conversations: its pieces train without their prompt)")
	}
	if stats.Truncated > 0 {
		t.Log.Warn("examples cut to seq_len: an answer cut short trains without its <end_of_turn>", "truncated", stats.Truncated, "of", stats.ExamplesIn, "longest", stats.Longest, "fix", "raise seq_len")
	}
	if held != nil {
		hs, err := writeHeldOut(ctx, held, filepath.Join(t.Dir, PackedHeldOutFile))
		switch {
		case errors.Is(err, packer.ErrNothingToPack):
			// The training rows stand; training goes on without an eval loss.
			t.Log.Warn("no held-out example was packed: the training stage will have no eval loss",
				"longer_than_seq_len", hs.Dropped, "no_trained_token", hs.SkippedUntrained, "of", hs.ExamplesIn, "fix", "raise seq_len (overlong: split suits plain texts, not conversations: its pieces train without their prompt)")
			t.SetStat("heldout", statMap(hs))
		case err != nil:
			return fmt.Errorf("held-out examples: %w", err)
		default:
			t.SetStat("heldout", statMap(hs))
			t.Log.Info("packed the held-out examples apart", "rows", hs.Rows, "examples", hs.Examples, "dropped", hs.Dropped)
			if lost := hs.Dropped + hs.SkippedUntrained; lost > 0 {
				t.Log.Warn("held-out examples left out of the eval rows", "longer_than_seq_len", hs.Dropped, "no_trained_token", hs.SkippedUntrained,
					"of", hs.ExamplesIn, "fix", "raise seq_len")
			}
		}
	}
	return nil
}

// finishRows packs what pk holds and writes the rows in batches of
// rowsPerBatch.
func finishRows(ctx context.Context, pk *packer.Packer, write func(arrow.RecordBatch) error) (packer.Stats, error) {
	bb := packer.NewBatchBuilder(memory.DefaultAllocator)
	defer bb.Release()
	flush := func() error {
		if bb.Len() == 0 {
			return nil
		}
		rec := bb.NewRecordBatch()
		defer rec.Release()
		return write(rec)
	}
	stats, err := pk.Finish(func(r packer.Row) error {
		if err := ctx.Err(); err != nil {
			return err
		}
		bb.Append(r)
		if bb.Len() == rowsPerBatch {
			return flush()
		}
		return nil
	})
	if err != nil {
		return stats, err
	}
	return stats, flush()
}

// writeHeldOut packs the held-out examples into their own file, or leaves
// none.
func writeHeldOut(ctx context.Context, pk *packer.Packer, path string) (_ packer.Stats, err error) {
	f, err := os.Create(path)
	if err != nil {
		return packer.Stats{}, err
	}
	defer func() {
		f.Close()
		if err != nil {
			os.Remove(path)
		}
	}()
	w, err := ipc.NewFileWriter(f, ipc.WithSchema(packer.Schema()))
	if err != nil {
		return packer.Stats{}, err
	}
	stats, err := finishRows(ctx, pk, w.Write)
	if err != nil {
		return stats, err
	}
	if err := w.Close(); err != nil {
		return stats, err
	}
	return stats, f.Close()
}

// addExamples feeds one batch of tokenized rows, read from in, to the
// packer; held-out ones (a mix stage's) go to the packer held returns.
func addExamples(pk *packer.Packer, held func() (*packer.Packer, error), in *pipeline.Input, rec arrow.RecordBatch) error {
	const want = tokenizeKindName + " or " + mixKindName
	ids, err := int32Lists(in, rec, packer.ColInputIDs, want)
	if err != nil {
		return err
	}
	labels, err := int32Lists(in, rec, packer.ColLabels, want)
	if err != nil {
		return err
	}
	var heldOut *array.Boolean
	if len(rec.Schema().FieldIndices(ColHeldOut)) == 1 {
		if heldOut, err = boolColumn(in, rec, ColHeldOut, want); err != nil {
			return err
		}
	}
	idv := ids.ListValues().(*array.Int32).Int32Values()
	lv := labels.ListValues().(*array.Int32).Int32Values()
	for i := 0; i < int(rec.NumRows()); i++ {
		a, b := ids.ValueOffsets(i)
		c, d := labels.ValueOffsets(i)
		to := pk
		if heldOut != nil && heldOut.Value(i) {
			if to, err = held(); err != nil {
				return err
			}
		}
		if err := to.Add(idv[a:b], lv[c:d]); err != nil {
			return err
		}
	}
	return nil
}

// setStats records every field of a JSON-encodable statistics struct.
func setStats(t *pipeline.Task, stats any) {
	for k, v := range statMap(stats) {
		t.SetStat(k, v)
	}
}

// statMap is a JSON-encodable struct as the map a manifest reads back,
// keys sorted when encoded: a statistic must encode the same once read
// back, or the manifest's checksum would not match.
func statMap(stats any) map[string]any {
	data, _ := json.Marshal(stats)
	var m map[string]any
	json.Unmarshal(data, &m)
	return m
}
