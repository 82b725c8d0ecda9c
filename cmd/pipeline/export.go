package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"

	"gemmaft/dataset"
	"gemmaft/internal/atomicfile"
	"gemmaft/pipeline"
)

func init() {
	var format, out string
	cmd := &cobra.Command{
		Use:   "export SPEC STAGE --format jsonl|parquet|arrow --out FILE",
		Short: "Write a stage's cached table to a file for other tools",
		Long: `Write the cached table of STAGE to FILE: as JSON lines (one object per row, lists as
JSON arrays), as Parquet, or as the Arrow IPC file itself. The stage must be cached;
run it first. FILE appears only when complete: a failure or an interrupt leaves
it as it was and no temporary file behind.`,
		Example: `  pipeline export dags/gemma12b.yaml pack --format parquet --out packed.parquet
  pipeline export dags/demo.yaml chat --format jsonl --out - | head`,
		Args: exactArgs(2, "a spec file and a stage name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if out == "" {
				return usageErr(errors.New("--out is required (a file, or - for standard output)"))
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
				return usageErr(fmt.Errorf("--format %q: want jsonl, parquet or arrow", format))
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
	cmd.Flags().StringVar(&format, "format", "jsonl", "jsonl, parquet or arrow")
	cmd.Flags().StringVar(&out, "out", "", "output file, or - for standard output")
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
