package stages

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/memory"

	"gemmaft/internal/testenv"
	"gemmaft/pipeline"
)

// TestSourceBadInput checks that each kind of bad input fails its stage
// with a message naming the problem, and leaves no cache entry.
func TestSourceBadInput(t *testing.T) {
	alpaca := []string{"instruction", "input", "output"}
	cases := []struct {
		name  string
		setup func(dir string) string // writes the input, returns the stage's `with:`
		want  string
		spec  bool // a spec error, found before running
	}{
		{"missing file", func(dir string) string {
			return "{paths: [absent.parquet]}"
		}, `no file matches "absent.parquet"`, true},
		{"corrupt parquet", func(dir string) string {
			os.WriteFile(filepath.Join(dir, "bad.parquet"), []byte("PAR1 this is not a parquet file PAR1"), 0o644)
			return "{paths: [bad.parquet]}"
		}, "bad.parquet", false},
		{"truncated parquet", func(dir string) string {
			p := filepath.Join(dir, "cut.parquet")
			writeParquet(t, p, stringBatch(alpaca, []string{"a", "b", "c"}, []string{"d", "e", "f"}))
			data, _ := os.ReadFile(p)
			os.WriteFile(p, data[:len(data)/2], 0o644)
			return "{paths: [cut.parquet]}"
		}, "cut.parquet", false},
		{"missing mapped column", func(dir string) string {
			writeParquet(t, filepath.Join(dir, "x.parquet"), stringBatch(alpaca, []string{"a", "b", "c"}))
			return "{paths: [x.parquet], columns: {instruction: instruction-turkish}}"
		}, "instruction-turkish", false},
		{"non-string column", func(dir string) string {
			schema := arrow.NewSchema([]arrow.Field{
				{Name: "instruction", Type: arrow.BinaryTypes.String},
				{Name: "input", Type: arrow.BinaryTypes.String},
				{Name: "output", Type: arrow.PrimitiveTypes.Int64},
			}, nil)
			b := array.NewRecordBuilder(memory.DefaultAllocator, schema)
			b.Field(0).(*array.StringBuilder).Append("a")
			b.Field(1).(*array.StringBuilder).Append("b")
			b.Field(2).(*array.Int64Builder).Append(7)
			writeParquet(t, filepath.Join(dir, "int.parquet"), b.NewRecordBatch())
			return "{paths: [int.parquet]}"
		}, "output", false},
		{"invalid utf-8", func(dir string) string {
			writeParquet(t, filepath.Join(dir, "utf.parquet"), stringBatch(alpaca, []string{"a", "b", "ok"}, []string{"a", "b", "bad \xff\xfe"}))
			return "{paths: [utf.parquet]}"
		}, "UTF-8", false},
		{"invalid utf-8 in jsonl", func(dir string) string {
			os.WriteFile(filepath.Join(dir, "u.jsonl"), []byte("{\"instruction\": \"a\", \"input\": \"\", \"output\": \"x\xff\"}\n"), 0o644)
			return "{paths: [u.jsonl]}"
		}, "UTF-8", false},
		{"empty parquet", func(dir string) string {
			writeParquet(t, filepath.Join(dir, "empty.parquet"), stringBatch(alpaca))
			return "{paths: [empty.parquet]}"
		}, "no rows", false},
		{"empty jsonl", func(dir string) string {
			os.WriteFile(filepath.Join(dir, "empty.jsonl"), nil, 0o644)
			return "{paths: [empty.jsonl]}"
		}, "no rows", false},
		{"seed without shuffle", func(dir string) string {
			os.WriteFile(filepath.Join(dir, "s.jsonl"), []byte(`{"instruction": "a", "input": "", "output": "b"}`+"\n"), 0o644)
			return "{paths: [s.jsonl], seed: 3}"
		}, "seed: orders the records only when they are shuffled", true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := newTestRun(t)
			kind := "parquet"
			with := c.setup(r.dir)
			if strings.Contains(with, ".jsonl") {
				kind = "jsonl"
			}
			spec := r.spec("name: bad\nstages:\n  src: {kind: " + kind + ", with: " + with + "}\n")
			_, err := r.run(spec, pipeline.Options{})
			if err == nil {
				t.Fatal("bad input was accepted")
			}
			if pipeline.IsSpecError(err) != c.spec {
				t.Errorf("spec error = %v, want %v: %v", pipeline.IsSpecError(err), c.spec, err)
			}
			if !c.spec && !strings.Contains(err.Error(), "stage src ("+kind+")") {
				t.Errorf("error does not name the stage: %v", err)
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Errorf("error lacks %q: %v", c.want, err)
			}
			t.Log(err)
			if n := r.entries(); n != 0 {
				t.Errorf("bad input left %d cache entries", n)
			}
		})
	}
}

// TestSourceLayouts reads the shared data in its three layouts and finds
// the same records.
func TestSourceLayouts(t *testing.T) {
	single := testenv.AlpacaTR(t, "parquet/alpaca-tr.parquet")
	sharded := testenv.AlpacaTR(t, "parquet/train-00000-of-00002.parquet")
	jsonl := testenv.AlpacaTR(t, "alpaca-tr.jsonl.gz")
	r := newTestRun(t)
	spec := r.spec(`name: layouts
stages:
  single: {kind: parquet, with: {paths: [` + single + `]}}
  sharded:
    kind: parquet
    with:
      paths: [` + filepath.Join(filepath.Dir(sharded), "train-*.parquet") + `]
      columns: {instruction: instruction-turkish, input: input-turkish, output: output-turkish}
  lines: {kind: jsonl, with: {paths: [` + jsonl + `]}}
`)
	rec, err := r.run(spec, pipeline.Options{})
	if err != nil {
		t.Fatal(err)
	}
	var digests []string
	for _, s := range rec.Stages {
		if s.Rows != 20748 {
			t.Errorf("%s: %d rows, want 20748", s.Name, s.Rows)
		}
		var sb strings.Builder
		forEach(t, r.table(rec, s.Name), func(b arrow.RecordBatch) {
			for i := 0; i < int(b.NumRows()); i++ {
				for c := 0; c < 3; c++ {
					sb.WriteString(b.Column(c).(*array.String).Value(i))
					sb.WriteByte(0)
				}
			}
		})
		digests = append(digests, sb.String())
	}
	if digests[0] != digests[1] || digests[0] != digests[2] {
		t.Error("the three layouts give different records")
	}
}

// TestSourceSeedNeedsShuffle: seed is refused where it would be ignored and
// taken where it orders the records.
func TestSourceSeedNeedsShuffle(t *testing.T) {
	for _, c := range []struct {
		p  sourceParams
		ok bool
	}{
		{sourceParams{Paths: []string{"a.jsonl"}}, true},
		{sourceParams{Paths: []string{"a.jsonl"}, Shuffle: true}, true},
		{sourceParams{Paths: []string{"a.jsonl"}, Shuffle: true, Seed: 3}, true},
		{sourceParams{Paths: []string{"a.jsonl"}, Seed: 3}, false},
	} {
		if err := c.p.Validate(); (err == nil) != c.ok {
			t.Errorf("%+v: %v", c.p, err)
		}
	}
}

// TestSourceNullsReported: a null answer is counted and reported (stage
// statistics and a warning), and nulls: drop or error do what they say;
// nulls: empty is the default and keeps the key.
func TestSourceNullsReported(t *testing.T) {
	r := newTestRun(t)
	os.WriteFile(filepath.Join(r.dir, "a.jsonl"), []byte(`{"instruction": "Bir", "input": null, "output": "iki"}
{"instruction": "Üç", "input": "dört", "output": null}
`), 0o644)
	run := func(with string) (*pipeline.RunRecord, error) {
		return r.run(r.spec("name: s\nstages:\n  src: {kind: jsonl, with: {paths: [a.jsonl]"+with+"}}\n"), pipeline.Options{})
	}
	rec, err := run("")
	if err != nil {
		t.Fatal(err)
	}
	nulls, _ := json.Marshal(rec.Stages[0].Stats["null_values"])
	if string(nulls) != `{"input":1,"output":1}` || rec.Stages[0].Rows != 2 {
		t.Errorf("default: null_values %s, %d rows", nulls, rec.Stages[0].Rows)
	}
	again, err := run(", nulls: empty")
	if err != nil || again.Stages[0].Key != rec.Stages[0].Key || again.Stages[0].State != "cached" {
		t.Errorf("nulls: empty is not the default: %v %+v", err, again.Stages[0])
	}
	rec, err = run(", nulls: drop")
	if err != nil || rec.Stages[0].Rows != 1 || fmt.Sprint(rec.Stages[0].Stats["null_rows_dropped"]) != "1" {
		t.Errorf("drop: %v %+v", err, rec.Stages[0])
	}
	_, err = run(", nulls: error")
	if err == nil || !strings.Contains(err.Error(), "a.jsonl line 2: column output is null") {
		t.Errorf("error: %v", err)
	}
	if _, err := run(", nulls: skip"); err == nil || !pipeline.IsSpecError(err) || !strings.Contains(err.Error(), `nulls: unknown policy "skip"`) {
		t.Errorf("bad policy: %v", err)
	}
	// Dropping every record fails the source, as an empty file does,
	// rather than an empty entry failing a later stage.
	os.WriteFile(filepath.Join(r.dir, "a.jsonl"), []byte(`{"instruction": "Bir", "input": "", "output": null}`+"\n"), 0o644)
	if _, err := run(", nulls: drop"); err == nil || !strings.Contains(err.Error(), "every record had a null and was dropped (1, nulls: drop); the first: "+filepath.Join(r.dir, "a.jsonl")+" line 1 in column output") {
		t.Errorf("every record dropped: %v", err)
	}
}

// TestRolesKeptInTheKey: a role mapping the defaults have gained since
// keys were first made (model: assistant) stays in the key of the specs
// that write it, so that their entries keep their keys; the older defaults
// stay out of it.
func TestRolesKeptInTheKey(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "c.jsonl"), []byte(`{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}`+"\n"), 0o644)
	p := filepath.Join(dir, "s.yaml")
	os.WriteFile(p, []byte("name: s\nstages:\n  c: {kind: jsonl, with: {paths: [c.jsonl], format: sharegpt, roles: {model: assistant, human: user}}}\n"), 0o644)
	dag, err := loadSpec(p, Registry())
	if err != nil {
		t.Fatal(err)
	}
	if c := string(dag.Node("c").Canon); !strings.Contains(c, `"roles":{"model":"assistant"}`) || strings.Contains(c, `"human"`) {
		t.Errorf("canonical parameters %s", c)
	}
}
