package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"gemmaft/dataset"
	"gemmaft/gguf"
	"gemmaft/internal/atomicfile"
	"gemmaft/pipeline"
	"gemmaft/stages"
)

func init() {
	var format, out, ggufType string
	cmd := &cobra.Command{
		Use:   "export SPEC STAGE --format jsonl|parquet|arrow|gguf|hf --out PATH",
		Short: "Write a stage's cached table or model out for other tools",
		Long: `Write the cached output of STAGE to PATH. The stage must be cached; run it first.

Tables: as JSON lines (one object per row, lists as JSON arrays), as Parquet, or as
the Arrow IPC file itself. PATH (a file, or - for standard output) appears only when
complete.

Models, from a merge or model stage (a Hugging Face checkpoint): --format hf copies
the checkpoint folder to PATH; --format gguf converts it to a GGUF file for
llama.cpp and Ollama, of --type q8_0 (default), q4_0, f16 or bf16. A gguf stage's
file is copied as it is. A model's PATH must not exist, and appears only when
complete. A failure or an interrupt leaves PATH as it was and no temporary file
behind.`,
		Example: `  pipeline export dags/gemma12b.yaml pack --format parquet --out packed.parquet
  pipeline export dags/demo.yaml chat --format jsonl --out - | head
  pipeline export dags/gemma12b.yaml merged --format gguf --type q4_0 --out tr.q4_0.gguf
  pipeline export dags/gemma12b.yaml merged --format hf --out ./gemma3-12b-tr`,
		Args: exactArgs(2, "a spec file and a stage name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if out == "" {
				return usageErr(errors.New("--out is required (a file, or - for standard output)"))
			}
			if format == "gguf" || format == "hf" {
				return exportModel(args[0], args[1], format, ggufType, out)
			}
			var write func(w io.Writer, table string) error
			switch format {
			case "jsonl":
				write = func(w io.Writer, table string) error { _, err := dataset.ExportJSONL(w, table); return err }
			case "parquet":
				write = func(w io.Writer, table string) error { _, err := dataset.ExportParquet(w, table); return err }
			case "arrow":
				write = copyFile
			default:
				return usageErr(fmt.Errorf("--format %q: want jsonl, parquet, arrow, gguf or hf", format))
			}
			entry, _, err := cachedEntry(args[0], args[1])
			if err != nil {
				return err
			}
			table := filepath.Join(entry, pipeline.TableFile)
			if _, err := os.Stat(table); err != nil {
				return failErr(fmt.Errorf("stage %s has no table to export (its entry holds files: %s)", args[1], entry))
			}
			ctx, stop := signalContext(2 * time.Second)
			defer stop()
			if out == "-" {
				if err := write(ctxWriter{ctx, os.Stdout}, table); err != nil {
					return failErr(err)
				}
				return nil
			}
			if err := exportTo(ctx, out, func(w io.Writer) error { return write(w, table) }); err != nil {
				return failErr(err)
			}
			fmt.Fprintf(os.Stderr, "wrote %s\n", out)
			return nil
		},
	}
	cmd.Flags().StringVar(&format, "format", "jsonl", "jsonl, parquet, arrow (tables); gguf, hf (models)")
	cmd.Flags().StringVar(&out, "out", "", "output file (or folder for hf), or - for a table on standard output")
	cmd.Flags().StringVar(&ggufType, "type", "q8_0", "GGUF type: q8_0, q4_0, f16, bf16 or f32")
	root.AddCommand(cmd)
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
	p, err := atomicfile.Create(path)
	if err != nil {
		return fmt.Errorf("--out: %w", err)
	}
	tmp := p.TempName()
	defer atInterrupt(func() { os.Remove(tmp) })()
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

// exportModel writes the checkpoint of a merge or model stage (or a gguf
// stage's file) to out, which must not exist.
func exportModel(spec, stage, format, typeName, out string) error {
	typ, err := gguf.ParseType(typeName)
	if err != nil {
		return usageErr(fmt.Errorf("--type: %w", err))
	}
	if out == "-" {
		return usageErr(errors.New("a model cannot go to standard output; give --out a path"))
	}
	if _, err := os.Lstat(out); err == nil {
		return failErr(fmt.Errorf("%s already exists; remove it or choose another --out", out))
	}
	entry, m, err := cachedEntry(spec, stage)
	if err != nil {
		return err
	}
	model := entry
	switch m.Kind {
	case "merge":
		model = filepath.Join(entry, stages.MergedModelDir)
	case "model":
	case "gguf":
		if format != "gguf" {
			return usageErr(fmt.Errorf("stage %s holds a GGUF file; export it with --format gguf", stage))
		}
		files, _ := filepath.Glob(filepath.Join(entry, "*.gguf"))
		if len(files) != 1 {
			return failErr(fmt.Errorf("stage %s: %d GGUF files in %s", stage, len(files), entry))
		}
		ctx, stop := signalContext(2 * time.Second)
		defer stop()
		return doneOrFail(out, exportTo(ctx, out, func(w io.Writer) error { return copyFile(w, files[0]) }))
	default:
		return usageErr(fmt.Errorf("stage %s is of kind %s; models export from merge, model or gguf stages", stage, m.Kind))
	}
	if format == "hf" {
		return doneOrFail(out, copyDir(model, out))
	}
	return doneOrFail(out, gguf.Gemma3(model, out, gguf.Options{Type: typ, Name: strings.TrimSuffix(strings.TrimSuffix(filepath.Base(out), ".gguf"), "."+typ.String())}))
}

func doneOrFail(out string, err error) error {
	if err != nil {
		return failErr(err)
	}
	fmt.Fprintf(os.Stderr, "wrote %s\n", out)
	return nil
}

// copyDir copies the files of a checkpoint folder (no subfolders) to out,
// which appears only complete.
func copyDir(from, out string) error {
	ents, err := os.ReadDir(from)
	if err != nil {
		return err
	}
	return atomicfile.Dir(out, func(tmp string) error {
		for _, e := range ents {
			if !e.Type().IsRegular() {
				continue
			}
			src := filepath.Join(from, e.Name())
			if err := atomicfile.Write(filepath.Join(tmp, e.Name()), func(w io.Writer) error { return copyFile(w, src) }); err != nil {
				return err
			}
		}
		return nil
	})
}
