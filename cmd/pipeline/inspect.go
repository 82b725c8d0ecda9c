package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/spf13/cobra"

	"gemmaft/dataset"
	"gemmaft/pipeline"
)

func init() {
	var (
		rows    int
		asJSON  bool
		decode  bool
		tokPath string
	)
	cmd := &cobra.Command{
		Use:   "inspect SPEC STAGE",
		Short: "Show a stage's cached output: manifest, statistics and a few rows",
		Long: `Show the cached output of STAGE in SPEC: its manifest (key, parameters, inputs,
files read and written), its statistics and its first rows; for a training stage,
the command that opens its TensorBoard events; and the command that writes the
HTML report of the last runs.

With --decode, the rows of a tokenize, mix or pack stage are shown as the text their
tokens stand for, the trained tokens (those with labels) between ⟦ and ⟧ and a
packed row's examples one after another: what the chat template made of each record
and what the loss reads. The tokenizer is the one that made the rows (an hf:// one at
the commit it read), or --tokenizer.`,
		Args:              exactArgs(2, "a spec file and a stage name"),
		ValidArgsFunction: stageArg,
		RunE: func(cmd *cobra.Command, args []string) error {
			if rows < 0 {
				return usageErr(fmt.Errorf("--rows %d: want 0 (none) or more", rows))
			}
			if tokPath != "" && !decode {
				return usageErr(errors.New("--tokenizer is the tokenizer of --decode; give --decode too"))
			}
			entry, m, st, err := cachedEntry(args[0], args[1])
			if err != nil {
				return err
			}
			defer st.Close()
			if decode {
				if !slices.Contains([]string{"tokenize", "mix", "pack"}, m.Kind) {
					return usageErr(fmt.Errorf("--decode shows token rows, a tokenize, mix or pack stage's; stage %s is a %s stage: inspect it without --decode", args[1], m.Kind))
				}
				tk, err := decodeTokenizer(cmd.Context(), st, m, tokPath)
				if err != nil {
					return err
				}
				return printDecoded(stdout, entry, rows, tk)
			}
			if asJSON {
				data, err := os.ReadFile(filepath.Join(entry, "manifest.json"))
				if err != nil {
					return failErr(err)
				}
				_, err = stdout.Write(data)
				return err
			}
			printManifest(stdout, entry, m)
			printResults(stdout, entry)
			printWatch(stdout, args[0], []watched{{stage: m.Stage, dir: entry}}, false)
			if rows > 0 {
				return printRows(stdout, entry, rows)
			}
			return nil
		},
	}
	cmd.Flags().IntVar(&rows, "rows", 3, "how many rows of the table to show")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the manifest as JSON and nothing else")
	cmd.Flags().BoolVar(&decode, "decode", false, "show the rows of a tokenize, mix or pack stage as text, the trained tokens between ⟦ ⟧")
	cmd.Flags().StringVar(&tokPath, "tokenizer", "", "the tokenizer.json (or hf://) of --decode (default: the one that made the rows)")
	root.AddCommand(cmd)
}

// cachedEntry finds the current, valid entry of one stage of a spec, in
// a cache that exists (a mistyped --cache is not made a new, empty one),
// and returns it with the store, which the caller closes.
func cachedEntry(spec, stage string) (string, *pipeline.Manifest, *pipeline.Store, error) {
	dag, err := loadSpec(spec)
	if err != nil {
		return "", nil, nil, err
	}
	st, err := openExistingStore(dag)
	if err != nil {
		return "", nil, nil, err
	}
	plan, err := st.Plan(dag, pipeline.Options{Only: stage})
	if err != nil {
		st.Close()
		return "", nil, nil, specOrFailErr(err)
	}
	step := plan.Step(stage)
	switch step.State {
	case pipeline.Valid:
		return st.EntryDir(step.Key), step.Manifest, st, nil
	case pipeline.Damaged:
		err = failErr(fmt.Errorf("stage %s: cache entry %s is damaged (%w); run `pipeline run %s --until %s` to recompute it", stage, pipeline.ShortKey(step.Key), step.Damage, specArgs(spec), stage))
	default:
		err = failErr(fmt.Errorf("stage %s is not cached (%s); run `pipeline run %s --until %s` first", stage, step.Reason, specArgs(spec), stage))
	}
	st.Close()
	return "", nil, nil, err
}

func printManifest(w io.Writer, entry string, m *pipeline.Manifest) {
	fmt.Fprintf(w, "stage     %s (%s, version %d)\n", m.Stage, m.Kind, m.KindVersion)
	fmt.Fprintf(w, "key       %s\n", m.Key)
	fmt.Fprintf(w, "entry     %s\n", entry)
	fmt.Fprintf(w, "computed  %s in %.2fs by pipeline %s\n", pipeline.LocalTime(m.Finished), m.Seconds, m.Program)
	if hasTable(m) { // an adapter, a checkpoint or scores have no rows
		fmt.Fprintf(w, "rows      %d\n", m.Rows)
	}
	var params bytes.Buffer
	json.Compact(&params, m.Params)
	fmt.Fprintf(w, "params    %s\n", params.String())
	for _, in := range m.Inputs {
		fmt.Fprintf(w, "input     %s %s\n", in.Stage, pipeline.ShortKey(in.Key))
	}
	for _, f := range m.Files {
		fmt.Fprintf(w, "reads     %s (%s, sha256 %s)\n", f.Path, pipeline.HumanBytes(f.Size), pipeline.ShortKey(f.SHA256))
	}
	for _, o := range m.Outputs {
		fmt.Fprintf(w, "output    %s (%s)\n", o.Path, pipeline.HumanBytes(o.Size))
	}
	names := make([]string, 0, len(m.Stats))
	for k := range m.Stats {
		names = append(names, k)
	}
	sort.Strings(names)
	for _, k := range names {
		v, _ := json.Marshal(m.Stats[k])
		fmt.Fprintf(w, "stat      %s = %s\n", k, v)
	}
}

// printResults shows the score table of an entry's results.json (an eval
// stage's: the base model and the adapter side by side), if it has one.
func printResults(w io.Writer, entry string) {
	data, err := os.ReadFile(filepath.Join(entry, "results.json"))
	if err != nil {
		return
	}
	var r struct {
		Models map[string]string `json:"models"` // what "base" and "adapter" ran on
		Table  *struct {
			Columns []string `json:"columns"`
			Rows    [][]any  `json:"rows"`
		} `json:"table"`
	}
	if json.Unmarshal(data, &r) != nil || r.Table == nil || len(r.Table.Columns) == 0 {
		return
	}
	cells := [][]string{r.Table.Columns}
	for _, row := range r.Table.Rows {
		line := make([]string, len(row))
		for i, v := range row {
			switch x := v.(type) {
			case float64:
				line[i] = strconv.FormatFloat(x, 'f', -1, 64)
			default:
				line[i] = fmt.Sprint(x)
			}
		}
		cells = append(cells, line)
	}
	width := make([]int, len(r.Table.Columns))
	for _, line := range cells {
		for i, c := range line {
			if i < len(width) {
				width[i] = max(width[i], utf8.RuneCountInString(c))
			}
		}
	}
	fmt.Fprintln(w)
	for _, line := range cells {
		var b strings.Builder
		for i, c := range line {
			if i >= len(width) {
				break
			}
			pad := strings.Repeat(" ", width[i]-utf8.RuneCountInString(c))
			if i == 0 {
				// The score's name reads left-aligned, the numbers right.
				b.WriteString(c + pad)
			} else {
				b.WriteString("  " + pad + c)
			}
		}
		fmt.Fprintln(w, b.String())
	}
	for _, m := range []string{"base", "adapter"} {
		if what := r.Models[m]; what != "" {
			fmt.Fprintf(w, "%s: %s\n", m, what)
		}
	}
}

// hasTable reports whether the entry holds a table.
func hasTable(m *pipeline.Manifest) bool {
	return slices.ContainsFunc(m.Outputs, func(o pipeline.FileRef) bool { return o.Path == pipeline.TableFile })
}

// printRows shows the first n rows of the entry's table as JSON objects,
// shortening long strings and lists so a row fits on a screen.
func printRows(w io.Writer, entry string, n int) error {
	path := filepath.Join(entry, pipeline.TableFile)
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		return nil // a stage without a table (an adapter, a checkpoint)
	}
	r, err := dataset.OpenIPC(path)
	if err != nil {
		return failErr(err)
	}
	defer r.Close()
	fmt.Fprintf(w, "\nschema    %s\n", schemaLine(r.Schema()))
	return firstRows(r, n, func(rec arrow.RecordBatch, i, _ int) error {
		var buf bytes.Buffer
		buf.WriteByte('{')
		for c, col := range rec.Columns() {
			if c > 0 {
				buf.WriteString(", ")
			}
			buf.Write(displayJSON(rec.ColumnName(c)))
			buf.WriteString(": ")
			buf.Write(displayJSON(shorten(col.GetOneForMarshal(i))))
		}
		buf.WriteString("}\n")
		w.Write(buf.Bytes())
		return nil
	})
}

// firstRows calls fn with each of the first n rows of the table r reads:
// its batch, its place in the batch, its place in the table.
func firstRows(r *dataset.IPCReader, n int, fn func(rec arrow.RecordBatch, i, row int) error) error {
	for row := 0; row < n; {
		rec, err := r.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return failErr(err)
		}
		for i := 0; i < int(rec.NumRows()) && row < n; i++ {
			if err := fn(rec, i, row); err != nil {
				rec.Release()
				return err
			}
			row++
		}
		rec.Release()
	}
	return nil
}

// displayJSON encodes v for people: chat text is full of <bos> and
// <end_of_turn>, which json.Marshal would write as \u003c…\u003e.
func displayJSON(v any) []byte {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	enc.Encode(v)
	return bytes.TrimRight(b.Bytes(), "\n")
}

func schemaLine(s *arrow.Schema) string {
	var b bytes.Buffer
	for i, f := range s.Fields() {
		if i > 0 {
			b.WriteString(", ")
		}
		fmt.Fprintf(&b, "%s %s", f.Name, f.Type)
	}
	return b.String()
}

func shorten(v any) any {
	const maxString, maxList = 160, 24
	switch x := v.(type) {
	case string:
		if r := []rune(x); len(r) > maxString {
			return string(r[:maxString]) + fmt.Sprintf("… (%d more characters)", len(r)-maxString)
		}
	case json.RawMessage:
		var list []json.RawMessage
		if json.Unmarshal(x, &list) == nil && len(list) > maxList {
			out := append([]any{}, anySlice(list[:maxList])...)
			return append(out, fmt.Sprintf("… (%d more)", len(list)-maxList))
		}
	}
	return v
}

func anySlice(xs []json.RawMessage) []any {
	out := make([]any, len(xs))
	for i, x := range xs {
		out[i] = x
	}
	return out
}
