package dataset

import (
	"compress/gzip"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
)

func writeText(t *testing.T, dir, name, text string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestReadQuestions(t *testing.T) {
	dir := t.TempDir()
	a := writeText(t, dir, "a.jsonl", `{"question_id": 81, "category": "writing", "turns": ["Bir şiir yaz.", "Kısalt."], "reference": ["x"]}

{"question_id": 82, "category": "math", "turns": ["2+2?"]}
`)
	var gz strings.Builder
	zw := gzip.NewWriter(&gz)
	zw.Write([]byte(`{"question_id": 90, "turns": ["Üç soru"]}` + "\n"))
	zw.Close()
	b := writeText(t, dir, "b.jsonl.gz", gz.String())
	qs, err := ReadQuestions([]string{a, b}, 0, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(qs) != 3 || qs[0].ID != int64(81) || qs[0].Category != "writing" || len(qs[0].Turns) != 2 || qs[0].Turns[0] != "Bir şiir yaz." ||
		qs[2].ID != int64(90) || qs[2].Category != "" {
		t.Fatalf("questions: %+v", qs)
	}
	if qs, _ := ReadQuestions([]string{a, b}, 2, nil); len(qs) != 2 {
		t.Errorf("limit 2 read %d", len(qs))
	}

	rec := QuestionsRecord(qs, nil)
	defer rec.Release()
	if rec.Schema().String() != QuestionSchema(true).String() || rec.NumRows() != 3 {
		t.Fatalf("table: %v", rec.Schema())
	}
	id, err := QuestionIDAt(rec.Column(0), 1)
	turns := rec.Column(2).(*array.List)
	lo, hi := turns.ValueOffsets(0)
	if err != nil || id != int64(82) || hi-lo != 2 || turns.ListValues().(*array.String).Value(int(lo)+1) != "Kısalt." {
		t.Errorf("table rows: id %v (%v), turns %d", id, err, hi-lo)
	}

	// One JSON array reads as the same questions; errors name the element.
	arr := writeText(t, dir, "arr.json", `[{"question_id": 81, "category": "writing", "turns": ["Bir şiir yaz.", "Kısalt."]},
 {"question_id": 82, "category": "math", "turns": ["2+2?"]}]`)
	if got, err := ReadQuestions([]string{arr}, 0, nil); err != nil || fmt.Sprint(got) != fmt.Sprint(qs[:2]) {
		t.Errorf("a JSON array: %v %v, want %v", got, err, qs[:2])
	}
	bad := writeText(t, dir, "bad.json", `[{"question_id": 1, "turns": ["a"]}, {"question_id": 1, "turns": ["b"]}]`)
	if _, err := ReadQuestions([]string{bad}, 0, nil); err == nil || !strings.Contains(err.Error(), bad+": element .[1]: question_id 1 again (first at "+bad+": element .[0])") {
		t.Errorf("a repeated id in an array: %v", err)
	}

	// pandas writes an integer column with a gap as floats.
	f := writeText(t, dir, "f.jsonl", `{"question_id": 81.0, "turns": ["a"]}`+"\n")
	if qs, err := ReadQuestions([]string{f}, 0, nil); err != nil || qs[0].ID != int64(81) {
		t.Errorf("question_id 81.0: %v %v", qs, err)
	}

	s := writeText(t, dir, "s.jsonl", `{"question_id": "tr-1", "category": "reasoning", "turns": ["a", "b"]}`+"\n")
	qs, err = ReadQuestions([]string{s}, 0, nil)
	if err != nil || qs[0].ID != "tr-1" {
		t.Fatalf("string ids: %v %v", qs, err)
	}
	rec2 := QuestionsRecord(qs, nil)
	defer rec2.Release()
	if id, _ := QuestionIDAt(rec2.Column(0), 0); id != "tr-1" {
		t.Errorf("string id in the table: %v", id)
	}
}

func TestReadQuestionsErrors(t *testing.T) {
	dir := t.TempDir()
	cases := map[string]struct{ text, want string }{
		"no id":         {`{"category": "x", "turns": ["a"]}`, `no question_id; the record has fields "category", "turns"`},
		"float id":      {`{"question_id": 1.5, "turns": ["a"]}`, "question_id 1.5 is neither an integer nor a string"},
		"no turns":      {`{"question_id": 1, "instruction": "a"}`, "question 1 has no turns"},
		"turns string":  {`{"question_id": 1, "turns": "a"}`, "turns is a string, not a list of strings"},
		"turn a number": {`{"question_id": 1, "turns": ["a", 42]}`, "question 1: turn 2 of turns is a number, not a string"},
		"turn null":     {`{"question_id": 1, "turns": [null]}`, "turn 1 of turns is null, not a string"},
		"broken json":   {`{"question_id": 1, "turns": ["a"]`, "line 1: not a JSON object: unexpected end of JSON input"},
		"bad literal":   {`{"question_id": 1, "turns": [hello]}`, "(at byte 30 of the line)"},
		"empty turns":   {`{"question_id": 1, "turns": []}`, "turns is empty"},
		"empty turn":    {`{"question_id": 1, "turns": ["a", " "]}`, "turn 2 is empty"},
		"not an object": {`[1, 2]`, "element .[0]: a number, not a JSON object"},
		"a string line": {`"soru"`, "line 1: a string, not a JSON object"},
		"duplicate id":  {"{\"question_id\": 3, \"turns\": [\"a\"]}\n{\"question_id\": 3, \"turns\": [\"b\"]}", "line 2: question_id 3 again (first at"},
		"mixed ids":     {"{\"question_id\": 3, \"turns\": [\"a\"]}\n{\"question_id\": \"4\", \"turns\": [\"b\"]}", "question_id is a string, but at"},
		"no questions":  {"\n\n", "no questions"},
		"bad utf-8":     {"{\"question_id\": 1, \"turns\": [\"\xff\"]}", "not valid UTF-8"},
	}
	for name, c := range cases {
		p := writeText(t, dir, strings.ReplaceAll(name, " ", "_")+".jsonl", c.text)
		_, err := ReadQuestions([]string{p}, 0, nil)
		if err == nil || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), p) {
			t.Errorf("%s: %v, want %q and the file", name, err, c.want)
		}
	}
}

// TestDemoQuestions: the project's own questions are at least ten, two
// turns each, across MT-Bench's categories, in Turkish.
func TestDemoQuestions(t *testing.T) {
	qs, err := ReadQuestions([]string{filepath.Join("demo", "mt-bench-tr-demo.jsonl")}, 0, nil)
	if err != nil {
		t.Fatal(err)
	}
	cats := map[string]int{}
	var text strings.Builder
	for _, q := range qs {
		if len(q.Turns) != 2 {
			t.Errorf("question %v has %d turns", q.ID, len(q.Turns))
		}
		cats[q.Category]++
		text.WriteString(strings.Join(q.Turns, " "))
	}
	if len(qs) < 10 || len(cats) < 6 {
		t.Errorf("%d questions in %d categories", len(qs), len(cats))
	}
	for _, c := range []string{"writing", "reasoning", "math", "coding", "extraction", "humanities"} {
		if cats[c] == 0 {
			t.Errorf("no %s question", c)
		}
	}
	for _, letter := range []string{"ç", "ğ", "ı", "ö", "ş", "ü", "İ"} {
		if !strings.Contains(text.String(), letter) {
			t.Errorf("the questions never use %q", letter)
		}
	}
}

// TestReadQuestionsParquet: MT-Bench questions as a Parquet file (turns a
// list column, as datasets on the Hub store them) read as the same
// questions JSON lines give; a bad row is named by its number.
func TestReadQuestionsParquet(t *testing.T) {
	fields := []arrow.Field{
		{Name: "question_id", Type: arrow.PrimitiveTypes.Int64},
		{Name: "category", Type: arrow.BinaryTypes.String, Nullable: true},
		{Name: "turns", Type: arrow.ListOf(arrow.BinaryTypes.String)},
		{Name: "reference", Type: arrow.ListOf(arrow.BinaryTypes.String), Nullable: true},
	}
	write := func(name string, rows [][]string) string {
		return writeParquet(t, name, fields, func(b *array.RecordBuilder) {
			for i, turns := range rows {
				b.Field(0).(*array.Int64Builder).Append(int64(81 + i))
				if i == 1 {
					b.Field(1).(*array.StringBuilder).AppendNull()
				} else {
					b.Field(1).(*array.StringBuilder).Append("writing")
				}
				lb := b.Field(2).(*array.ListBuilder)
				lb.Append(true)
				for _, turn := range turns {
					lb.ValueBuilder().(*array.StringBuilder).Append(turn)
				}
				b.Field(3).(*array.ListBuilder).AppendNull()
			}
		})
	}
	pq := write("q.parquet", [][]string{{"Bir şiir yaz.", "Kısalt."}, {"<b>2+2</b> & 3?"}})
	qs, err := ReadQuestions([]string{pq}, 0, nil)
	if err != nil {
		t.Fatal(err)
	}
	want := []Question{{ID: int64(81), Category: "writing", Turns: []string{"Bir şiir yaz.", "Kısalt."}}, {ID: int64(82), Turns: []string{"<b>2+2</b> & 3?"}}}
	if fmt.Sprint(qs) != fmt.Sprint(want) {
		t.Errorf("read %v, want %v", qs, want)
	}
	if qs, err := ReadQuestions([]string{pq}, 1, nil); err != nil || len(qs) != 1 {
		t.Errorf("limit 1: %v, %v", qs, err)
	}
	bad := write("bad.parquet", [][]string{{"Bir şiir yaz."}, {}})
	if _, err := ReadQuestions([]string{bad}, 0, nil); err == nil || !strings.Contains(err.Error(), bad+": row index 1: question 82: turns is empty") {
		t.Errorf("a question without turns: %v", err)
	}
}
