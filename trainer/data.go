package trainer

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/ipc"
	"github.com/apache/arrow-go/v18/arrow/memory"
)

// Packed rows come either as the pack stage's Arrow IPC file (columns
// input_ids, labels, position_ids, seq_lengths, each list<int32>, found by
// name) or as JSON lines {"input_ids": [...], "labels": [...],
// "seq_lengths": [...]} with optional "position_ids".

// ReadPackedRows reads packed rows from path: an Arrow IPC file if it starts
// with Arrow's magic bytes, JSON lines otherwise.
func ReadPackedRows(path string) ([]PackedRow, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	magic := make([]byte, 6)
	n, _ := io.ReadFull(f, magic)
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return nil, err
	}
	var rows []PackedRow
	if n == 6 && string(magic) == "ARROW1" {
		rows, err = readPackedIPC(f)
	} else {
		rows, err = ReadPackedJSONL(f)
	}
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return rows, nil
}

// ReadPackedJSONL reads one packed row per non-empty line.
func ReadPackedJSONL(r io.Reader) ([]PackedRow, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 1<<30)
	var rows []PackedRow
	line := 0
	for sc.Scan() {
		line++
		text := strings.TrimSpace(sc.Text())
		if text == "" {
			continue
		}
		var raw struct {
			InputIDs    []int32 `json:"input_ids"`
			Labels      []int32 `json:"labels"`
			PositionIDs []int32 `json:"position_ids"`
			SeqLengths  []int32 `json:"seq_lengths"`
		}
		dec := json.NewDecoder(strings.NewReader(text))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&raw); err != nil {
			return nil, fmt.Errorf("line %d: %v", line, err)
		}
		row := PackedRow{InputIDs: raw.InputIDs, Labels: raw.Labels, PositionIDs: raw.PositionIDs, SeqLengths: raw.SeqLengths}
		if err := row.check(); err != nil {
			return nil, fmt.Errorf("line %d: %v", line, err)
		}
		rows = append(rows, row)
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	return rows, nil
}

// check validates a row's lengths.
func (r PackedRow) check() error {
	n := len(r.InputIDs)
	if n == 0 {
		return errors.New("empty input_ids")
	}
	if len(r.Labels) != n {
		return fmt.Errorf("labels has %d entries, input_ids %d", len(r.Labels), n)
	}
	if r.PositionIDs != nil && len(r.PositionIDs) != n {
		return fmt.Errorf("position_ids has %d entries, input_ids %d", len(r.PositionIDs), n)
	}
	if len(r.SeqLengths) == 0 {
		return errors.New("seq_lengths is empty")
	}
	return nil
}

// packedColumns finds the packed-row columns of an Arrow schema by name;
// position_ids is optional (index -1 when absent).
func packedColumns(schema *arrow.Schema) ([4]int, error) {
	var idx [4]int
	for i, name := range packedNames {
		found := schema.FieldIndices(name)
		if len(found) == 0 {
			if name == "position_ids" {
				idx[i] = -1
				continue
			}
			return idx, fmt.Errorf("no column %q", name)
		}
		idx[i] = found[0]
		ft := schema.Field(idx[i]).Type
		lt, ok := ft.(*arrow.ListType)
		if !ok || lt.Elem().ID() != arrow.INT32 {
			return idx, fmt.Errorf("column %q has type %s, want list<int32>", name, ft)
		}
	}
	return idx, nil
}

var packedNames = [4]string{"input_ids", "labels", "position_ids", "seq_lengths"}

// packedRow copies row r of a record batch whose columns idx are packed
// rows.
func packedRow(rec arrow.RecordBatch, idx [4]int, r int) (PackedRow, error) {
	var vals [4][]int32
	for i, j := range idx {
		if j < 0 {
			continue
		}
		col := rec.Column(j).(*array.List)
		if col.IsNull(r) {
			return PackedRow{}, fmt.Errorf("%s is null", packedNames[i])
		}
		lo, hi := col.ValueOffsets(r)
		values := col.ListValues().(*array.Int32).Int32Values()
		if lo < 0 || hi < lo || int(hi) > len(values) {
			return PackedRow{}, fmt.Errorf("%s offsets out of range", packedNames[i])
		}
		vals[i] = append([]int32(nil), values[lo:hi]...)
	}
	row := PackedRow{InputIDs: vals[0], Labels: vals[1], PositionIDs: vals[2], SeqLengths: vals[3]}
	return row, row.check()
}

func readPackedIPC(f *os.File) ([]PackedRow, error) {
	rd, err := ipc.NewFileReader(f, ipc.WithAllocator(memory.NewGoAllocator()))
	if err != nil {
		return nil, fmt.Errorf("not an Arrow IPC file: %v", err)
	}
	defer rd.Close()
	idx, err := packedColumns(rd.Schema())
	if err != nil {
		return nil, err
	}
	var rows []PackedRow
	for b := 0; b < rd.NumRecords(); b++ {
		rec, err := rd.RecordBatch(b)
		if err != nil {
			return nil, err
		}
		for r := 0; r < int(rec.NumRows()); r++ {
			row, err := packedRow(rec, idx, r)
			if err != nil {
				return nil, fmt.Errorf("batch %d row %d: %v", b, r, err)
			}
			rows = append(rows, row)
		}
	}
	return rows, nil
}

// ArrowRows is a Dataset over a packed-rows Arrow IPC file that reads rows
// on demand, one record batch at a time, so a large data set need not be
// held in memory. It is not safe for concurrent use.
type ArrowRows struct {
	f      *os.File
	rd     *ipc.FileReader
	idx    [4]int
	starts []int // first row of each record batch, and the total at the end
	cached int
	rec    arrow.RecordBatch
}

// OpenPackedArrow opens a packed-rows Arrow IPC file as a Dataset.
func OpenPackedArrow(path string) (*ArrowRows, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	rd, err := ipc.NewFileReader(f, ipc.WithAllocator(memory.NewGoAllocator()))
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: not an Arrow IPC file: %v", path, err)
	}
	a := &ArrowRows{f: f, rd: rd, cached: -1}
	if a.idx, err = packedColumns(rd.Schema()); err != nil {
		a.Close()
		return nil, fmt.Errorf("%s: %v", path, err)
	}
	n := 0
	for b := 0; b < rd.NumRecords(); b++ {
		a.starts = append(a.starts, n)
		rec, err := rd.RecordBatch(b)
		if err != nil {
			a.Close()
			return nil, fmt.Errorf("%s: batch %d: %v", path, b, err)
		}
		n += int(rec.NumRows())
	}
	a.starts = append(a.starts, n)
	return a, nil
}

// Len is the number of rows.
func (a *ArrowRows) Len() int { return a.starts[len(a.starts)-1] }

// Row reads row i.
func (a *ArrowRows) Row(i int) (PackedRow, error) {
	if i < 0 || i >= a.Len() {
		return PackedRow{}, fmt.Errorf("row %d out of range [0, %d)", i, a.Len())
	}
	b := sort.SearchInts(a.starts, i+1) - 1
	if b != a.cached {
		rec, err := a.rd.RecordBatch(b)
		if err != nil {
			return PackedRow{}, err
		}
		a.rec, a.cached = rec, b
	}
	row, err := packedRow(a.rec, a.idx, i-a.starts[b])
	if err != nil {
		return PackedRow{}, fmt.Errorf("%s: row %d: %v", a.f.Name(), i, err)
	}
	return row, nil
}

// Close releases the file.
func (a *ArrowRows) Close() error {
	a.rd.Close()
	return a.f.Close()
}
