package trainer

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/ipc"
	"github.com/apache/arrow-go/v18/arrow/memory"
)

// writeIPC writes rows as the pack stage does: an Arrow IPC file of four
// list<int32> columns, here in a different column order and two batches,
// since readers must go by name.
func writeIPC(t *testing.T, path string, rows []PackedRow) {
	t.Helper()
	writeColumns(t, path, []string{"seq_lengths", "labels", "input_ids", "position_ids"}, rows)
}

// writeColumns writes the named columns of rows to an Arrow IPC file, the
// first row in one batch and the others in a second.
func writeColumns(t *testing.T, path string, names []string, rows []PackedRow) {
	t.Helper()
	var fields []arrow.Field
	for _, n := range names {
		fields = append(fields, arrow.Field{Name: n, Type: arrow.ListOf(arrow.PrimitiveTypes.Int32)})
	}
	schema := arrow.NewSchema(fields, nil)
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	w, err := ipc.NewFileWriter(f, ipc.WithSchema(schema))
	if err != nil {
		t.Fatal(err)
	}
	for _, part := range [][]PackedRow{rows[:1], rows[1:]} {
		b := array.NewRecordBuilder(memory.NewGoAllocator(), schema)
		for _, r := range part {
			cols := map[string][]int32{"input_ids": r.InputIDs, "labels": r.Labels, "position_ids": r.PositionIDs, "seq_lengths": r.SeqLengths}
			for i, name := range names {
				col := cols[name]
				lb := b.Field(i).(*array.ListBuilder)
				lb.Append(true)
				lb.ValueBuilder().(*array.Int32Builder).AppendValues(col, nil)
			}
		}
		rec := b.NewRecordBatch()
		if err := w.Write(rec); err != nil {
			t.Fatal(err)
		}
		rec.Release()
		b.Release()
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestReadPackedRowsArrowAndJSONL(t *testing.T) {
	jsonl := filepath.Join(refDir, "t5_gqa", "batch.jsonl")
	want, err := ReadPackedRows(jsonl)
	if err != nil {
		t.Fatal(err)
	}
	if len(want) != 3 {
		t.Fatalf("%d rows", len(want))
	}
	path := filepath.Join(t.TempDir(), "packed.arrow")
	writeIPC(t, path, want)
	got, err := ReadPackedRows(path)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("Arrow rows differ from the JSON lines")
	}
	lazy, err := OpenPackedArrow(path)
	if err != nil {
		t.Fatal(err)
	}
	defer lazy.Close()
	if lazy.Len() != len(want) {
		t.Fatalf("lazy reader sees %d rows, want %d", lazy.Len(), len(want))
	}
	for _, i := range []int{2, 0, 1, 2} {
		r, err := lazy.Row(i)
		if err != nil || !reflect.DeepEqual(r, want[i]) {
			t.Errorf("lazy row %d: %v", i, err)
		}
	}
	if _, err := lazy.Row(3); err == nil {
		t.Error("row beyond the end read without error")
	}

	// A table that is not packed rows is refused with what it lacks; a
	// truncated file with what dataset.OpenIPC finds.
	other := filepath.Join(t.TempDir(), "tokens.arrow")
	writeColumns(t, other, []string{"input_ids", "labels"}, want)
	if _, err := OpenPackedArrow(other); err == nil || !strings.Contains(err.Error(), `not packed rows: no column "seq_lengths"`) {
		t.Errorf("a table of tokens: %v", err)
	}
	data, _ := os.ReadFile(path)
	short := filepath.Join(t.TempDir(), "short.arrow")
	os.WriteFile(short, data[:len(data)-8], 0o644)
	if _, err := ReadPackedRows(short); err == nil || !strings.Contains(err.Error(), "truncated") {
		t.Errorf("a truncated file: %v", err)
	}
}

func TestReadPackedRowsErrors(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []struct{ content, want string }{
		{`{"input_ids": [1, 2], "labels": [-100], "seq_lengths": [2]}`, "labels has 1"},
		{`{"input_ids": [1, 2], "labels": [-100, 2]}`, "seq_lengths"},
		{`{"input_ids": [1], "labels": [-100], "seq_lengths": [1], "extra": 1}`, "unknown field"},
		{`{"input_ids": [1, 2, 3]`, "line 1"},
		{"ARROW1\x00\x00garbage", "not an Arrow IPC file"},
	} {
		p := filepath.Join(dir, "x")
		os.WriteFile(p, []byte(c.content), 0o644)
		if _, err := ReadPackedRows(p); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%q: err = %v, want one mentioning %q", c.content, err, c.want)
		}
	}
	// Rows that read but cannot be batched.
	for _, r := range []PackedRow{
		{InputIDs: []int32{1, 2}, Labels: []int32{-100, 2}, SeqLengths: []int32{3}},
		{InputIDs: []int32{1, 2}, Labels: []int32{-100, 2}, SeqLengths: []int32{0, 2}},
	} {
		if _, err := NewBatch([]PackedRow{r}); err == nil {
			t.Errorf("NewBatch accepted %+v", r)
		}
	}
	c := tinyConfig()
	m := tinyModel(t, c)
	b, _ := NewBatch([]PackedRow{{InputIDs: []int32{1, 500}, Labels: []int32{-100, 2}, SeqLengths: []int32{2}}})
	if _, _, err := m.Loss(nil, b); err == nil || !strings.Contains(err.Error(), "outside the model's vocabulary") {
		t.Errorf("token id beyond the vocabulary: %v", err)
	}
}

// TestExportedPackedRows: a packed row as export writes it for other
// trainers (attention_mask added, the padding a last seq_lengths entry)
// reads back and trains as the cache's row does: the same loss.
func TestExportedPackedRows(t *testing.T) {
	cached := `{"input_ids": [2, 5, 7, 9, 2, 8, 0, 0, 0], "labels": [-100, 5, 7, 9, -100, 8, -100, -100, -100], "position_ids": [0, 1, 2, 3, 0, 1, 0, 1, 2], "seq_lengths": [4, 2]}`
	exported := `{"input_ids": [2, 5, 7, 9, 2, 8, 0, 0, 0], "labels": [-100, 5, 7, 9, -100, 8, -100, -100, -100], "attention_mask": [1, 1, 1, 1, 1, 1, 0, 0, 0], "position_ids": [0, 1, 2, 3, 0, 1, 0, 1, 2], "seq_lengths": [4, 2, 3]}`
	m := tinyModel(t, tinyConfig())
	var loss [2]float64
	var trained [2]int
	for i, line := range []string{cached, exported} {
		rows, err := ReadPackedJSONL(strings.NewReader(line))
		if err != nil {
			t.Fatalf("%s: %v", line, err)
		}
		b, err := NewBatch(rows)
		if err != nil {
			t.Fatal(err)
		}
		if loss[i], trained[i], err = m.Loss(nil, b); err != nil {
			t.Fatal(err)
		}
	}
	if loss[0] != loss[1] || trained[0] != trained[1] || trained[0] != 4 {
		t.Errorf("exported row: loss %v over %d tokens, the cache's %v over %d", loss[1], trained[1], loss[0], trained[0])
	}
}

// FuzzPackedRows feeds arbitrary JSON lines through the reader, NewBatch and
// the batch checks a model runs before touching its weights: errors are
// fine, panics are not.
func FuzzPackedRows(f *testing.F) {
	f.Add([]byte(`{"input_ids": [2, 5, 7, 0], "labels": [-100, 5, 7, -100], "seq_lengths": [3]}`))
	f.Add([]byte(`{"input_ids": [1], "labels": [-100], "position_ids": [0], "seq_lengths": [1]}`))
	f.Add([]byte(`{"input_ids": [1, 2], "labels": [-100, 99999], "seq_lengths": [1, 1]}`))
	c := tinyConfig()
	f.Fuzz(func(t *testing.T, data []byte) {
		rows, err := ReadPackedJSONL(strings.NewReader(string(data)))
		if err != nil || len(rows) == 0 {
			return
		}
		b, err := NewBatch(rows)
		if err != nil {
			return
		}
		if len(b.IDs) != len(b.Targets) || len(b.IDs) != len(b.Pos) || len(b.IDs) != len(b.SegStart) {
			t.Fatalf("inconsistent batch %+v", b)
		}
		for i, s := range b.SegStart {
			if s < 0 || int(s) > i {
				t.Fatalf("token %d starts its example at %d", i, s)
			}
		}
		_ = b.validate(c)
	})
}
