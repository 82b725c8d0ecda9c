package dataset

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/memory"
	"github.com/apache/arrow-go/v18/parquet"
	"github.com/apache/arrow-go/v18/parquet/pqarrow"

	"gemmaft/internal/testenv"
)

const alpacaRows = 20748

// turkishColumns maps our columns to the names of the Hugging Face shards.
var turkishColumns = map[string]string{
	ColInstruction: "instruction-turkish",
	ColInput:       "input-turkish",
	ColOutput:      "output-turkish",
}

// readAll reads every row of a source as string tuples, checking the
// batches' schema and that no value is null.
func readAll(t testing.TB, opts SourceOptions) [][]string {
	t.Helper()
	s, err := Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	rows, err := drain(s)
	if err != nil {
		t.Fatal(err)
	}
	return rows
}

func drain(s *Source) ([][]string, error) {
	var rows [][]string
	for {
		rec, err := s.Next(context.Background())
		if err == io.EOF {
			return rows, nil
		}
		if err != nil {
			return rows, err
		}
		if !rec.Schema().Equal(s.Schema()) {
			return nil, fmt.Errorf("batch schema %v, want %v", rec.Schema(), s.Schema())
		}
		for i := range int(rec.NumRows()) {
			row := make([]string, rec.NumCols())
			for c := range row {
				col := rec.Column(c).(*array.String)
				if col.IsNull(i) {
					return nil, fmt.Errorf("null in column %d", c)
				}
				row[c] = col.Value(i)
			}
			rows = append(rows, row)
		}
		rec.Release()
	}
}

// readThrough reads every batch of s, of any layout, and drops them.
func readThrough(t *testing.T, s *Source) {
	t.Helper()
	for {
		rec, err := s.Next(context.Background())
		if err == io.EOF {
			return
		}
		if err != nil {
			t.Fatal(err)
		}
		rec.Release()
	}
}

func digest(rows [][]string) [32]byte {
	h := sha256.New()
	for _, r := range rows {
		for _, v := range r {
			fmt.Fprintf(h, "%d:%s", len(v), v)
		}
	}
	return [32]byte(h.Sum(nil))
}

// TestAlpacaLayoutsAgree reads the same records from the three encodings
// (one Parquet file, two Hugging Face style shards with Turkish column names,
// gzipped JSONL) and requires identical rows in identical order.
func TestAlpacaLayoutsAgree(t *testing.T) {
	dir := testenv.AlpacaTR(t, "")
	single := readAll(t, SourceOptions{Paths: []string{filepath.Join(dir, "parquet", "alpaca-tr.parquet")}})
	shards, err := ExpandGlobs(dir, []string{"parquet/train-*.parquet"})
	if err != nil {
		t.Fatal(err)
	}
	sharded := readAll(t, SourceOptions{Paths: shards, Columns: turkishColumns, BatchRows: 777})
	jsonl := readAll(t, SourceOptions{Paths: []string{filepath.Join(dir, "alpaca-tr.jsonl.gz")}})

	if len(single) != alpacaRows {
		t.Fatalf("single Parquet: %d rows, want %d", len(single), alpacaRows)
	}
	for name, rows := range map[string][][]string{"shards": sharded, "jsonl": jsonl} {
		if len(rows) != len(single) {
			t.Fatalf("%s: %d rows, want %d", name, len(rows), len(single))
		}
		for i := range rows {
			if !slices.Equal(rows[i], single[i]) {
				t.Fatalf("%s: row %d differs:\n%q\nvs Parquet\n%q", name, i, rows[i], single[i])
			}
		}
	}
	if single[0][0] == "" || single[0][2] == "" {
		t.Errorf("first record has empty fields: %q", single[0])
	}
}

func TestRowsKnown(t *testing.T) {
	dir := testenv.AlpacaTR(t, "")
	s, err := Open(SourceOptions{Paths: []string{filepath.Join(dir, "parquet", "alpaca-tr.parquet")}, Limit: 100})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if n, known := s.Rows(); n != 100 || !known {
		t.Errorf("Rows() = %d, %v; want 100, true", n, known)
	}
	j, err := Open(SourceOptions{Paths: []string{filepath.Join(dir, "alpaca-tr.jsonl.gz")}})
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	if _, known := j.Rows(); known {
		t.Errorf("JSONL without shuffle claims a known row count")
	}
}

func TestLimitAndShuffle(t *testing.T) {
	dir := testenv.AlpacaTR(t, "")
	path := filepath.Join(dir, "parquet", "alpaca-tr.parquet")
	all := readAll(t, SourceOptions{Paths: []string{path}})

	first := readAll(t, SourceOptions{Paths: []string{path}, Limit: 300, BatchRows: 64})
	if len(first) != 300 || digest(first) != digest(all[:300]) {
		t.Fatalf("limit without shuffle: got %d rows, not the first 300", len(first))
	}

	// Several passes (a small memory bound) must still give a permutation.
	shuffled := readAll(t, SourceOptions{Paths: []string{path}, Shuffle: true, Seed: 7, ShuffleMemory: 4 << 20})
	again := readAll(t, SourceOptions{Paths: []string{path}, Shuffle: true, Seed: 7, ShuffleMemory: 4 << 20})
	other := readAll(t, SourceOptions{Paths: []string{path}, Shuffle: true, Seed: 8, ShuffleMemory: 4 << 20})
	if digest(shuffled) != digest(again) {
		t.Error("same seed gave a different order")
	}
	if digest(shuffled) == digest(other) {
		t.Error("different seeds gave the same order")
	}
	if digest(shuffled) == digest(all) {
		t.Error("shuffle left the order unchanged")
	}
	key := func(r []string) string { return strings.Join(r, "\x00") }
	sortedKeys := func(rows [][]string) []string {
		k := make([]string, len(rows))
		for i, r := range rows {
			k[i] = key(r)
		}
		slices.Sort(k)
		return k
	}
	if !slices.Equal(sortedKeys(shuffled), sortedKeys(all)) {
		t.Fatal("shuffled rows are not a permutation of the input")
	}

	// The file is sorted by origin: 748 general records, then medical ones
	// sharing one instruction. A shuffled sample must mix both.
	sample := readAll(t, SourceOptions{Paths: []string{path}, Shuffle: true, Seed: 1, Limit: 500})
	medical := 0
	for _, r := range sample {
		if strings.HasPrefix(r[0], "Eğer bir doktor iseniz") {
			medical++
		}
	}
	// Expected 500*20000/20748 = 482, with a standard deviation near 4.
	if len(sample) != 500 || medical < 455 || medical > 499 {
		t.Errorf("shuffled sample of %d rows has %d medical records; want about 482", len(sample), medical)
	}
}

// TestShuffleUniform checks that the multi-pass shuffle is a uniform
// permutation: over many seeds, every row lands in every position about
// equally often.
func TestShuffleUniform(t *testing.T) {
	const n, seeds = 5, 4000
	path := writeJSONL(t, n)
	counts := [n][n]int{}
	for seed := range uint64(seeds) {
		rows := readAll(t, SourceOptions{Paths: []string{path}, Shuffle: true, Seed: seed, ShuffleMemory: 1})
		if len(rows) != n {
			t.Fatalf("seed %d: %d rows", seed, len(rows))
		}
		for pos, r := range rows {
			var orig int
			fmt.Sscanf(r[0], "talimat %d", &orig)
			counts[orig][pos]++
		}
	}
	// Each cell is Binomial(4000, 1/5): mean 800, standard deviation 25.3.
	for orig := range n {
		for pos := range n {
			if c := counts[orig][pos]; c < 800-6*25 || c > 800+6*25 {
				t.Errorf("row %d landed at position %d %d times; want about 800", orig, pos, c)
			}
		}
	}
}

func writeJSONL(t *testing.T, n int) string {
	t.Helper()
	var b strings.Builder
	for i := range n {
		fmt.Fprintf(&b, "{\"instruction\":\"talimat %d\",\"input\":\"\",\"output\":\"yanıt %d\"}\n", i, i)
	}
	path := filepath.Join(t.TempDir(), "rows.jsonl")
	if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestSystemColumnAndText(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "s.jsonl")
	data := `{"instruction":"Selam ver.","input":null,"output":"Merhaba!","sys":"Kibar ol."}
{"instruction":"Say.","input":"1, 2","output":"3","sys":null}
`
	if err := os.WriteFile(path, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
	rows := readAll(t, SourceOptions{Paths: []string{path}, SystemColumn: "sys"})
	want := [][]string{{"Selam ver.", "", "Merhaba!", "Kibar ol."}, {"Say.", "1, 2", "3", ""}}
	if !slices.EqualFunc(rows, want, slices.Equal) {
		t.Errorf("system column: got %q, want %q", rows, want)
	}
	rows = readAll(t, SourceOptions{Paths: []string{path}, SystemText: "Türkçe yanıtla."})
	if len(rows) != 2 || rows[0][3] != "Türkçe yanıtla." || rows[1][3] != "Türkçe yanıtla." {
		t.Errorf("system text: got %q", rows)
	}
	// Both: the text is the default of records without their own, null
	// or (in JSON) missing, which are then no nulls to report.
	os.WriteFile(path, []byte(data+`{"instruction":"Bir.","input":"","output":"İki."}`+"\n"), 0o644)
	s, err := Open(SourceOptions{Paths: []string{path}, SystemColumn: "sys", SystemText: "Türkçe yanıtla.", Nulls: NullsError})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	rows, err = drain(s)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, r := range rows {
		got = append(got, r[3])
	}
	if !slices.Equal(got, []string{"Kibar ol.", "Türkçe yanıtla.", "Türkçe yanıtla."}) || len(s.Nulls().Columns) != 1 {
		t.Errorf("system column with a default: %q, nulls %v (want the input's alone)", got, s.Nulls().Columns)
	}
	// Without a default, a record without the field has no system text: no
	// null for nulls: drop to drop (an explicit null still is one).
	rows = readAll(t, SourceOptions{Paths: []string{path}, SystemColumn: "sys", Nulls: NullsDrop})
	if len(rows) != 2 || rows[1][0] != "Bir." || rows[1][3] != "" {
		t.Errorf("system column, nulls: drop: got %q, want the first and the last record", rows)
	}
}

// writeParquet writes one record batch built from cols to a Parquet file.
func writeParquet(t *testing.T, name string, fields []arrow.Field, build func(b *array.RecordBuilder)) string {
	t.Helper()
	b := array.NewRecordBuilder(memory.DefaultAllocator, arrow.NewSchema(fields, nil))
	defer b.Release()
	build(b)
	rec := b.NewRecordBatch()
	defer rec.Release()
	path := filepath.Join(t.TempDir(), name)
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	w, err := pqarrow.NewFileWriter(rec.Schema(), f, parquet.NewWriterProperties(), pqarrow.DefaultWriterProps())
	if err != nil {
		t.Fatal(err)
	}
	if rec.NumRows() > 0 {
		if err := w.Write(rec); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return path
}

var alpacaFields = []arrow.Field{
	{Name: "instruction", Type: arrow.BinaryTypes.String, Nullable: true},
	{Name: "input", Type: arrow.BinaryTypes.String, Nullable: true},
	{Name: "output", Type: arrow.BinaryTypes.String, Nullable: true},
}

func appendStrings(b *array.RecordBuilder, rows ...[3]string) {
	for _, r := range rows {
		for c, v := range r {
			if v == "<null>" {
				b.Field(c).AppendNull()
			} else {
				b.Field(c).(*array.StringBuilder).Append(v)
			}
		}
	}
}

func TestParquetNullsBecomeEmpty(t *testing.T) {
	path := writeParquet(t, "n.parquet", alpacaFields, func(b *array.RecordBuilder) {
		appendStrings(b, [3]string{"Bir", "<null>", "iki"}, [3]string{"Üç", "dört", "beş"})
	})
	rows := readAll(t, SourceOptions{Paths: []string{path}})
	want := [][]string{{"Bir", "", "iki"}, {"Üç", "dört", "beş"}}
	if !slices.EqualFunc(rows, want, slices.Equal) {
		t.Errorf("got %q, want %q", rows, want)
	}
}

// TestUnreadSystem: records with a system text of their own, which a
// source without system_column leaves out of every conversation, are
// named; read, they are not.
func TestUnreadSystem(t *testing.T) {
	jl := writeFile(t, "s.jsonl", `{"system": "Kısa yanıt ver.", "instruction": "Bir", "output": "iki"}`+"\n")
	conv := writeFile(t, "c.jsonl", `{"system": "Kısa yanıt ver.", "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}`+"\n")
	plain := writeFile(t, "p.jsonl", `{"system": "", "instruction": "Bir", "output": "iki"}`+"\n")
	// The system text in a later record only, found as the records are read.
	later := writeFile(t, "l.jsonl", `{"instruction": "Bir", "output": "iki"}`+"\n"+`{"system": "Kısa yanıt ver.", "instruction": "Üç", "output": "dört"}`+"\n")
	pq := writeParquet(t, "s.parquet", append(slices.Clone(alpacaFields), arrow.Field{Name: "system", Type: arrow.BinaryTypes.String}), func(b *array.RecordBuilder) {
		appendStrings(b, [3]string{"Bir", "", "iki"})
		b.Field(3).(*array.StringBuilder).Append("Kısa yanıt ver.")
	})
	for _, c := range []struct {
		opts SourceOptions
		want []string
	}{
		{SourceOptions{Paths: []string{jl, plain, pq}}, []string{jl, pq}},
		{SourceOptions{Paths: []string{conv}, Layout: LayoutShareGPT}, []string{conv}},
		{SourceOptions{Paths: []string{jl, pq}, SystemColumn: "system"}, nil},
		{SourceOptions{Paths: []string{later, plain}}, []string{later}},
	} {
		s, err := Open(c.opts)
		if err != nil {
			t.Fatal(err)
		}
		readThrough(t, s)
		if got := s.UnreadSystem(); !slices.Equal(got, c.want) {
			t.Errorf("%v: unread %v, want %v", c.opts.Paths, got, c.want)
		}
		s.Close()
	}
}

// TestUnreadInput: records without an input field but with one that looks
// like it (Dolly's context, an unmapped input-turkish) are named with it;
// mapped, or without such a field, they are not.
func TestUnreadInput(t *testing.T) {
	dolly := writeFile(t, "d.jsonl", `{"instruction": "Özetle.", "context": "Uzun bir metin.", "response": "Kısa."}`+"\n")
	plain := writeFile(t, "p.jsonl", `{"instruction": "Bir", "output": "iki", "input_ids": [1, 2]}`+"\n")
	tr := []arrow.Field{{Name: "instruction-turkish", Type: arrow.BinaryTypes.String}, {Name: "input-turkish", Type: arrow.BinaryTypes.String}, {Name: "output-turkish", Type: arrow.BinaryTypes.String}}
	pq := writeParquet(t, "tr.parquet", tr, func(b *array.RecordBuilder) { appendStrings(b, [3]string{"Bir", "girdi", "iki"}) })
	for _, c := range []struct {
		opts SourceOptions
		want map[string]string
	}{
		{SourceOptions{Paths: []string{dolly}, Columns: map[string]string{"output": "response"}}, map[string]string{dolly: "context"}},
		{SourceOptions{Paths: []string{dolly}, Columns: map[string]string{"output": "response", "input": "context"}}, map[string]string{}},
		{SourceOptions{Paths: []string{plain}}, map[string]string{}},
		{SourceOptions{Paths: []string{pq}, Columns: map[string]string{"instruction": "instruction-turkish", "output": "output-turkish"}}, map[string]string{pq: "input-turkish"}},
	} {
		s, err := Open(c.opts)
		if err != nil {
			t.Fatal(err)
		}
		if got := s.UnreadInput(); !maps.Equal(got, c.want) {
			t.Errorf("%v %v: unread input %v, want %v", c.opts.Paths, c.opts.Columns, got, c.want)
		}
		s.Close()
	}
	// The column hint of a missing output names the file's output column.
	if _, err := Open(SourceOptions{Paths: []string{pq}, Columns: map[string]string{"instruction": "instruction-turkish"}}); err == nil || !strings.Contains(err.Error(), "columns: {output: output-turkish}") {
		t.Errorf("a missing output's hint: %v", err)
	}
	// A field columns: names and the file lacks is a typo there, not a
	// role to map (the hint was columns: {instrucion: instruction-turkish}):
	// the nearest name, else the form of the mapping.
	if _, err := Open(SourceOptions{Paths: []string{pq}, Columns: map[string]string{"instruction": "instrucion-turkish", "output": "output-turkish"}}); err == nil ||
		!strings.Contains(err.Error(), `columns: names "instrucion-turkish": did you mean "instruction-turkish"?`) {
		t.Errorf("a misspelt mapped column's hint: %v", err)
	}
	if _, err := Open(SourceOptions{Paths: []string{pq}, Columns: map[string]string{"instruction": "soru", "output": "output-turkish"}}); err == nil ||
		!strings.Contains(err.Error(), `columns: maps instruction to "soru", which the file lacks: e.g. columns: {instruction: instruction-turkish}`) {
		t.Errorf("a mapped column far from every name: %v", err)
	}
	// A system_column the file lacks is that parameter's, not columns:'s.
	if _, err := Open(SourceOptions{Paths: []string{pq}, Columns: map[string]string{"instruction": "instruction-turkish", "output": "output-turkish"}, SystemColumn: "sys_prompt"}); err == nil ||
		!strings.Contains(err.Error(), `system_column names "sys_prompt": name one of these fields, or leave system_column out`) {
		t.Errorf("a missing system column's hint: %v", err)
	}
}

// TestParquetWithoutInput: a Parquet file of instructions and outputs only
// reads with no input, as JSON lines without the field do (it used to be
// refused, and nothing in a spec could say otherwise); an input column the
// spec names and the file lacks is still an error.
func TestParquetWithoutInput(t *testing.T) {
	fields := []arrow.Field{alpacaFields[0], alpacaFields[2]}
	path := writeParquet(t, "io.parquet", fields, func(b *array.RecordBuilder) {
		b.Field(0).(*array.StringBuilder).AppendValues([]string{"Bir", "Üç"}, nil)
		b.Field(1).(*array.StringBuilder).AppendValues([]string{"iki", "dört"}, nil)
	})
	rows := readAll(t, SourceOptions{Paths: []string{path}})
	if want := [][]string{{"Bir", "", "iki"}, {"Üç", "", "dört"}}; !slices.EqualFunc(rows, want, slices.Equal) {
		t.Errorf("got %q, want %q", rows, want)
	}
	_, err := Open(SourceOptions{Paths: []string{path}, Columns: map[string]string{ColInput: "context"}})
	if err == nil || !strings.Contains(err.Error(), `no column "context"`) {
		t.Errorf("an input column the file lacks: %v", err)
	}
}

// TestNullsAreCountedAndConfigurable: nulls read as "" (by default), drop
// their row, or fail, and are counted with where the first of each column
// was, in Parquet and in JSON lines. A null input is Alpaca's "no input":
// drop keeps its row.
func TestNullsAreCountedAndConfigurable(t *testing.T) {
	pq := writeParquet(t, "n.parquet", alpacaFields, func(b *array.RecordBuilder) {
		appendStrings(b, [3]string{"Bir", "<null>", "iki"}, [3]string{"Üç", "dört", "<null>"}, [3]string{"beş", "altı", "yedi"})
	})
	jl := filepath.Join(t.TempDir(), "n.jsonl")
	os.WriteFile(jl, []byte(`{"instruction": "Bir", "input": null, "output": "iki"}
{"instruction": "Üç", "input": "dört", "output": null}
{"instruction": "beş", "input": "altı", "output": "yedi"}
`), 0o644)
	for path, where := range map[string][2]string{pq: {pq + " row index 0", pq + " row index 1"}, jl: {jl + " line 1", jl + " line 2"}} {
		s, err := Open(SourceOptions{Paths: []string{path}})
		if err != nil {
			t.Fatal(err)
		}
		rows, err := drain(s)
		s.Close()
		want := [][]string{{"Bir", "", "iki"}, {"Üç", "dört", ""}, {"beş", "altı", "yedi"}}
		if err != nil || !slices.EqualFunc(rows, want, slices.Equal) {
			t.Fatalf("%s: %q %v", path, rows, err)
		}
		rep := s.Nulls()
		if rep.Columns[ColInput] != 1 || rep.Columns[ColOutput] != 1 || len(rep.Columns) != 2 ||
			rep.First[ColInput] != where[0] || rep.First[ColOutput] != where[1] || rep.Dropped != 0 {
			t.Errorf("%s: report %+v", path, rep)
		}

		s, _ = Open(SourceOptions{Paths: []string{path}, Nulls: NullsDrop})
		rows, err = drain(s)
		s.Close()
		want = [][]string{{"Bir", "", "iki"}, {"beş", "altı", "yedi"}}
		if err != nil || !slices.EqualFunc(rows, want, slices.Equal) || s.Nulls().Dropped != 1 {
			t.Errorf("%s drop: %q %v %+v", path, rows, err, s.Nulls())
		}

		s, _ = Open(SourceOptions{Paths: []string{path}, Nulls: NullsError})
		_, err = drain(s)
		s.Close()
		if err == nil || !strings.Contains(err.Error(), where[1]+": column output is null") {
			t.Errorf("%s error: %v", path, err)
		}
	}
	// A field columns: names for the input and the records lack counts as
	// a null input (a misspelt name would otherwise go unseen).
	os.WriteFile(jl, []byte(`{"instruction": "Bir", "output": "iki"}`+"\n"), 0o644)
	if s, err := Open(SourceOptions{Paths: []string{jl}, Columns: map[string]string{ColInput: "contxt"}}); err != nil {
		t.Fatal(err)
	} else if _, err := drain(s); err != nil || s.Nulls().Columns[ColInput] != 1 {
		t.Errorf("a mapped input the records lack: %v, nulls %+v", err, s.Nulls())
	}
	// A record without an input field has no input, and no null to count.
	os.WriteFile(jl, []byte(`{"instruction": "Bir", "output": "iki"}`+"\n"), 0o644)
	s, err := Open(SourceOptions{Paths: []string{jl}})
	if err != nil {
		t.Fatal(err)
	}
	rows, err := drain(s)
	s.Close()
	if err != nil || !slices.EqualFunc(rows, [][]string{{"Bir", "", "iki"}}, slices.Equal) || len(s.Nulls().Columns) != 0 {
		t.Errorf("no input field: %q %v, nulls %+v", rows, err, s.Nulls())
	}
}

// openOrNext returns the first error from opening and reading a source.
func openOrNext(opts SourceOptions) error {
	s, err := Open(opts)
	if err != nil {
		return err
	}
	defer s.Close()
	_, err = drain(s)
	return err
}

func TestBadInput(t *testing.T) {
	dir := testenv.AlpacaTR(t, "")
	good := filepath.Join(dir, "parquet", "alpaca-tr.parquet")
	shard := filepath.Join(dir, "parquet", "train-00000-of-00002.parquet")
	tmp := t.TempDir()
	writeFile := func(name string, data []byte) string {
		p := filepath.Join(tmp, name)
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	whole, err := os.ReadFile(good)
	if err != nil {
		t.Fatal(err)
	}
	truncated := writeFile("truncated.parquet", whole[:len(whole)/2])
	notParquet := writeFile("text.parquet", []byte("instruction,input,output\nbir,iki,üç\n"))

	// Overwrite the first page header of a column chunk in the middle of
	// the file: the footer stays intact, so Open succeeds and reading fails.
	corruptData := slices.Clone(whole)
	{
		s, err := Open(SourceOptions{Paths: []string{good}})
		if err != nil {
			t.Fatal(err)
		}
		meta := s.files[0].(*parquetFile).meta
		s.Close()
		rg := meta.RowGroup(3)
		cc, err := rg.ColumnChunk(2)
		if err != nil {
			t.Fatal(err)
		}
		off := cc.DataPageOffset()
		for i := range int64(32) {
			corruptData[off+i] = 0xff
		}
	}
	corrupt := writeFile("corrupt.parquet", corruptData)

	intColumn := writeParquet(t, "int.parquet", []arrow.Field{
		{Name: "instruction", Type: arrow.BinaryTypes.String},
		{Name: "input", Type: arrow.BinaryTypes.String},
		{Name: "output", Type: arrow.PrimitiveTypes.Int64},
	}, func(b *array.RecordBuilder) {
		b.Field(0).(*array.StringBuilder).Append("a")
		b.Field(1).(*array.StringBuilder).Append("b")
		b.Field(2).(*array.Int64Builder).Append(3)
	})
	badUTF8 := writeParquet(t, "utf8.parquet", alpacaFields, func(b *array.RecordBuilder) {
		appendStrings(b, [3]string{"a", "b", "c"}, [3]string{"a", "b", "c"}, [3]string{"a", "", "Çok\xffgüzel"})
	})
	emptyParquet := writeParquet(t, "empty.parquet", alpacaFields, func(*array.RecordBuilder) {})

	emptyJSONL := writeFile("empty.jsonl", []byte("\n\n"))
	jsonlNumber := writeFile("number.jsonl", []byte(`{"instruction":"a","input":"","output":"b"}`+"\n"+`{"instruction":"a","input":"","output":42}`+"\n"))
	jsonlMissing := writeFile("missing.jsonl", []byte(`{"instruction":"a","input":""}`+"\n"))
	jsonlUTF8 := writeFile("utf8.jsonl", []byte(`{"instruction":"a","input":"","output":"b"}`+"\n\n"+`{"instruction":"a","input":"","output":"ş\ta`+"\xc3"+`"}`+"\n"))
	jsonlSurrogate := writeFile("surrogate.jsonl", []byte(`{"instruction":"a","input":"\ud83d","output":"b \ufffd ok"}`+"\n"))
	jsonlSyntax := writeFile("syntax.jsonl", []byte(`{"instruction":"a","input":"","output":"b"}`+"\n"+`{"instruction":"a",`+"\n"))
	gzNotGzip := writeFile("fake.jsonl.gz", []byte(`{"instruction":"a"}`))
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write([]byte(strings.Repeat(`{"instruction":"a","input":"","output":"b"}`+"\n", 3)))
	zw.Close()
	gzTruncated := writeFile("cut.jsonl.gz", gz.Bytes()[:gz.Len()-12])

	cases := []struct {
		name string
		opts SourceOptions
		want []string // substrings of the error
	}{
		{"missing file", SourceOptions{Paths: []string{filepath.Join(tmp, "nope.parquet")}}, []string{"nope.parquet", "no such file"}},
		{"truncated Parquet", SourceOptions{Paths: []string{truncated}}, []string{"truncated.parquet", "not a readable Parquet file"}},
		{"not Parquet", SourceOptions{Paths: []string{notParquet}}, []string{"text.parquet", "not a readable Parquet file"}},
		{"corrupt Parquet page", SourceOptions{Paths: []string{corrupt}}, []string{"corrupt.parquet", "row group 3"}},
		{"missing mapped column", SourceOptions{Paths: []string{shard}}, []string{"train-00000-of-00002.parquet", `no column "instruction"`, `"instruction-turkish"`, `"output-turkish"`}},
		{"mapped column absent", SourceOptions{Paths: []string{good}, Columns: map[string]string{ColOutput: "cevap"}}, []string{`no column "cevap"`, `"output"`}},
		{"unknown mapping key", SourceOptions{Paths: []string{good}, Columns: map[string]string{"answer": "output"}}, []string{`"answer"`}},
		{"non-string Parquet column", SourceOptions{Paths: []string{intColumn}}, []string{"int.parquet", `column "output" has type int64, not string`}},
		{"invalid UTF-8 in Parquet", SourceOptions{Paths: []string{badUTF8}}, []string{"utf8.parquet: row index 2, column output: invalid UTF-8 at byte 4"}},
		{"empty Parquet", SourceOptions{Paths: []string{emptyParquet}}, []string{"empty.parquet", "no rows"}},
		{"empty JSONL", SourceOptions{Paths: []string{emptyJSONL}}, []string{"empty.jsonl", "no rows"}},
		{"non-string JSONL value", SourceOptions{Paths: []string{jsonlNumber}}, []string{"number.jsonl: line 2, column output: a number, not a string"}},
		{"missing JSONL field", SourceOptions{Paths: []string{jsonlMissing}}, []string{"missing.jsonl: line 1", `no field "output"`, `"input", "instruction"`,
			"columns: {output: FIELD}"}}, // not input, which is read as the input
		{"misspelt JSONL field", SourceOptions{Paths: []string{writeFile("typo.jsonl", []byte(`{"instrucion": "a", "input": "", "output": "b"}`+"\n"))}},
			[]string{"typo.jsonl: line 1", `no field "instruction"`, "columns: {instruction: instrucion}"}},
		{"a later record without a field", SourceOptions{Paths: []string{writeFile("later.jsonl", []byte(`{"instruction": "a", "output": "b"}`+"\n"+`{"instruction": "c", "output": "d"}`+"\n"+`{"instruction": "e"}`+"\n"))}},
			[]string{"later.jsonl: line 3", `no field "output", which the file's first record has; this record has fields "instruction": mend or remove it`}},
		{"MT-Bench questions", SourceOptions{Paths: []string{writeFile("question.jsonl", []byte(`{"question_id": 81, "category": "writing", "turns": ["a", "b"]}`+"\n"))}},
			[]string{"question.jsonl: line 1", `no field "instruction"`, "MT-Bench questions, which a stage of kind mt_bench reads"}},
		{"invalid UTF-8 in JSONL", SourceOptions{Paths: []string{jsonlUTF8}}, []string{"utf8.jsonl: line 3, column output: invalid UTF-8 at byte 4"}},
		{"lone surrogate in JSONL", SourceOptions{Paths: []string{jsonlSurrogate}}, []string{"surrogate.jsonl: line 1, column input: unpaired UTF-16 surrogate"}},
		{"invalid JSON", SourceOptions{Paths: []string{jsonlSyntax}}, []string{"syntax.jsonl: line 2: invalid JSON"}},
		{"not gzip", SourceOptions{Paths: []string{gzNotGzip}}, []string{"fake.jsonl.gz", "not a gzip file"}},
		{"truncated gzip", SourceOptions{Paths: []string{gzTruncated}}, []string{"cut.jsonl.gz", "the gzip stream ends early (a truncated file?)"}},
		{"unknown extension", SourceOptions{Paths: []string{writeFile("data.csv", []byte("a"))}}, []string{"data.csv", "unknown file type"}},
		{"no paths", SourceOptions{}, []string{"no input files"}},
		{"negative limit", SourceOptions{Paths: []string{good}, Limit: -1}, []string{"negative"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := openOrNext(c.opts)
			t.Log(err)
			if err == nil {
				t.Fatal("no error")
			}
			for _, w := range c.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
		})
	}
}

func TestExpandGlobs(t *testing.T) {
	dir := t.TempDir()
	for _, name := range []string{"b-1.jsonl", "a-2.jsonl", "a-1.jsonl", "c.parquet"} {
		if err := os.WriteFile(filepath.Join(dir, name), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	got, err := ExpandGlobs(dir, []string{"c.parquet", "*.jsonl"})
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, p := range got {
		names = append(names, filepath.Base(p))
	}
	want := []string{"c.parquet", "a-1.jsonl", "a-2.jsonl", "b-1.jsonl"}
	if !slices.Equal(names, want) {
		t.Errorf("got %v, want %v", names, want)
	}
	// ** is any number of folders, none included, as fsspec reads it.
	for _, name := range []string{"data/top.jsonl", "data/sub/mid.jsonl", "data/sub/deep/low.jsonl", "data/sub/deep/x.parquet"} {
		os.MkdirAll(filepath.Dir(filepath.Join(dir, name)), 0o755)
		os.WriteFile(filepath.Join(dir, name), nil, 0o644)
	}
	got, err = ExpandGlobs(dir, []string{"data/**/*.jsonl"})
	want = []string{"data/sub/deep/low.jsonl", "data/sub/mid.jsonl", "data/top.jsonl"}
	if names = nil; err == nil {
		for _, p := range got {
			rel, _ := filepath.Rel(dir, p)
			names = append(names, filepath.ToSlash(rel))
		}
	}
	if !slices.Equal(names, want) {
		t.Errorf("data/**/*.jsonl: got %v (%v), want %v", names, err, want)
	}
	if _, err := ExpandGlobs(dir, []string{"${DATA}/*.jsonl"}); err == nil || !strings.Contains(err.Error(), "reads no environment variables") {
		t.Errorf("a variable in a pattern: err = %v", err)
	}
	if _, err := ExpandGlobs(dir, []string{"*.csv"}); err == nil || !strings.Contains(err.Error(), `"*.csv"`) {
		t.Errorf("pattern matching nothing: err = %v", err)
	}
	if _, err := ExpandGlobs(dir, []string{"[a"}); err == nil {
		t.Error("malformed pattern accepted")
	} // A file named with the pattern characters, given as it is.
	for _, name := range []string{"veri ş[2024].jsonl", "[a"} {
		os.WriteFile(filepath.Join(dir, name), nil, 0o644)
		if got, err := ExpandGlobs(dir, []string{name}); err != nil || len(got) != 1 || filepath.Base(got[0]) != name {
			t.Errorf("%s as it is: %v %v", name, got, err)
		}
	}
}

func TestContextCancel(t *testing.T) {
	path := writeJSONL(t, 10)
	s, err := Open(SourceOptions{Paths: []string{path}, BatchRows: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := s.Next(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("Next on a cancelled context: %v", err)
	}
}

// BenchmarkSource reads all of alpaca-tr from each layout.
func BenchmarkSource(b *testing.B) {
	dir := testenv.AlpacaTR(b, "")
	shards, err := ExpandGlobs(dir, []string{"parquet/train-*.parquet"})
	if err != nil {
		b.Fatal(err)
	}
	for _, c := range []struct {
		name string
		opts SourceOptions
	}{
		{"parquet", SourceOptions{Paths: []string{filepath.Join(dir, "parquet", "alpaca-tr.parquet")}}},
		{"shards", SourceOptions{Paths: shards, Columns: turkishColumns}},
		{"jsonl.gz", SourceOptions{Paths: []string{filepath.Join(dir, "alpaca-tr.jsonl.gz")}}},
		{"parquet-shuffled", SourceOptions{Paths: []string{filepath.Join(dir, "parquet", "alpaca-tr.parquet")}, Shuffle: true}},
	} {
		b.Run(c.name, func(b *testing.B) {
			for b.Loop() {
				s, err := Open(c.opts)
				if err != nil {
					b.Fatal(err)
				}
				n := 0
				for {
					rec, err := s.Next(context.Background())
					if err == io.EOF {
						break
					}
					if err != nil {
						b.Fatal(err)
					}
					n += int(rec.NumRows())
					rec.Release()
				}
				s.Close()
				if n != alpacaRows {
					b.Fatalf("%d rows", n)
				}
			}
			b.ReportMetric(float64(alpacaRows)*float64(b.N)/b.Elapsed().Seconds(), "rows/s")
		})
	}
}

func TestJSONLEscapes(t *testing.T) {
	path := filepath.Join(t.TempDir(), "esc.jsonl")
	data := `{"instruction":"gülen yüz \ud83d\ude00","input":"ters bölü \\ud800","output":"yedek \ufffd ve ` + "\uFFFD" + `"}` + "\n"
	if err := os.WriteFile(path, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
	rows := readAll(t, SourceOptions{Paths: []string{path}})
	want := []string{"gülen yüz 😀", `ters bölü \ud800`, "yedek \uFFFD ve \uFFFD"}
	if len(rows) != 1 || !slices.Equal(rows[0], want) {
		t.Errorf("got %q, want %q", rows, want)
	}
}

// TestCorruptParquetNeverPanics overwrites random bytes of a small Parquet
// file many times: reading must end in rows or an error, never a panic.
func TestCorruptParquetNeverPanics(t *testing.T) {
	path := writeParquet(t, "f.parquet", alpacaFields, func(b *array.RecordBuilder) {
		for range 200 {
			appendStrings(b, [3]string{"talimat", "girdi", "çok uzun bir çıktı metni"})
		}
	})
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	corrupt := filepath.Join(t.TempDir(), "corrupt.parquet")
	errorsSeen := 0
	for i := range 500 {
		d := slices.Clone(data)
		for range 1 + rng.IntN(4) {
			d[rng.IntN(len(d))] = byte(rng.IntN(256))
		}
		if err := os.WriteFile(corrupt, d, 0o644); err != nil {
			t.Fatal(err)
		}
		func() {
			defer func() {
				if p := recover(); p != nil {
					t.Fatalf("corruption %d: panic: %v", i, p)
				}
			}()
			if openOrNext(SourceOptions{Paths: []string{corrupt}}) != nil {
				errorsSeen++
			}
		}()
	}
	if errorsSeen == 0 {
		t.Error("no corruption was detected")
	}
}

// TestJSONLLineIsBounded: a JSON lines file with a line beyond the bound
// (no newline: a binary file, a stream) fails naming the file and line
// instead of filling memory.
func TestJSONLLineIsBounded(t *testing.T) {
	defer func(old int) { maxLineBytes = old }(maxLineBytes)
	maxLineBytes = 1 << 10
	path := filepath.Join(t.TempDir(), "long.jsonl")
	os.WriteFile(path, []byte(`{"instruction": "a", "input": "", "output": "b"}`+"\n"+strings.Repeat("x", 4<<10)), 0o644)
	err := openOrNext(SourceOptions{Paths: []string{path}})
	if err == nil || !strings.Contains(err.Error(), path+": line 2 is longer than 1 KiB") {
		t.Fatalf("%v", err)
	}
}

// TestJSONLWithoutInput: an Alpaca record may leave its input out, as many
// datasets write them; it reads as an empty input.
func TestJSONLWithoutInput(t *testing.T) {
	path := filepath.Join(t.TempDir(), "noinput.jsonl")
	os.WriteFile(path, []byte(`{"instruction":"a","output":"b"}`+"\n"+`{"instruction":"c","input":"d","output":"e"}`+"\n"), 0o644)
	got := readAll(t, SourceOptions{Paths: []string{path}})
	if fmt.Sprint(got) != "[[a  b] [c d e]]" {
		t.Errorf("rows %q", got)
	}
}

// TestJSONArray: a file holding one JSON array of records (the
// alpaca_data.json layout), compact, pretty-printed or gzipped, reads as
// the same records the JSON lines give; its errors name the element, as
// jq's .[i] finds it.
func TestJSONArray(t *testing.T) {
	dir := t.TempDir()
	write := func(name string, data []byte) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, data, 0o644); err != nil {
			t.Fatal(err)
		}
		return path
	}
	lines := `{"instruction": "Başkent?", "input": "", "output": "Ankara."}
{"instruction": "Topla", "input": "2 ve 3", "output": "5"}
{"instruction": "Renk söyle", "output": "Mavi."}
`
	want := readAll(t, SourceOptions{Paths: []string{write("a.jsonl", []byte(lines))}})
	elems := strings.Split(strings.TrimSpace(lines), "\n")
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write([]byte("[" + strings.Join(elems, ",") + "]"))
	zw.Close()
	for name, data := range map[string][]byte{
		"compact.json":    []byte("[" + strings.Join(elems, ",") + "]"),
		"pretty.json":     []byte("\xef\xbb\xbf[\n  " + strings.Join(elems, ",\n  ") + "\n]\n"),
		"gzipped.json.gz": gz.Bytes(),
	} {
		if got := readAll(t, SourceOptions{Paths: []string{write(name, data)}}); !reflect.DeepEqual(got, want) {
			t.Errorf("%s: %q, want %q", name, got, want)
		}
	}
	// A byte order mark alone on the first line; an array on one line
	// longer than a line may be.
	if got := readAll(t, SourceOptions{Paths: []string{write("bom.jsonl", []byte("\xef\xbb\xbf\n"+lines))}}); !reflect.DeepEqual(got, want) {
		t.Errorf("a BOM line first: %q, want %q", got, want)
	}
	saved := maxLineBytes
	maxLineBytes = 64
	if got := readAll(t, SourceOptions{Paths: []string{write("long.json", []byte("["+strings.Join(elems, ",")+"]"))}}); !reflect.DeepEqual(got, want) {
		t.Errorf("an array on one long line: %q, want %q", got, want)
	}
	maxLineBytes = saved

	nulls := write("nulls.json", []byte(`[{"instruction": "a", "input": "", "output": "b"}, {"instruction": null, "input": "", "output": "c"}]`))
	s, err := Open(SourceOptions{Paths: []string{nulls}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := drain(s); err != nil {
		t.Fatal(err)
	}
	if n := s.Nulls(); n.First["instruction"] != nulls+" element .[1]" {
		t.Errorf("a null named %+v, want element .[1]", n)
	}
	s.Close()

	for content, msg := range map[string]string{
		`[{"instruction": "a", "input": "", "output": "b"}, 3]`:                                              "element .[1]: not a JSON object",
		`[{"instruction": "a", "input": "", "output": "b"}, {"instruction": "a"}]`:                           `element .[1]: no field "output"`,
		`[{"instruction": "a", "input": "", "output": "b"}, {"instruction": 1, "input": "", "output": "b"}]`: "element .[1], column instruction: a number, not a string",
		`[{"instruction": "a", "input": "", "output": "b"}, {"instruction": "a", `:                           "element .[1]: invalid JSON",
		`[{"instruction": "a", "input": "", "output": "b"}] {"instruction": "x"}`:                            "data after the JSON array",
		"{\n  \"instruction\": \"a\",\n  \"input\": \"\",\n  \"output\": \"b\"\n}\n":                         "line 1: invalid JSON: unexpected end of JSON input (a record over several lines?",
	} {
		path := write("bad.json", []byte(content))
		s, err := Open(SourceOptions{Paths: []string{path}})
		if err == nil {
			_, err = drain(s)
			s.Close()
		}
		if err == nil || !strings.Contains(err.Error(), path+": "+msg) {
			t.Errorf("%s: %v, want %q", content, err, msg)
		}
	}
}

// TestUnweighted: model messages marked weight 0 (Axolotl's switch for a
// turn not to train), which are not read, are counted; a user message
// marked so trains no more than any user message does.
func TestUnweighted(t *testing.T) {
	path := writeFile(t, "w.jsonl", `{"conversations": [{"from": "human", "value": "a", "weight": 0}, {"from": "gpt", "value": "b", "weight": 0}, {"from": "human", "value": "c"}, {"from": "gpt", "value": "d", "weight": 1}]}`+"\n")
	s, err := Open(SourceOptions{Paths: []string{path}, Layout: LayoutShareGPT})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	readThrough(t, s)
	if n := s.Unweighted(); n != 1 {
		t.Errorf("%d messages counted with weight 0, want 1 (gpt's)", n)
	}
}

// TestToolCalls: messages with OpenAI's tool_calls, which no text template
// renders, are counted; an empty or null list is no call.
func TestToolCalls(t *testing.T) {
	path := writeFile(t, "tc.jsonl", `{"messages": [{"role": "user", "content": "Hava?"}, {"role": "assistant", "content": "Bakıyorum.", "tool_calls": [{"id": "1", "type": "function", "function": {"name": "hava", "arguments": "{}"}}]}]}
{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "tool_calls": []}]}
{"messages": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d", "tool_calls": null}]}
`)
	s, err := Open(SourceOptions{Paths: []string{path}, Layout: LayoutOpenAI})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	readThrough(t, s)
	if n := s.ToolCalls(); n != 1 {
		t.Errorf("%d messages counted with tool calls, want 1", n)
	}
}
