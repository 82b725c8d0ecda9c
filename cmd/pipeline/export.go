package main

import (
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/spf13/cobra"

	"gemmaft/dataset"
	"gemmaft/gguf"
	"gemmaft/internal/atomicfile"
	"gemmaft/internal/spell"
	"gemmaft/packer"
	"gemmaft/pipeline"
	"gemmaft/stages"
	"gemmaft/trainer"
)

func init() {
	var format, out, ggufType string
	var heldOut bool
	cmd := &cobra.Command{
		Use:   "export SPEC STAGE --format jsonl|parquet|arrow|mt-bench|gguf|hf --out PATH",
		Short: "Write a stage's cached table or model out for other tools",
		Long: `Write the cached output of STAGE to PATH. The stage must be cached; run it first.

Tables: as JSON lines (one object per row, lists as JSON arrays; gzipped when PATH
ends in .jsonl.gz), as Parquet, or as an Arrow IPC file. Rows of token ids (tokenize,
mix and pack stages) are written as other trainers read them: with an attention_mask
column (1 on the examples' tokens, 0 on a packed row's padding), as Axolotl's
pre-tokenized sets have it, and with a packed row's padding as the last entry of its
seq_lengths, so that they sum to the row's length, as TRL's collator reads them (in the
cache they list the examples alone). PATH (a file, or - for standard output) appears
only when complete. A generate stage's answers also export with --format mt-bench as FastChat's
answer file (model_answer/MODEL_ID.jsonl), for its judge.

Models, from a merge or model stage (a Hugging Face checkpoint): --format hf copies
the checkpoint folder to PATH (a qlora stage's: its PEFT adapter folder, as
PeftModel.from_pretrained and the Hub take it); --format gguf converts it, tokenizer included, to
a GGUF file for llama.cpp and Ollama, of --type q8_0 (default), q6_k, q5_k_m,
q4_k_m, q4_0, f16 or any other pipeline gguf --help lists, as llama-quantize would
write it, named (general.name) for PATH less its .TYPE.gguf or -TYPE.gguf. A model stage's random
checkpoint has no tokenizer: export it with --format hf. A gguf stage's file is
copied as it is (a --type must then be its own). A model's PATH must not exist,
and appears only when complete.

Without --format, PATH's extension says it (.jsonl, .jsonl.gz, .parquet, .arrow, .gguf),
or --type (gguf), and else the stage's kind: JSON lines for a table, hf for a model; a
--format that PATH's extension contradicts is refused, and so is a table's PATH whose
extension names no format (x.csv) unless --format says one. A PATH named NAME.TYPE.gguf (or NAME-TYPE.gguf)
gives the type when --type is left out, and must agree with it otherwise. A failure or an interrupt leaves PATH as
it was and no temporary file behind.`,
		Example: `  pipeline export dags/gemma12b.yaml pack --format parquet --out packed.parquet
  pipeline export dags/gemma12b.yaml answers --format mt-bench --out data/mt_bench/model_answer/tr-12b.jsonl
  pipeline export dags/demo.yaml chat --format jsonl --out - | head
  pipeline export dags/gemma12b.yaml merged --format gguf --out tr.Q4_K_M.gguf
  pipeline export dags/gemma12b.yaml merged --format hf --out ./gemma3-12b-tr`,
		Args:              exactArgs(2, "a spec file and a stage name"),
		ValidArgsFunction: stageArg,
		RunE: func(cmd *cobra.Command, args []string) error {
			if out == "" {
				return usageErr(errors.New("--out is required (a file, or - for standard output)"))
			}
			formats := []string{"jsonl", "parquet", "arrow", "mt-bench", "gguf", "hf"}
			format = strings.ToLower(format) // MT-Bench, as FastChat writes it
			if format != "" && !slices.Contains(formats, format) {
				hint := ""
				if near := spell.Closest(format, formats); near != "" {
					hint = fmt.Sprintf(" (did you mean %s?)", near)
				}
				return usageErr(fmt.Errorf("--format %q: want jsonl, parquet, arrow, mt-bench, gguf or hf%s", format, hint))
			}
			named, gzipped := formatOfName(out)
			notGzipped := func(format string) error {
				return usageErr(fmt.Errorf("--out %s: only JSON lines are written gzipped (NAME.jsonl.gz), not %s", out, format))
			}
			if gzipped && named != "" && named != "jsonl" {
				return notGzipped(named)
			}
			if format == "mt-bench" && named == "jsonl" {
				named = format // FastChat's answer file is JSON lines
			}
			if format != "" && named != "" && named != format {
				return usageErr(fmt.Errorf("--out %s is named for --format %s, not %s: rename it, or leave --format out", out, named, format))
			}
			typeGiven := cmd.Flags().Changed("type")
			if format == "" {
				format = named
			}
			if format == "" && typeGiven {
				format = "gguf" // only a GGUF file has a type
			}
			if heldOut && !slices.Contains([]string{"", "jsonl", "parquet", "arrow"}, format) {
				return usageErr(fmt.Errorf("--heldout exports held-out rows as a table; --format %s is not one", format))
			}
			if typeGiven && format != "gguf" {
				return usageErr(fmt.Errorf("--type is the type of a GGUF file; --format %s has none", format))
			}
			if ggufType == "" {
				ggufType = "q8_0" // or what --out's name says
			}
			typ, err := gguf.ParseFileType(ggufType)
			if err != nil {
				return usageErr(fmt.Errorf("--type: %w", err))
			}
			if format == "gguf" { // NAME.TYPE.gguf names the type too
				if typ, typeGiven, err = ggufOutType(out, typ, typeGiven); err != nil {
					return err
				}
			}
			if format == "gguf" || format == "hf" {
				if err := modelOutFree(out); err != nil {
					return err
				}
			}
			entry, m, st, err := cachedEntry(args[0], args[1])
			if err != nil {
				return err
			}
			st.Close()
			isModel := slices.Contains([]string{"merge", "model", "gguf", "gguf_lora", "qlora"}, m.Kind)
			if _, err := os.Stat(filepath.Join(entry, pipeline.TableFile)); err != nil && !isModel {
				return usageErr(fmt.Errorf("stage %s (%s) holds neither a table nor a model to export: its files are in %s", args[1], m.Kind, entry))
			}
			inner := out // the name less its .gz, whose extension says the format
			if gzipped {
				inner = strings.TrimSuffix(out, filepath.Ext(out))
			}
			if ext := filepath.Ext(inner); format == "" && !isModel && out != "-" && ext != "" {
				// x.csv (or x.csv.gz) written as JSON lines would surprise
				// whoever opens it.
				return usageErr(fmt.Errorf("--out %s: %q names no format export writes (.jsonl, .jsonl.gz, .parquet, .arrow); give --format to write it anyway", out, ext))
			}
			if format == "" { // a name that says nothing: the stage's kind does
				switch m.Kind {
				case "merge", "model", "qlora":
					format = "hf"
				case "gguf", "gguf_lora":
					format = "gguf"
				default:
					format = "jsonl"
				}
			}
			if gzipped && format != "jsonl" {
				return notGzipped(format)
			}
			if format == "gguf" || format == "hf" {
				if err := makeOutDir(out); err != nil {
					return err
				}
				return exportModel(entry, m, args[1], format, typ, typeGiven, out)
			}
			table := filepath.Join(entry, pipeline.TableFile)
			// A mix stage's rows carry their heldout flag: the training
			// rows export unless --heldout asks for the others.
			var keep *bool
			n, _ := m.Stats["heldout_examples"].(json.Number)
			heldOutRows := m.Kind == "mix" && n != "" && n != "0"
			switch {
			case heldOutRows:
				keep = &heldOut
			case heldOut && m.Kind == "pack":
				if _, err := os.Stat(filepath.Join(entry, stages.PackedHeldOutFile)); err != nil {
					return usageErr(fmt.Errorf("--heldout: stage %s (pack) holds no held-out rows; a pack stage after a mix stage with heldout does", args[1]))
				}
				table = filepath.Join(entry, stages.PackedHeldOutFile)
			case heldOut:
				return usageErr(fmt.Errorf("--heldout: stage %s (%s) holds no held-out rows; a mix stage with heldout, and the pack stage after it, do", args[1], m.Kind))
			}
			var left int64 // the rows --heldout (or its absence) left out
			write := func(w io.Writer, table string) (err error) {
				left, err = exportTable(w, table, format, gzipped, keep)
				return err
			}
			if format == "mt-bench" {
				answers, _ := m.Stats["answer_file"].(string)
				if m.Kind != "generate" || answers == "" {
					return usageErr(fmt.Errorf("stage %s (%s) holds no answers: --format mt-bench exports a generate stage's", args[1], m.Kind))
				}
				table, write = filepath.Join(entry, answers), copyFile
			}
			if _, err := os.Stat(table); err != nil {
				return usageErr(fmt.Errorf("stage %s (%s) holds no table, so not --format %s; a model exports with --format hf or gguf", args[1], m.Kind, format))
			}
			if out != "-" {
				like := args[1] + "." + format
				if format == "mt-bench" {
					like = filepath.Base(table) // MODEL_ID.jsonl, as the judge finds it
				}
				if err := makeOutDir(out); err != nil {
					return err
				}
				if err := checkWritable(out, like); err != nil {
					return usageErr(fmt.Errorf("--out: %w", err))
				}
			}
			ctx, stop := signalContext(2 * time.Second)
			defer stop()
			if out == "-" {
				if err := write(ctxWriter{ctx, stdout}, table); err != nil {
					return failErr(err)
				}
				return nil
			}
			if err := exportTo(ctx, out, func(w io.Writer) error { return write(w, table) }); err != nil {
				return failErr(err)
			}
			notice(slog.LevelInfo, "wrote "+out)
			if heldOutRows && !heldOut && left > 0 {
				notice(slog.LevelInfo, fmt.Sprintf("left out the %d held-out rows (heldout: true), which the pack stage keeps out of training; --heldout exports them", left))
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&format, "format", "", "jsonl, parquet, arrow (tables); mt-bench (a generate stage's answer file); gguf, hf (models); by default as --out's name says, else jsonl for a table, hf for a model")
	cmd.Flags().StringVar(&out, "out", "", "output file (or folder for hf), or - for a table on standard output")
	cmd.Flags().BoolVar(&heldOut, "heldout", false, "the held-out rows instead of the training rows: a mix stage's heldout examples, or a pack stage's rows packed apart from them")
	cmd.Flags().StringVar(&ggufType, "type", "", "GGUF type: q8_0, q6_k, q5_k_m, q5_k_s, q4_k_m, q4_k_s, q5_1, q5_0, q4_0, f16, bf16 or f32 (Q4_K_M too); by default as --out NAME.TYPE.gguf says, else q8_0")
	completeValues(cmd, "format", "jsonl", "parquet", "arrow", "mt-bench", "gguf", "hf")
	completeValues(cmd, "type", gguf.FileTypeNames()...)
	root.AddCommand(cmd)
}

// exportTable writes the Arrow IPC file table to w as format (jsonl,
// parquet or arrow), gzipped (JSON lines only) if asked, with rows of token
// ids as other trainers read them (packer.ExportView).
func exportTable(w io.Writer, table, format string, gzipped bool, heldOut *bool) (left int64, err error) {
	r, err := dataset.OpenIPC(table)
	if err != nil {
		return 0, err
	}
	defer r.Close()
	var rows dataset.Records = r
	var filter *heldOutFilter
	if c := r.Schema().FieldIndices(stages.ColHeldOut); heldOut != nil && len(c) == 1 {
		filter = &heldOutFilter{r: r, col: c[0], want: *heldOut}
		rows = filter
		defer filter.release()
	}
	if s, convert, ok := packer.ExportView(r.Schema()); ok {
		rows = dataset.Converted(rows, s, convert)
	} else if format == "arrow" && filter == nil {
		return 0, copyFile(w, table)
	}
	err = writeRows(w, &exportProgress{r: rows, last: time.Now()}, format, gzipped)
	if filter != nil {
		left = filter.left
	}
	return left, err
}

// writeRows writes rows as format (jsonl, optionally gzipped, parquet or
// arrow).
func writeRows(w io.Writer, rows dataset.Records, format string, gzipped bool) (err error) {
	switch format {
	case "parquet":
		_, err = dataset.ExportParquet(w, rows)
	case "arrow":
		_, err = dataset.ExportIPC(w, rows)
	default:
		if !gzipped {
			_, err = dataset.ExportJSONL(w, rows)
			return err
		}
		zw := gzip.NewWriter(w)
		if _, err = dataset.ExportJSONL(zw, rows); err == nil {
			err = zw.Close()
		}
	}
	return err
}

// heldOutFilter passes the rows of a mix stage's table whose heldout flag
// is want (a null flag reads as false), and counts the others.
type heldOutFilter struct {
	r     dataset.Records
	col   int
	want  bool
	queue []arrow.RecordBatch // runs of kept rows of the last batch read
	left  int64
}

func (f *heldOutFilter) Schema() *arrow.Schema { return f.r.Schema() }

func (f *heldOutFilter) Next() (arrow.RecordBatch, error) {
	for len(f.queue) == 0 {
		rec, err := f.r.Next()
		if err != nil {
			return nil, err
		}
		flags := rec.Column(f.col).(*array.Boolean)
		n, start := int(rec.NumRows()), -1
		for i := 0; i <= n; i++ {
			keep := i < n && (flags.IsValid(i) && flags.Value(i)) == f.want
			switch {
			case keep && start < 0:
				start = i
			case !keep && start >= 0:
				f.queue = append(f.queue, rec.NewSlice(int64(start), int64(i)))
				start = -1
			}
			if !keep && i < n {
				f.left++
			}
		}
		rec.Release()
	}
	b := f.queue[0]
	f.queue = f.queue[1:]
	return b, nil
}

func (f *heldOutFilter) release() {
	for _, b := range f.queue {
		b.Release()
	}
}

// exportProgress says every exportNoteEvery how many rows an export has
// written: a large table takes minutes.
type exportProgress struct {
	r    dataset.Records
	rows int64
	last time.Time
}

var exportNoteEvery = 10 * time.Second

func (p *exportProgress) Schema() *arrow.Schema { return p.r.Schema() }

func (p *exportProgress) Next() (arrow.RecordBatch, error) {
	if time.Since(p.last) >= exportNoteEvery {
		notice(slog.LevelInfo, fmt.Sprintf("export: %d rows written", p.rows))
		p.last = time.Now()
	}
	b, err := p.r.Next()
	if err == nil {
		p.rows += b.NumRows()
	}
	return b, err
}

func copyFile(w io.Writer, path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = io.Copy(w, f)
	return err
}

// exportTo writes path whole or not at all: on an error, a canceled ctx or
// a signal, the temporary file is removed and path is left as it was.
func exportTo(ctx context.Context, path string, write func(w io.Writer) error) error {
	p, err := atomicfile.CreateOutput(path)
	if err != nil {
		return fmt.Errorf("--out: %w", err)
	}
	if err := write(ctxWriter{ctx, p}); err != nil {
		p.Abort()
		return err
	}
	if err := ctx.Err(); err != nil {
		p.Abort()
		return err
	}
	return p.Commit()
}

// ctxWriter fails writes once ctx is done, so that a long export stops.
type ctxWriter struct {
	ctx context.Context
	w   io.Writer
}

func (c ctxWriter) Write(b []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, fmt.Errorf("interrupted: %w", err)
	}
	return c.w.Write(b)
}

// makeOutDir makes --out's folder, as merge does: FastChat's
// model_answer/ need not exist yet.
func makeOutDir(out string) error {
	if err := os.MkdirAll(filepath.Dir(filepath.Clean(out)), 0o755); err != nil {
		return failErr(fmt.Errorf("--out: %w", err))
	}
	return nil
}

// formatOfName is the export format a file name asks for by its
// extension, "" when it names none, and whether the name ends in .gz.
func formatOfName(out string) (format string, gzipped bool) {
	if strings.EqualFold(filepath.Ext(out), ".gz") {
		out, gzipped = strings.TrimSuffix(out, filepath.Ext(out)), true
	}
	return formatOfExt(filepath.Ext(out)), gzipped
}

func formatOfExt(ext string) string {
	switch strings.ToLower(ext) {
	case ".jsonl", ".json":
		return "jsonl"
	case ".parquet":
		return "parquet"
	case ".arrow", ".ipc":
		return "arrow"
	case ".gguf":
		return "gguf"
	}
	return ""
}

// typeOfName is the GGUF type a file named NAME.TYPE.gguf or NAME-TYPE.gguf says; an error
// when TYPE is one llama.cpp knows and this tool does not write (a
// q3_k_m named file would otherwise hold q8_0).
func typeOfName(out string) (gguf.FileType, bool, error) {
	base := filepath.Base(out)
	if !strings.EqualFold(filepath.Ext(base), ".gguf") {
		return 0, false, nil
	}
	// NAME.q8_0.gguf, or NAME-Q4_K_M.gguf as the Hub's files and
	// llama-quantize's outputs are named.
	stem := strings.TrimSuffix(base, filepath.Ext(base))
	i := strings.LastIndexAny(stem, ".-")
	if i < 0 {
		return 0, false, nil
	}
	t, err := gguf.ParseFileType(stem[i+1:])
	if errors.Is(err, gguf.ErrNotWritten) {
		return 0, false, fmt.Errorf("--out %s: %w", out, err)
	}
	return t, err == nil, nil
}

// ggufOutType is the type of the GGUF file out, from --type (typ, given
// or not) and from a NAME.TYPE.gguf name, which must agree.
func ggufOutType(out string, typ gguf.FileType, given bool) (gguf.FileType, bool, error) {
	nt, ok, err := typeOfName(out)
	switch {
	case err != nil:
		return 0, false, usageErr(err)
	case !ok:
		return typ, given, nil
	case given && nt != typ:
		return 0, false, usageErr(fmt.Errorf("--out %s is named for type %s, not --type %s: rename it, or leave --type out", out, nt, typ))
	}
	return nt, true, nil
}

// exportModel writes the checkpoint of a merge or model stage (or a gguf
// stage's file) to out, which must not exist. typeGiven says --type was
// given, which a gguf stage's file must then be of.
func exportModel(entry string, m *pipeline.Manifest, stage, format string, typ gguf.FileType, typeGiven bool, out string) error {
	if err := modelOutFree(out); err != nil {
		return err
	}
	model := entry
	switch m.Kind {
	case "merge":
		model = filepath.Join(entry, stages.MergedModelDir)
	case "qlora":
		if format != "hf" {
			return usageErr(fmt.Errorf("stage %s holds a PEFT adapter, which exports with --format hf; for llama.cpp, "+
				"pipeline gguf --model BASE --adapter %s --out NAME.gguf writes it as a GGUF LoRA adapter (BASE the model it trained on; in a DAG, a gguf_lora stage), "+
				"and a merge stage merges it into its base, which exports as GGUF", stage, shellQuote(filepath.Join(entry, trainer.AdapterDirName))))
		}
		model = filepath.Join(entry, trainer.AdapterDirName)
	case "model":
		if _, err := os.Stat(filepath.Join(entry, "tokenizer.json")); err != nil && format == "gguf" {
			return usageErr(fmt.Errorf("stage %s's random checkpoint has no tokenizer, which a GGUF file holds: export it with --format hf", stage))
		}
	case "gguf", "gguf_lora":
		if format != "gguf" {
			return usageErr(fmt.Errorf("stage %s holds a GGUF file; export it with --format gguf", stage))
		}
		if has, _ := m.Stats["type"].(string); typeGiven && has != typ.String() {
			other := "convert its merge stage"
			if m.Kind == "gguf_lora" {
				other = "set the stage's type"
			}
			return usageErr(fmt.Errorf("stage %s's GGUF file is %s, not --type %s: export it as it is (leave --type out), or %s", stage, has, typ, other))
		}
		files, _ := filepath.Glob(filepath.Join(entry, "*.gguf"))
		if len(files) != 1 {
			return failErr(fmt.Errorf("stage %s: %d GGUF files in %s", stage, len(files), entry))
		}
		ctx, stop := signalContext(2 * time.Second)
		defer stop()
		return doneOrFail(out, exportTo(ctx, out, func(w io.Writer) error { return copyFile(w, files[0]) }))
	default:
		return usageErr(fmt.Errorf("stage %s is of kind %s; models export from merge, model, gguf, gguf_lora or qlora (the adapter) stages", stage, m.Kind))
	}
	ctx, stop := signalContext(10 * time.Second)
	defer stop()
	if format == "hf" {
		return doneOrFail(out, copyDir(ctx, model, out))
	}
	return doneOrFail(out, convertGGUF(ctx, model, out, gguf.Options{Type: typ, Name: ggufName(out)}))
}

// modelOutFree checks that a model's --out is a path that does not exist.
func modelOutFree(out string) error {
	if out == "-" {
		return usageErr(errors.New("a model cannot go to standard output; give --out a path"))
	}
	if _, err := os.Lstat(out); err == nil {
		return failErr(fmt.Errorf("%s already exists; remove it or choose another --out", out))
	}
	if entry := enclosingEntry(out); entry != "" {
		return usageErr(fmt.Errorf("--out %s is inside the cache entry %s, which gc removes whole and verify does not know of: write it outside the cache", out, entry))
	}
	// A write killed outright (SIGKILL, a lost machine) leaves its
	// temporary file or folder beside out, as large as a model.
	clean := filepath.Clean(out)
	left, _ := filepath.Glob(filepath.Join(filepath.Dir(clean), "."+filepath.Base(clean)+".tmp*"))
	for _, l := range left {
		notice(slog.LevelWarn, fmt.Sprintf("pipeline: warning: %s is left from an interrupted write to %s; remove it unless that write still runs", l, out))
	}
	return nil
}

// enclosingEntry is the cache entry folder (CACHE/entries/ab/KEY, with its
// manifest) that path would be written inside, or "".
func enclosingEntry(path string) string {
	abs, err := filepath.Abs(path)
	if err != nil {
		return ""
	}
	for d := filepath.Dir(abs); d != filepath.Dir(d); d = filepath.Dir(d) {
		if filepath.Base(filepath.Dir(filepath.Dir(d))) != "entries" {
			continue
		}
		if _, err := pipeline.ReadManifest(d); err == nil {
			return d
		}
	}
	return ""
}

func doneOrFail(out string, err error) error {
	if err != nil {
		return failErr(err)
	}
	notice(slog.LevelInfo, "wrote "+out)
	return nil
}

// copyDir copies the files of a checkpoint folder (no subfolders) to out,
// which appears only complete; a canceled ctx stops it, leaving nothing.
func copyDir(ctx context.Context, from, out string) error {
	ents, err := os.ReadDir(from)
	if err != nil {
		return err
	}
	return atomicfile.Dir(out, func(tmp string) error {
		for _, e := range ents {
			if !e.Type().IsRegular() || pipeline.IsEntryFile(e.Name()) {
				continue // the cache's own files are not the checkpoint's
			}
			src := filepath.Join(from, e.Name())
			if err := atomicfile.Write(filepath.Join(tmp, e.Name()), func(w io.Writer) error { return copyFile(ctxWriter{ctx, w}, src) }); err != nil {
				return err
			}
		}
		return nil
	})
}
