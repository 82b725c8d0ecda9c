package trainer

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
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

func readPackedIPC(f *os.File) ([]PackedRow, error) {
	rd, err := ipc.NewFileReader(f, ipc.WithAllocator(memory.NewGoAllocator()))
	if err != nil {
		return nil, fmt.Errorf("not an Arrow IPC file: %v", err)
	}
	defer rd.Close()
	schema := rd.Schema()
	names := []string{"input_ids", "labels", "position_ids", "seq_lengths"}
	var idx [4]int
	for i, name := range names {
		found := schema.FieldIndices(name)
		if len(found) == 0 {
			if name == "position_ids" {
				idx[i] = -1
				continue
			}
			return nil, fmt.Errorf("no column %q", name)
		}
		idx[i] = found[0]
		ft := schema.Field(idx[i]).Type
		lt, ok := ft.(*arrow.ListType)
		if !ok || lt.Elem().ID() != arrow.INT32 {
			return nil, fmt.Errorf("column %q has type %s, want list<int32>", name, ft)
		}
	}
	var rows []PackedRow
	for b := 0; b < rd.NumRecords(); b++ {
		rec, err := rd.RecordBatch(b)
		if err != nil {
			return nil, err
		}
		var cols [4]*array.List
		for i, j := range idx {
			if j >= 0 {
				cols[i] = rec.Column(j).(*array.List)
			}
		}
		for r := 0; r < int(rec.NumRows()); r++ {
			var vals [4][]int32
			for i, col := range cols {
				if col == nil {
					continue
				}
				if col.IsNull(r) {
					return nil, fmt.Errorf("batch %d row %d: %s is null", b, r, names[i])
				}
				lo, hi := col.ValueOffsets(r)
				values := col.ListValues().(*array.Int32).Int32Values()
				if lo < 0 || hi < lo || int(hi) > len(values) {
					return nil, fmt.Errorf("batch %d row %d: %s offsets out of range", b, r, names[i])
				}
				vals[i] = append([]int32(nil), values[lo:hi]...)
			}
			row := PackedRow{InputIDs: vals[0], Labels: vals[1], PositionIDs: vals[2], SeqLengths: vals[3]}
			if err := row.check(); err != nil {
				return nil, fmt.Errorf("batch %d row %d: %v", b, r, err)
			}
			rows = append(rows, row)
		}
	}
	return rows, nil
}
