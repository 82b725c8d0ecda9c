package dataset

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math"
	"slices"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/memory"
	"github.com/apache/arrow-go/v18/parquet/pqarrow"
)

// Column names of a question table: the fields of MT-Bench's
// question.jsonl that generation needs.
const (
	ColQuestionID = "question_id"
	ColCategory   = "category"
	ColTurns      = "turns"
)

// Question is one record of an MT-Bench question file: the user's turns,
// asked one after the other in one conversation, each after the model's
// answer to the one before.
type Question struct {
	// ID is the question_id as the file writes it: an int64 (MT-Bench's
	// are integers) or a string. FastChat's judge matches answers to
	// questions by id, type included, so it is carried as it is.
	ID       any
	Category string
	Turns    []string
}

// ReadQuestions reads MT-Bench question files: JSON lines, or one JSON
// array (optionally .gz), of {"question_id", "category", "turns": [...]},
// or Parquet files of those columns (turns a list of strings); other fields
// (MT-Bench's reference answers) are ignored. Every question needs an id
// and at least one non-empty turn; ids are all integers or all strings, and
// unique across the files. limit > 0 stops after that many questions.
// open, when not nil, opens the files (as SourceOptions.Open does) instead
// of os.Open.
func ReadQuestions(paths []string, limit int64, open func(path string) (fs.File, error)) ([]Question, error) {
	if len(paths) == 0 {
		return nil, errors.New("dataset: no question files")
	}
	var out []Question
	seen := map[any]string{} // id → where it was first seen
	var idKind, idKindAt string
	// add reads one record, at names its place; it returns false once the
	// limit is reached.
	add := func(record []byte, at string) (bool, error) {
		q, err := parseQuestion(record)
		if err != nil {
			return false, fmt.Errorf("dataset: %s: %w", at, err)
		}
		kind := "an integer"
		if _, ok := q.ID.(string); ok {
			kind = "a string"
		}
		if idKind == "" {
			idKind, idKindAt = kind, at
		} else if kind != idKind {
			return false, fmt.Errorf("dataset: %s: question_id is %s, but at %s it is %s; FastChat matches answers to questions by id, so keep one type",
				at, kind, idKindAt, idKind)
		}
		if first, dup := seen[q.ID]; dup {
			return false, fmt.Errorf("dataset: %s: question_id %v again (first at %s)", at, q.ID, first)
		}
		seen[q.ID] = at
		out = append(out, q)
		return limit <= 0 || int64(len(out)) < limit, nil
	}
	opener := SourceOptions{Open: open}.opener()
	for _, path := range paths {
		if limit > 0 && int64(len(out)) >= limit {
			break
		}
		format, err := SniffFormat(opener, path)
		if err != nil {
			return nil, fmt.Errorf("dataset: %w", err)
		}
		read := readJSONQuestions
		if format == FormatParquet {
			read = readParquetQuestions
		}
		if err := read(opener, path, add); err != nil {
			return nil, err
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("dataset: %s: no questions", strings.Join(paths, ", "))
	}
	return out, nil
}

// readJSONQuestions passes each record of a JSON lines or JSON array file
// to add, until add says stop.
func readJSONQuestions(open openFunc, path string, add func(record []byte, at string) (bool, error)) error {
	jf := &jsonlFile{open: open, name: path, gz: strings.HasSuffix(strings.ToLower(path), ".gz")}
	if err := jf.detectArray(); err != nil {
		return err
	}
	lr, err := jf.records()
	if err != nil {
		return err
	}
	defer lr.close()
	for {
		line, err := lr.next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		if more, err := add(line, path+": "+jf.where(lr.at())); err != nil || !more {
			return err
		}
	}
}

// readParquetQuestions passes each row of a Parquet file to add, as the
// JSON object of its columns (question sets are small: read whole).
func readParquetQuestions(open openFunc, path string, add func(record []byte, at string) (bool, error)) error {
	pf := &parquetFile{open: open, name: path}
	f, err := pf.openFile()
	if err != nil {
		return err
	}
	defer f.Close()
	rdr, err := openParquetReader(f, nil)
	if err != nil {
		return fmt.Errorf("dataset: %s: not a readable Parquet file (corrupt or truncated?): %w", path, err)
	}
	defer rdr.Close()
	fr, err := pqarrow.NewFileReader(rdr, pqarrow.ArrowReadProperties{}, memory.DefaultAllocator)
	if err != nil {
		return fmt.Errorf("dataset: %s: reading the Parquet schema: %w", path, err)
	}
	tbl, err := fr.ReadTable(context.Background())
	if err != nil {
		return fmt.Errorf("dataset: %s: %w", path, err)
	}
	defer tbl.Release()
	tr := array.NewTableReader(tbl, 1024)
	defer tr.Release()
	enc := newRowEncoder(tbl.Schema())
	row := 0
	for tr.Next() {
		rec := tr.RecordBatch()
		for i := range int(rec.NumRows()) {
			line := enc.appendRow(nil, rec, i) // add may keep it
			if more, err := add(line, fmt.Sprintf("%s: row index %d", path, row)); err != nil || !more {
				return err
			}
			row++
		}
	}
	return tr.Err()
}

func parseQuestion(line []byte) (Question, error) {
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(line, &obj); err != nil || obj == nil {
		var se *json.SyntaxError
		var te *json.UnmarshalTypeError
		switch {
		case err == nil:
			err = errors.New("null")
		case errors.As(err, &se):
			err = fmt.Errorf("%v (at byte %d of the line)", err, se.Offset)
		case errors.As(err, &te):
			return Question{}, fmt.Errorf("%s, not a JSON object", JSONKind(line[0]))
		}
		return Question{}, fmt.Errorf("not a JSON object: %v", err)
	}
	var q Question
	raw, ok := obj[ColQuestionID]
	if !ok {
		return q, fmt.Errorf("no %s; the record has fields %s (a question file holds %s, %s and %s)",
			ColQuestionID, quoteList(keysOf(obj)), ColQuestionID, ColCategory, ColTurns)
	}
	switch {
	case len(raw) > 0 && raw[0] == '"':
		var s string
		if err := json.Unmarshal(raw, &s); err != nil || s == "" {
			return q, fmt.Errorf("%s %s is not a non-empty string", ColQuestionID, raw)
		}
		q.ID = s
	default:
		n, err := strconv.ParseInt(string(raw), 10, 64)
		if err != nil {
			// 81.0: an integer column pandas wrote as floats.
			f, ferr := strconv.ParseFloat(string(raw), 64)
			if ferr != nil || f != math.Trunc(f) || math.Abs(f) >= 1<<53 {
				return q, fmt.Errorf("%s %s is neither an integer nor a string", ColQuestionID, raw)
			}
			n = int64(f)
		}
		q.ID = n
	}
	if raw, ok := obj[ColCategory]; ok && string(raw) != "null" {
		if err := json.Unmarshal(raw, &q.Category); err != nil {
			return q, fmt.Errorf("%s %s is not a string", ColCategory, raw)
		}
	}
	raw, ok = obj[ColTurns]
	if !ok {
		return q, fmt.Errorf("question %v has no %s (the list of user turns)", q.ID, ColTurns)
	}
	if !utf8.Valid(raw) {
		return q, fmt.Errorf("question %v: %s is not valid UTF-8", q.ID, ColTurns)
	}
	var turns []json.RawMessage
	if err := json.Unmarshal(raw, &turns); err != nil {
		return q, fmt.Errorf("question %v: %s is %s, not a list of strings", q.ID, ColTurns, JSONKind(raw[0]))
	}
	q.Turns = make([]string, len(turns))
	for i, t := range turns {
		if err := json.Unmarshal(t, &q.Turns[i]); err != nil || string(t) == "null" {
			return q, fmt.Errorf("question %v: turn %d of %s is %s, not a string", q.ID, i+1, ColTurns, JSONKind(t[0]))
		}
	}
	if len(q.Turns) == 0 {
		return q, fmt.Errorf("question %v: %s is empty", q.ID, ColTurns)
	}
	for i, t := range q.Turns {
		if strings.TrimSpace(t) == "" {
			return q, fmt.Errorf("question %v: turn %d is empty", q.ID, i+1)
		}
	}
	return q, nil
}

func keysOf(obj map[string]json.RawMessage) []string {
	keys := make([]string, 0, len(obj))
	for k := range obj {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// QuestionSchema is the schema of a question table: question_id (int64
// or string, as intIDs says), category and turns (a list of strings).
func QuestionSchema(intIDs bool) *arrow.Schema {
	id := arrow.DataType(arrow.BinaryTypes.String)
	if intIDs {
		id = arrow.PrimitiveTypes.Int64
	}
	return arrow.NewSchema([]arrow.Field{
		{Name: ColQuestionID, Type: id},
		{Name: ColCategory, Type: arrow.BinaryTypes.String},
		{Name: ColTurns, Type: arrow.ListOf(arrow.BinaryTypes.String)},
	}, nil)
}

// QuestionsRecord builds the question table of qs (whose ids are all of
// one type, as ReadQuestions returns them).
func QuestionsRecord(qs []Question, mem memory.Allocator) arrow.RecordBatch {
	if mem == nil {
		mem = memory.NewGoAllocator()
	}
	intIDs := len(qs) == 0
	if len(qs) > 0 {
		_, intIDs = qs[0].ID.(int64)
	}
	b := array.NewRecordBuilder(mem, QuestionSchema(intIDs))
	defer b.Release()
	cat := b.Field(1).(*array.StringBuilder)
	turns := b.Field(2).(*array.ListBuilder)
	tv := turns.ValueBuilder().(*array.StringBuilder)
	for _, q := range qs {
		AppendQuestionID(b.Field(0), q.ID)
		cat.Append(q.Category)
		turns.Append(true)
		for _, t := range q.Turns {
			tv.Append(t)
		}
	}
	return b.NewRecordBatch()
}

// AppendQuestionID appends an id (int64 or string) to a question_id
// column's builder, converting between the two where it must.
func AppendQuestionID(b array.Builder, id any) {
	switch b := b.(type) {
	case *array.Int64Builder:
		n, _ := id.(int64)
		b.Append(n)
	case *array.StringBuilder:
		b.Append(fmt.Sprint(id))
	}
}

// QuestionIDAt returns row i of a question_id column: an int64 for an
// integer column, a string for a string column.
func QuestionIDAt(col arrow.Array, i int) (any, error) {
	switch c := col.(type) {
	case *array.Int64:
		return c.Value(i), nil
	case *array.Int32:
		return int64(c.Value(i)), nil
	case *array.Float64: // integers pandas wrote as floats
		if f := c.Value(i); f == math.Trunc(f) && math.Abs(f) < 1<<53 {
			return int64(f), nil
		}
		return nil, fmt.Errorf("%s %v is not a whole number", ColQuestionID, c.Value(i))
	case *array.String:
		return c.Value(i), nil
	case *array.LargeString:
		return c.Value(i), nil
	}
	return nil, fmt.Errorf("column %s is %s; want integers or strings", ColQuestionID, col.DataType())
}
