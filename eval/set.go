package eval

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"math"
	"os"
	"slices"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/memory"
	"github.com/apache/arrow-go/v18/parquet/file"
	"github.com/apache/arrow-go/v18/parquet/pqarrow"

	"gemmaft/internal/lines"
)

// Question is one multiple-choice question.
type Question struct {
	Subject  string   `json:"subject,omitempty"`
	Question string   `json:"question"`
	Choices  []string `json:"choices"`
	// Answer is the index of the right choice.
	Answer int `json:"answer"`
	// Where says where the question was read ("data/set.jsonl:12"), the path
	// as given, so that a test set and a dev set of one name are told apart.
	Where string `json:"-"`
}

// Columns of a multiple-choice set: the names Columns maps from. Choices
// are either one list column or one column per letter (A, B, C, …).
const (
	ColQuestion = "question"
	ColChoices  = "choices"
	ColAnswer   = "answer"
	ColSubject  = "subject"
)

// MaxChoices is the most choices a question may have: one per letter.
const MaxChoices = 26

// Letter is the answer letter of choice i: A, B, C, …
func Letter(i int) string { return string(rune('A' + i)) }

// CheckColumns reports a Columns key that names none of a set's columns,
// two keys mapped to one file column, and choices mapped both as a list
// and as letters.
func CheckColumns(columns map[string]string) error {
	ours := slices.Sorted(maps.Keys(columns)) // one message, whatever the map's order
	byTheirs := map[string]string{}
	letters := ""
	for _, c := range ours {
		switch {
		case c == ColQuestion, c == ColChoices, c == ColAnswer, c == ColSubject:
		case len(c) == 1 && c[0] >= 'A' && c[0] <= 'Z':
			if letters == "" {
				letters = c
			}
		default:
			return fmt.Errorf("cannot map %q: the columns are question, choices (a list) or A, B, C, … (one per choice), answer and subject", c)
		}
		theirs := columns[c]
		if other, ok := byTheirs[theirs]; ok && theirs != "" {
			return fmt.Errorf("%s and %s are both mapped to %q: each names a column of its own", other, c, theirs)
		}
		byTheirs[theirs] = c
	}
	if _, list := columns[ColChoices]; list && letters != "" {
		return fmt.Errorf("choices and %s are both mapped: the choices are one list column (choices) or a column per letter (A, B, …), not both", letters)
	}
	return nil
}

// A setError is a question's flaw with what to do about it.
type setError struct{ msg, fix string }

func (e *setError) Error() string { return e.msg }

// Fix says what would mend the question.
func (e *setError) Fix() string { return e.fix }

func flaw(fix, format string, args ...any) error {
	return &setError{msg: fmt.Sprintf(format, args...), fix: fix}
}

// ReadQuestions reads multiple-choice questions from JSONL (optionally
// gzipped) and Parquet files, in order. columns maps the names above to
// the files' own (a name not in the map is its own). A question is a
// question text, its choices (a list column, or one column per letter, a
// trailing empty or missing one ending the list), the answer (a letter,
// or a 0-based index as an integer) and optionally a subject. Anything
// else is an error naming the file and line or row.
func ReadQuestions(paths []string, columns map[string]string) ([]Question, error) {
	return ReadQuestionsFrom(func(path string) (File, error) { return os.Open(path) }, paths, columns)
}

// A File is a set file as an Opener gives it: read in order (JSONL) or at
// offsets (Parquet).
type File interface {
	io.Reader
	io.ReaderAt
	io.Seeker
	io.Closer
}

// ReadQuestionsFrom is ReadQuestions reading the files through open.
func ReadQuestionsFrom(open func(path string) (File, error), paths []string, columns map[string]string) ([]Question, error) {
	if err := CheckColumns(columns); err != nil {
		return nil, err
	}
	col := func(ours string) string {
		if c, ok := columns[ours]; ok && c != "" {
			return c
		}
		return ours
	}
	var out []Question
	seen := map[string]bool{} // the files' columns
	var first []string        // the first file's, for messages
	for _, path := range paths {
		rows, err := readRows(open, path)
		if err != nil {
			return nil, err
		}
		if len(rows) == 0 {
			return nil, fmt.Errorf("%s: no questions", path)
		}
		if first == nil {
			first = slices.Sorted(maps.Keys(rows[0].values))
		}
		for _, r := range rows {
			for k := range r.values {
				seen[k] = true
			}
			q, err := r.question(col, columns)
			if err != nil {
				return nil, &RowError{Where: r.where, Err: err}
			}
			q.Where = r.where
			out = append(out, q)
		}
	}
	if err := checkMapped(seen, columns, paths, first); err != nil {
		return nil, err
	}
	return out, nil
}

// A RowError is a question the set holds that cannot be scored as it is:
// a field missing, empty or of another type, an answer outside its choices.
type RowError struct {
	Where string // "data/set.jsonl:12", "set.parquet row 3"
	Err   error
}

func (e *RowError) Error() string { return e.Where + ": " + e.Err.Error() }
func (e *RowError) Unwrap() error { return e.Err }

// checkMapped reports a column that columns names on purpose but that no
// row of the files has: a misspelt subject would otherwise be read as
// absent. (A choice column may be missing: the choices end before it.)
func checkMapped(seen map[string]bool, columns map[string]string, paths, first []string) error {
	for _, ours := range slices.Sorted(maps.Keys(columns)) {
		name := columns[ours]
		if name == "" || seen[name] || len(ours) == 1 && ours[0] >= 'A' && ours[0] <= 'Z' {
			continue
		}
		where := "its columns"
		if len(paths) > 1 {
			where = "the columns of " + paths[0]
		}
		return fmt.Errorf("%s: columns maps %s to %q, which no row has (%s: %s)", strings.Join(paths, ", "), ours, name, where, strings.Join(first, ", "))
	}
	return nil
}

// row is one record of a set file: values are strings, json.Number,
// []any, nil, or what else JSON decodes to.
type row struct {
	where  string
	values map[string]any
}

func (r row) question(col func(string) string, columns map[string]string) (Question, error) {
	var q Question
	text, ok, err := r.str(col(ColQuestion))
	if err != nil {
		return q, err
	}
	if !ok {
		return q, fmt.Errorf("no question (column %q)%s", col(ColQuestion), r.mapHint(ColQuestion, columns))
	}
	if strings.TrimSpace(text) == "" {
		return q, flaw("write the question, or leave the row out", "the question (column %q) is empty", col(ColQuestion))
	}
	q.Question = text
	if r.has(col(ColSubject)) { // a question without one is scored under NoSubject
		s, _, err := r.str(col(ColSubject))
		if err != nil {
			return q, err
		}
		q.Subject = s
	}
	if r.has(col(ColChoices)) {
		list, ok := r.values[col(ColChoices)].([]any)
		if !ok {
			return q, fmt.Errorf("column %q is not a list of choices", col(ColChoices))
		}
		for i, v := range list {
			s, ok := v.(string)
			if !ok {
				return q, fmt.Errorf("choice %s of column %q is %s, not a text", Letter(i), col(ColChoices), jsonText(v))
			}
			q.Choices = append(q.Choices, s)
		}
	} else {
		// Sets with fewer choices than columns leave the last ones empty;
		// an empty one before a filled one is a gap, not the end, and
		// scoring the question without the later choices would be wrong.
		gap := -1
		for i := 0; i < MaxChoices; i++ {
			s, ok, err := r.str(col(Letter(i)))
			if err != nil {
				return q, err
			}
			switch {
			case !ok || s == "":
				if gap < 0 {
					gap = i
				}
			case gap >= 0:
				return q, fmt.Errorf("choice %s is empty but choice %s after it is not; the choices are the columns %s, %s, … with no gap",
					Letter(gap), Letter(i), col("A"), col("B"))
			default:
				q.Choices = append(q.Choices, s)
			}
		}
		if len(q.Choices) == 0 {
			return q, fmt.Errorf("no choices: neither a list column %q nor columns %q, %q, … (map them with columns: {choices: NAME} or {A: NAME, B: NAME, …})",
				col(ColChoices), col("A"), col("B"))
		}
	}
	if len(q.Choices) < 2 {
		return q, flaw("give the question 2 or more choices, or leave it out", "%s; a question needs 2 or more", [...]string{"no choice", "one choice"}[len(q.Choices)])
	}
	if len(q.Choices) > MaxChoices {
		return q, fmt.Errorf("%d choices; at most %d (A to Z)", len(q.Choices), MaxChoices)
	}
	for i, c := range q.Choices {
		if strings.TrimSpace(c) == "" {
			return q, flaw("write the choice, or leave the question out", "choice %s is empty", Letter(i))
		}
	}
	a, ok := r.values[col(ColAnswer)]
	if !ok || a == nil {
		return q, fmt.Errorf("no answer (column %q)%s", col(ColAnswer), r.mapHint(ColAnswer, columns))
	}
	q.Answer, err = parseAnswer(a, len(q.Choices))
	return q, err
}

// parseAnswer reads an answer: a letter (A, b, …) or an integer index.
func parseAnswer(v any, n int) (int, error) {
	last := Letter(n - 1)
	fix := fmt.Sprintf("write the answer as the letter of one of the %d choices (\"A\" to \"%s\") or its index (0 to %d)", n, last, n-1)
	switch a := v.(type) {
	case string:
		s := strings.TrimSpace(a)
		if len(s) == 1 {
			c := s[0]
			if c >= 'a' && c <= 'z' {
				c -= 'a' - 'A'
			}
			if c >= 'A' && c <= 'Z' {
				i := int(c - 'A')
				if i >= n {
					return 0, flaw(fix, "answer %q is outside the %d choices (A to %s)", a, n, last)
				}
				return i, nil
			}
		}
		if _, err := strconv.Atoi(s); err == nil {
			// "1" may count from 0 or from 1: the set has to say.
			return 0, flaw(fix, "answer %q is a number written as text: an index is a JSON integer (0 for A), a letter a string (\"A\" to \"%s\")", a, last)
		}
		return 0, flaw(fix, "answer %q is not a letter (A to %s) nor an index (an integer from 0)", a, last)
	case json.Number:
		i, err := strconv.ParseInt(string(a), 10, 64)
		if err != nil {
			// 1.0: a column of integers that pandas stored as floats
			// (it does once one value is missing).
			f, ferr := strconv.ParseFloat(string(a), 64)
			if ferr != nil || f != math.Trunc(f) || math.Abs(f) > 1<<31 {
				return 0, flaw(fix, "answer %s is not an integer index", a)
			}
			i = int64(f)
		}
		if i < 0 || i >= int64(n) {
			return 0, flaw(fix, "answer %d is outside the %d choices (indices 0 to %d)", i, n, n-1)
		}
		return int(i), nil
	}
	return 0, flaw(fix, "answer %s is not a letter nor an index", jsonText(v))
}

// jsonText writes a value as JSON would, for messages: null, true, 3.
func jsonText(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Sprint(v)
	}
	return string(b)
}

func (r row) has(name string) bool {
	v, ok := r.values[name]
	return ok && v != nil
}

// str returns a text column; ok is false when it is absent or null.
func (r row) str(name string) (string, bool, error) {
	v, ok := r.values[name]
	if !ok || v == nil {
		return "", false, nil
	}
	s, isStr := v.(string)
	if !isStr {
		return "", false, fmt.Errorf("column %q holds %s, not a text", name, jsonText(v))
	}
	return s, true, nil
}

func (r row) mapHint(ours string, columns map[string]string) string {
	if _, mapped := columns[ours]; mapped {
		return ""
	}
	return fmt.Sprintf("; map the file's column with columns: {%s: NAME}", ours)
}

// readRows reads a set file by its extension.
func readRows(open func(string) (File, error), path string) ([]row, error) {
	f, err := open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	name := strings.ToLower(path)
	switch {
	case strings.HasSuffix(name, ".parquet"), strings.HasSuffix(name, ".pq"):
		return readParquetRows(f, path)
	case strings.HasSuffix(name, ".jsonl"), strings.HasSuffix(name, ".jsonl.gz"),
		strings.HasSuffix(name, ".ndjson"), strings.HasSuffix(name, ".ndjson.gz"),
		strings.HasSuffix(name, ".json"), strings.HasSuffix(name, ".json.gz"):
		return readJSONLRows(f, path)
	}
	return nil, fmt.Errorf("%s: unknown format: give a .jsonl, .ndjson or .json file (each may be gzipped: .gz) or a .parquet file", path)
}

func readJSONLRows(f io.Reader, path string) ([]row, error) {
	var src io.Reader = f
	if strings.HasSuffix(strings.ToLower(path), ".gz") {
		gz, err := gzip.NewReader(f)
		if err != nil {
			return nil, fmt.Errorf("%s: not a gzip file: %w", path, err)
		}
		defer gz.Close()
		src = gz
	}
	br := bufio.NewReaderSize(src, 64<<10)
	lines.SkipBOM(br)
	if first, err := firstByte(br); err == nil && first == '[' {
		return readJSONArray(br, path)
	}
	lr := lines.NewReader(br, 0)
	var rows []row
	for {
		line, err := lr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		b := bytes.TrimSpace(line)
		if len(b) == 0 {
			continue
		}
		where := fmt.Sprintf("%s:%d", path, lr.Line())
		if !utf8.Valid(b) {
			return nil, fmt.Errorf("%s: not UTF-8", where)
		}
		dec := json.NewDecoder(bytes.NewReader(b))
		dec.UseNumber()
		var v map[string]any
		if err := dec.Decode(&v); err != nil {
			return nil, fmt.Errorf("%s: not a JSON object: %w", where, err)
		}
		if dec.More() {
			return nil, fmt.Errorf("%s: more than one JSON value on the line", where)
		}
		rows = append(rows, row{where: where, values: v})
	}
	return rows, nil
}

// firstByte peeks at the first byte that is not white space, reading
// nothing: the lines are counted from the file's first.
func firstByte(br *bufio.Reader) (byte, error) {
	for i := 1; ; i++ {
		b, err := br.Peek(i)
		if len(b) < i {
			return 0, err
		}
		switch b[i-1] {
		case ' ', '\t', '\r', '\n':
			continue
		}
		return b[i-1], nil
	}
}

// readJSONArray reads a .json file holding one array of objects (what
// the Hugging Face hub often serves as .json).
func readJSONArray(r io.Reader, path string) ([]row, error) {
	dec := json.NewDecoder(r)
	dec.UseNumber()
	var vs []map[string]any
	if err := dec.Decode(&vs); err != nil {
		return nil, fmt.Errorf("%s: not a JSON array of objects: %w", path, err)
	}
	rows := make([]row, len(vs))
	for i, v := range vs {
		rows[i] = row{where: fmt.Sprintf("%s element .[%d]", path, i), values: v}
	}
	return rows, nil
}

func readParquetRows(f File, path string) ([]row, error) {
	rdr, err := file.NewParquetReader(f)
	if err != nil {
		return nil, fmt.Errorf("%s: not a readable Parquet file: %w", path, err)
	}
	defer rdr.Close()
	fr, err := pqarrow.NewFileReader(rdr, pqarrow.ArrowReadProperties{}, memory.DefaultAllocator)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	tbl, err := fr.ReadTable(context.Background())
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	defer tbl.Release()
	n := int(tbl.NumRows())
	rows := make([]row, n)
	for i := range rows {
		rows[i] = row{where: fmt.Sprintf("%s row index %d", path, i), values: map[string]any{}}
	}
	for c := 0; c < int(tbl.NumCols()); c++ {
		column := tbl.Column(c)
		name := column.Name()
		i := 0
		for _, chunk := range column.Data().Chunks() {
			for j := 0; j < chunk.Len(); j, i = j+1, i+1 {
				v, err := arrowValue(chunk, j)
				if err != nil {
					return nil, fmt.Errorf("%s row index %d: column %q: %w", path, i, name, err)
				}
				rows[i].values[name] = v
			}
		}
	}
	return rows, nil
}

// arrowValue converts one Parquet value to what JSON decoding would give.
func arrowValue(a arrow.Array, i int) (any, error) {
	if a.IsNull(i) {
		return nil, nil
	}
	switch x := a.(type) {
	case *array.String:
		return x.Value(i), nil
	case *array.LargeString:
		return x.Value(i), nil
	case *array.Binary:
		if !utf8.Valid(x.Value(i)) {
			return nil, errors.New("not UTF-8")
		}
		return string(x.Value(i)), nil
	case *array.Int8, *array.Int16, *array.Int32, *array.Int64, *array.Uint8, *array.Uint16, *array.Uint32, *array.Uint64:
		return json.Number(fmt.Sprint(x.GetOneForMarshal(i))), nil
	case *array.Float32:
		return json.Number(strconv.FormatFloat(float64(x.Value(i)), 'g', -1, 32)), nil
	case *array.Float64:
		return json.Number(strconv.FormatFloat(x.Value(i), 'g', -1, 64)), nil
	case array.ListLike:
		lo, hi := x.ValueOffsets(i)
		var out []any
		for j := lo; j < hi; j++ {
			v, err := arrowValue(x.ListValues(), int(j))
			if err != nil {
				return nil, err
			}
			out = append(out, v)
		}
		return out, nil
	}
	return a.GetOneForMarshal(i), nil
}
