package dataset

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/ipc"
	"github.com/apache/arrow-go/v18/arrow/memory"
	pq "github.com/parquet-go/parquet-go"
)

// writeTestIPC writes rows of text and token lists to an Arrow IPC file in
// two batches.
func writeTestIPC(t *testing.T) (string, [][3]string, [][]int32) {
	t.Helper()
	texts := [][3]string{
		{"<start_of_turn>user\nMerhaba", "", "Çok \"güzel\" & hoş"},
		{"İkinci", "girdi\ttab", "son satır\n"},
		{"Üçüncü", "", "ğüşıöç"},
	}
	tokens := [][]int32{{2, 105, -100}, {}, {7}}
	schema := arrow.NewSchema([]arrow.Field{
		{Name: ColInstruction, Type: arrow.BinaryTypes.String},
		{Name: ColInput, Type: arrow.BinaryTypes.String},
		{Name: ColOutput, Type: arrow.BinaryTypes.String},
		{Name: "input_ids", Type: arrow.ListOf(arrow.PrimitiveTypes.Int32)},
	}, nil)
	path := filepath.Join(t.TempDir(), "rows.arrow")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	w, err := ipc.NewFileWriter(f, ipc.WithSchema(schema))
	if err != nil {
		t.Fatal(err)
	}
	for _, part := range [][2]int{{0, 2}, {2, 3}} {
		b := array.NewRecordBuilder(memory.DefaultAllocator, schema)
		for i := part[0]; i < part[1]; i++ {
			for c := range 3 {
				b.Field(c).(*array.StringBuilder).Append(texts[i][c])
			}
			lb := b.Field(3).(*array.ListBuilder)
			lb.Append(true)
			lb.ValueBuilder().(*array.Int32Builder).AppendValues(tokens[i], nil)
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
	return path, texts, tokens
}

func TestIPCRoundTrip(t *testing.T) {
	path, texts, tokens := writeTestIPC(t)
	r, err := OpenIPC(path)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if r.NumBatches() != 2 || r.Schema().NumFields() != 4 {
		t.Fatalf("%d batches, schema %v", r.NumBatches(), r.Schema())
	}
	row := 0
	for {
		rec, err := r.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		for i := range int(rec.NumRows()) {
			for c := range 3 {
				if got := rec.Column(c).(*array.String).Value(i); got != texts[row][c] {
					t.Errorf("row %d column %d: %q, want %q", row, c, got, texts[row][c])
				}
			}
			list := rec.Column(3).(*array.List)
			start, end := list.ValueOffsets(i)
			got := list.ListValues().(*array.Int32).Int32Values()[start:end]
			if !slices.Equal(got, tokens[row]) {
				t.Errorf("row %d tokens %v, want %v", row, got, tokens[row])
			}
			row++
		}
		rec.Release()
	}
	if row != 3 {
		t.Fatalf("read %d rows", row)
	}

	// Truncated files and other files are refused with a clear error.
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	for name, content := range map[string][]byte{
		"truncated.arrow": data[:len(data)-10],
		"text.arrow":      []byte("instruction,input,output\n"),
	} {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, content, 0o644); err != nil {
			t.Fatal(err)
		}
		if _, err := OpenIPC(p); err == nil || !strings.Contains(err.Error(), name) {
			t.Errorf("%s: err = %v", name, err)
		}
	}
}

func TestExportJSONL(t *testing.T) {
	path, texts, tokens := writeTestIPC(t)
	var buf bytes.Buffer
	n, err := ExportJSONL(&buf, openIPC(t, path))
	if err != nil || n != 3 {
		t.Fatalf("ExportJSONL: %d rows, %v", n, err)
	}
	if !strings.Contains(buf.String(), `"<start_of_turn>user\nMerhaba"`) {
		t.Errorf("HTML characters escaped or text changed:\n%s", buf.String())
	}
	sc := bufio.NewScanner(&buf)
	row := 0
	for sc.Scan() {
		line := sc.Bytes()
		// Keys come in schema order.
		if !bytes.HasPrefix(line, []byte(`{"instruction":`)) || !bytes.Contains(line, []byte(`,"input_ids":[`)) {
			t.Errorf("line %d: %s", row, line)
		}
		var got struct {
			Instruction string  `json:"instruction"`
			Input       string  `json:"input"`
			Output      string  `json:"output"`
			InputIDs    []int32 `json:"input_ids"`
		}
		if err := json.Unmarshal(line, &got); err != nil {
			t.Fatalf("line %d: %v: %s", row, err, line)
		}
		if [3]string{got.Instruction, got.Input, got.Output} != texts[row] || !slices.Equal(got.InputIDs, tokens[row]) || got.InputIDs == nil {
			t.Errorf("line %d: %+v", row, got)
		}
		row++
	}
	if row != 3 {
		t.Errorf("%d lines", row)
	}
}

// TestExportParquet reads the export back with parquet-go, a Parquet
// implementation independent of the arrow-go writer.
func TestExportParquet(t *testing.T) {
	path, texts, tokens := writeTestIPC(t)
	out := filepath.Join(t.TempDir(), "rows.parquet")
	f, err := os.Create(out)
	if err != nil {
		t.Fatal(err)
	}
	n, err := ExportParquet(f, openIPC(t, path))
	if err != nil || n != 3 {
		t.Fatalf("ExportParquet: %d rows, %v", n, err)
	}
	if err := f.Close(); err != nil {
		t.Fatalf("the caller's file was closed by the export: %v", err)
	}

	type record struct {
		Instruction string  `parquet:"instruction"`
		Input       string  `parquet:"input"`
		Output      string  `parquet:"output"`
		InputIDs    []int32 `parquet:"input_ids,list"`
	}
	got, err := pq.ReadFile[record](out)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 3 {
		t.Fatalf("%d rows", len(got))
	}
	for i, r := range got {
		if [3]string{r.Instruction, r.Input, r.Output} != texts[i] || !slices.Equal(r.InputIDs, tokens[i]) {
			t.Errorf("row %d: %+v", i, r)
		}
	}

	// And the Source reads it back too.
	rows := readAll(t, SourceOptions{Paths: []string{out}})
	for i, r := range rows {
		if [3]string(r) != texts[i] {
			t.Errorf("source row %d: %q", i, r)
		}
	}
}

// TestCorruptIPCOffsets damages the string offsets of the first batch:
// Next must report it instead of handing out an array that crashes later.
func TestCorruptIPCOffsets(t *testing.T) {
	path, texts, _ := writeTestIPC(t)
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var offsets []byte
	for _, v := range []int{0, len(texts[0][0]), len(texts[0][0]) + len(texts[1][0])} {
		offsets = binary.LittleEndian.AppendUint32(offsets, uint32(v))
	}
	at := bytes.Index(data, offsets)
	if at < 0 {
		t.Fatal("offsets of the first column not found in the file")
	}
	binary.LittleEndian.PutUint32(data[at+4:], 0x7fff0000)
	corrupt := filepath.Join(t.TempDir(), "corrupt.arrow")
	if err := os.WriteFile(corrupt, data, 0o644); err != nil {
		t.Fatal(err)
	}
	r, err := OpenIPC(corrupt)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if _, err := r.Next(); err == nil || !strings.Contains(err.Error(), "batch 0: corrupt data") {
		t.Errorf("Next on damaged offsets: %v", err)
	}
}

func openIPC(t *testing.T, path string) *IPCReader {
	t.Helper()
	r, err := OpenIPC(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}
