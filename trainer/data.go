package trainer

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"sort"
	"strings"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"

	"gemmaft/dataset"
	"gemmaft/internal/lines"
	"gemmaft/packer"
)

// Packed rows come either as the pack stage's Arrow IPC file (the columns of
// packer.Schema, each list<int32>, found by name) or as JSON lines
// {"input_ids": [...], "labels": [...], "seq_lengths": [...]} with optional
// "position_ids".

// packedNames are the columns of a packed row, in PackedRow's order;
// position_ids may be absent.
var packedNames = [4]string{packer.ColInputIDs, packer.ColLabels, packer.ColPositionIDs, packer.ColSeqLengths}

// ReadPackedRows reads packed rows from path: an Arrow IPC file if it starts
// as one, JSON lines otherwise.
func ReadPackedRows(path string) ([]PackedRow, error) {
	isIPC, err := dataset.IsIPCFile(path)
	if err != nil {
		return nil, err
	}
	if isIPC {
		return readPackedIPC(path)
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	rows, err := ReadPackedJSONL(f)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return rows, nil
}

// ReadPackedJSONL reads one packed row per non-empty line. A line longer
// than lines.DefaultMax (64 MiB; a row of 1M tokens is far less) is an
// error, so that a stream without newlines cannot fill memory.
func ReadPackedJSONL(r io.Reader) ([]PackedRow, error) {
	lr := lines.NewReader(r, lines.DefaultMax)
	var rows []PackedRow
	for {
		b, err := lr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, err
		}
		line := lr.Line()
		text := strings.TrimSpace(string(b))
		if text == "" {
			continue
		}
		var raw map[string]json.RawMessage
		if err := json.Unmarshal([]byte(text), &raw); err != nil {
			return nil, fmt.Errorf("line %d: %w", line, err)
		}
		var vals [4][]int32
		for name, v := range raw {
			i := slices.Index(packedNames[:], name)
			if name == packer.ColAttentionMask {
				continue // an export's; the masks come from seq_lengths
			}
			if i < 0 {
				return nil, fmt.Errorf("line %d: unknown field %q (packed rows have %s)", line, name, strings.Join(packedNames[:], ", "))
			}
			if err := json.Unmarshal(v, &vals[i]); err != nil {
				return nil, fmt.Errorf("line %d: %s: %w", line, name, err)
			}
		}
		row := PackedRow{InputIDs: vals[0], Labels: vals[1], PositionIDs: vals[2], SeqLengths: vals[3]}
		if err := row.check(); err != nil {
			return nil, fmt.Errorf("line %d: %w", line, err)
		}
		rows = append(rows, row)
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
		return errors.New("no seq_lengths: a packed row lists the lengths of the examples packed into it (pipeline export of a pack stage writes them)")
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
			if name == packer.ColPositionIDs {
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

// packedRow copies row r of a record batch whose columns idx are packed
// rows. The batch was checked by dataset.IPCReader, so offsets are in range.
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
		vals[i] = dataset.Int32Row(col, r)
	}
	row := PackedRow{InputIDs: vals[0], Labels: vals[1], PositionIDs: vals[2], SeqLengths: vals[3]}
	return row, row.check()
}

// readPackedIPC reads every row of a packed-rows Arrow IPC file.
func readPackedIPC(path string) ([]PackedRow, error) {
	a, err := OpenPackedArrow(path)
	if err != nil {
		return nil, err
	}
	defer a.Close()
	rows := make([]PackedRow, a.Len())
	for i := range rows {
		if rows[i], err = a.Row(i); err != nil {
			return nil, err
		}
	}
	return rows, nil
}

// ArrowRows is a Dataset over a packed-rows Arrow IPC file that reads rows
// on demand, one record batch at a time, so a large data set need not be
// held in memory. It is not safe for concurrent use.
type ArrowRows struct {
	path   string
	rd     *dataset.IPCReader
	idx    [4]int
	starts []int // first row of each record batch, and the total at the end
	cached int
	rec    arrow.RecordBatch
}

// OpenPackedArrow opens a packed-rows Arrow IPC file as a Dataset.
func OpenPackedArrow(path string) (*ArrowRows, error) {
	rd, err := dataset.OpenIPC(path)
	if err != nil {
		return nil, err
	}
	a := &ArrowRows{path: path, rd: rd, cached: -1}
	if a.idx, err = packedColumns(rd.Schema()); err != nil {
		a.Close()
		return nil, fmt.Errorf("%s: not packed rows: %w", path, err)
	}
	n := 0
	for b := 0; b < rd.NumBatches(); b++ {
		a.starts = append(a.starts, n)
		rec, err := rd.Batch(b)
		if err != nil {
			a.Close()
			return nil, err
		}
		n += int(rec.NumRows())
		rec.Release()
	}
	a.starts = append(a.starts, n)
	return a, nil
}

// Len is the number of rows.
func (a *ArrowRows) Len() int { return a.starts[len(a.starts)-1] }

// Row reads row i.
func (a *ArrowRows) Row(i int) (PackedRow, error) {
	if i < 0 || i >= a.Len() {
		return PackedRow{}, fmt.Errorf("%s: row %d out of range [0, %d)", a.path, i, a.Len())
	}
	b := sort.SearchInts(a.starts, i+1) - 1
	if b != a.cached {
		rec, err := a.rd.Batch(b)
		if err != nil {
			return PackedRow{}, err
		}
		a.releaseBatch()
		a.rec, a.cached = rec, b
	}
	row, err := packedRow(a.rec, a.idx, i-a.starts[b])
	if err != nil {
		return PackedRow{}, fmt.Errorf("%s: row %d: %w", a.path, i, err)
	}
	return row, nil
}

func (a *ArrowRows) releaseBatch() {
	if a.rec != nil {
		a.rec.Release()
		a.rec, a.cached = nil, -1
	}
}

// Close releases the file.
func (a *ArrowRows) Close() error {
	a.releaseBatch()
	return a.rd.Close()
}
