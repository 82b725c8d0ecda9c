package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"

	"gemmaft/dataset"
	"gemmaft/hub"
	"gemmaft/internal/dirsum"
	"gemmaft/packer"
	"gemmaft/pipeline"
	"gemmaft/stages"
	"gemmaft/tokenizer"
)

// inspect --decode: a row of token ids, as a person checks it, is the text
// they stand for with the trained tokens marked, one packed example after
// another: what the chat template made and what the loss reads.

// Marks around the tokens a row trains on.
const trainedOpen, trainedClose = "⟦", "⟧"

// decodeTokenizer is the tokenizer to decode the rows of the entry whose
// manifest is m with: tokPath when given, else the one that made them.
func decodeTokenizer(ctx context.Context, st *pipeline.Store, m *pipeline.Manifest, tokPath string) (*tokenizer.Tokenizer, error) {
	if tokPath == "" {
		var err error
		if tokPath, err = recordedTokenizer(st, m); err != nil {
			return nil, err
		}
	}
	path, err := localArg(ctx, "tokenizer", tokPath, argTokenizer)
	if err != nil {
		return nil, err
	}
	tk, err := tokenizer.LoadFile(path)
	if err != nil {
		return nil, failErr(err)
	}
	return tk, nil
}

// recordedTokenizer is the tokenizer that made the rows of the entry whose
// manifest is m, as the nearest tokenize stage upstream recorded it (breadth
// first: a mix's inputs share theirs): an hf:// one at the commit it read,
// a file checked to hold the same bytes still.
func recordedTokenizer(st *pipeline.Store, m *pipeline.Manifest) (string, error) {
	queue := []*pipeline.Manifest{m}
	for len(queue) > 0 {
		cur := queue[0]
		queue = queue[1:]
		if cur.Kind != "tokenize" {
			for _, in := range cur.Inputs {
				up, err := pipeline.ReadManifest(st.EntryDir(in.Key))
				if err != nil {
					return "", failErr(fmt.Errorf("stage %s's input %s: %w", cur.Stage, in.Stage, err))
				}
				queue = append(queue, up)
			}
			continue
		}
		var p struct {
			Tokenizer string `json:"tokenizer"`
		}
		if err := json.Unmarshal(cur.Params, &p); err != nil {
			return "", failErr(fmt.Errorf("stage %s: %w", cur.Stage, err))
		}
		if hub.IsRef(p.Tokenizer) {
			ref, err := hub.ParseRef(p.Tokenizer)
			if err != nil {
				return "", failErr(fmt.Errorf("stage %s: %w", cur.Stage, err))
			}
			for _, r := range cur.Refs {
				if r.Name == ref.RepoRef() {
					ref.Revision = r.Revision // what it read, not what the branch names now
				}
			}
			return ref.String(), nil
		}
		if len(cur.Files) != 1 {
			return "", failErr(fmt.Errorf("stage %s records %d files, not its tokenizer's one; give --tokenizer", cur.Stage, len(cur.Files)))
		}
		f := cur.Files[0]
		if sum, err := dirsum.FileSum(f.Path); err != nil || sum != f.SHA256 {
			return "", usageErr(fmt.Errorf("--decode: %s, the tokenizer stage %s read, is gone or has changed since; give the one it was with --tokenizer", f.Path, cur.Stage))
		}
		return f.Path, nil
	}
	return "", usageErr(fmt.Errorf("--decode: stage %s reads no tokenize stage; give the tokenizer with --tokenizer", m.Stage))
}

// printDecoded shows the first n rows of the entry's table decoded with
// tk: token rows (a tokenize or mix stage's) as one example each, packed
// rows as the examples their seq_lengths delimit, then their padding.
func printDecoded(w io.Writer, entry string, n int, tk *tokenizer.Tokenizer) error {
	path := filepath.Join(entry, pipeline.TableFile)
	r, err := dataset.OpenIPC(path)
	if errors.Is(err, os.ErrNotExist) {
		return usageErr(errors.New("--decode: this stage holds no table"))
	}
	if err != nil {
		return failErr(err)
	}
	defer r.Close()
	s := r.Schema()
	if len(s.FieldIndices(packer.ColInputIDs)) != 1 || len(s.FieldIndices(packer.ColLabels)) != 1 {
		return usageErr(fmt.Errorf("--decode: this stage's rows hold no %s and %s (a tokenize, mix or pack stage's do)", packer.ColInputIDs, packer.ColLabels))
	}
	return firstRows(r, n, func(rec arrow.RecordBatch, i, row int) error {
		ids := int32List(rec, packer.ColInputIDs)
		labels := int32List(rec, packer.ColLabels)
		lengths := int32List(rec, packer.ColSeqLengths) // nil: not packed
		if ids == nil || labels == nil {
			return usageErr(fmt.Errorf("--decode: this stage's %s and %s are not lists of int32", packer.ColInputIDs, packer.ColLabels))
		}
		id, lab := dataset.Int32Row(ids, i), dataset.Int32Row(labels, i)
		spans := []int32{int32(len(id))}
		if lengths != nil {
			spans = dataset.Int32Row(lengths, i)
		}
		if !fits(spans, len(id)) || len(lab) != len(id) {
			return failErr(fmt.Errorf("row %d: its seq_lengths or labels do not match its %d tokens (a damaged table?)", row, len(id)))
		}
		if err := printRow(w, tk, row, id, lab, spans, mixNote(rec, i)); err != nil {
			return failErr(err)
		}
		return nil
	})
}

// mixNote is how a mix stage's row says where it comes from: its source,
// and whether it is held out of training (its marks then show what the
// eval loss scores); "" for other tables.
func mixNote(rec arrow.RecordBatch, i int) string {
	note := ""
	if c := rec.Schema().FieldIndices(stages.ColSource); len(c) == 1 {
		if src, ok := rec.Column(c[0]).(*array.String); ok {
			note = ", from " + src.Value(i)
		}
	}
	if c := rec.Schema().FieldIndices(stages.ColHeldOut); len(c) == 1 {
		if held, ok := rec.Column(c[0]).(*array.Boolean); ok && held.Value(i) {
			note += ", held out of training"
		}
	}
	return note
}

// printRow writes one row: a header, each example's text, the padding.
func printRow(w io.Writer, tk *tokenizer.Tokenizer, row int, ids, labels, lengths []int32, note string) error {
	trained := 0
	for _, l := range labels {
		if l != packer.IgnoreIndex {
			trained++
		}
	}
	used := 0
	for _, l := range lengths {
		used += int(l)
	}
	fmt.Fprintf(w, "\n═══ row %d: %d tokens, %d trained", row, len(ids), trained)
	if len(lengths) > 1 || used < len(ids) {
		examples := fmt.Sprintf("%d examples", len(lengths))
		if len(lengths) == 1 {
			examples = "1 example"
		}
		fmt.Fprintf(w, ", %s, %d of padding", examples, len(ids)-used)
	}
	fmt.Fprintln(w, note)
	at := 0
	for k, l := range lengths {
		if len(lengths) > 1 {
			fmt.Fprintf(w, "─── example %d (%d tokens)\n", k+1, l)
		}
		text, err := markedText(tk, ids[at:at+int(l)], labels[at:at+int(l)])
		if err != nil {
			return err
		}
		fmt.Fprintln(w, escapeControls(text))
		at += int(l)
	}
	return nil
}

// markedText decodes ids, the runs of trained tokens between the marks.
func markedText(tk *tokenizer.Tokenizer, ids, labels []int32) (string, error) {
	var out []byte
	for start := 0; start < len(ids); {
		on := labels[start] != packer.IgnoreIndex
		end := start
		for end < len(ids) && (labels[end] != packer.IgnoreIndex) == on {
			end++
		}
		text, err := tk.Decode(ids[start:end], false)
		if err != nil {
			return "", err
		}
		if on {
			text = trainedOpen + text + trainedClose
		}
		out = append(out, text...)
		start = end
	}
	return string(out), nil
}

// escapeControls writes the control characters of text other than line
// breaks and tabs as escapes (\r, \u001b), as plain inspect's JSON does:
// printed as they are, the data's escape sequences would recolour the
// terminal or retitle its window, and a carriage return would hide the
// text before it, where this view is there to show every trained byte.
func escapeControls(text string) string {
	var b strings.Builder
	for _, r := range text {
		switch {
		case r == '\n' || r == '\t':
			b.WriteRune(r)
		case r == '\r':
			b.WriteString(`\r`)
		case r < 0x20 || r == 0x7f || r >= 0x80 && r <= 0x9f:
			fmt.Fprintf(&b, `\u%04x`, r)
		default:
			b.WriteRune(r)
		}
	}
	return b.String()
}

// fits says whether lengths, none negative, add up to at most n.
func fits(lengths []int32, n int) bool {
	sum := 0
	for _, l := range lengths {
		if l < 0 {
			return false
		}
		sum += int(l)
	}
	return sum <= n
}

// int32List is rec's list-of-int32 column name, nil when it has none.
func int32List(rec arrow.RecordBatch, name string) *array.List {
	idx := rec.Schema().FieldIndices(name)
	if len(idx) != 1 {
		return nil
	}
	l, ok := rec.Column(idx[0]).(*array.List)
	if !ok {
		return nil
	}
	if _, ok := l.ListValues().(*array.Int32); !ok {
		return nil
	}
	return l
}
