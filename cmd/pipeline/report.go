package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"

	"gemmaft/report"
	"gemmaft/stages"
)

func init() {
	var (
		runs int
		out  string
	)
	cmd := &cobra.Command{
		Use:   "report SPEC --out FILE.html",
		Short: "Write a one-page HTML report of the last runs of a DAG",
		Long: `Write one self-contained HTML page (no network, no scripts, no external fonts;
readable on a phone) about the last runs of SPEC recorded in the cache:

  - the last run: the DAG with each stage's state, rows, size, time and cache hit or miss;
  - training: the loss curves (train, eval), learning rate and throughput of the
    adapters of the last N runs, overlaid, with the settings that set them apart;
  - evaluation: the eval results of each run as a table and as a trend;
  - data: packing efficiency, token counts and dropped examples of the data stages.

It reads the cache and changes nothing, so it can run while another run of SPEC
is in progress. Write it after each nightly run, next to the JSON report:

  pipeline run SPEC --report last-run.json; pipeline report SPEC --out last-run.html`,
		Example: `  pipeline report dags/gemma12b.yaml --out /var/log/gemmaft/last-run.html
  pipeline report dags/demo.yaml --runs 3 --out -        # to stdout`,
		Args:              exactArgs(1, "one spec file"),
		ValidArgsFunction: specArg,
		RunE: func(cmd *cobra.Command, args []string) error {
			if out == "" {
				return usageErr(errors.New("--out is required: the HTML file to write (- for stdout)"))
			}
			if runs < 1 {
				return usageErr(fmt.Errorf("--runs %d: want at least 1", runs))
			}
			if out != "-" {
				if err := checkWritable(out, "report.html"); err != nil {
					return usageErr(fmt.Errorf("--out: %w", err))
				}
				if ext := strings.ToLower(filepath.Ext(out)); ext != "" && ext != ".html" && ext != ".htm" {
					return usageErr(fmt.Errorf("--out %s: the report is an HTML page; name it NAME.html (a run's JSON record is run --report FILE.json)", out))
				}
			}
			dag, err := loadSpec(args[0])
			if err != nil {
				// The page still says so, where last night's would stand.
				if out != "-" {
					var page bytes.Buffer
					if report.WriteSpecError(&page, args[0], err) == nil && writeOutput(out, page.Bytes()) == nil {
						notice(slog.LevelInfo, "wrote "+out+" (the spec does not load)")
					}
				}
				return err
			}
			st, err := lookAtStore(dag)
			if err != nil {
				return err
			}
			defer st.Close()
			r, err := report.Collect(st, dag, runs)
			if err != nil {
				return failErr(err)
			}
			var buf bytes.Buffer
			if err := r.WriteHTML(&buf); err != nil {
				return failErr(err)
			}
			if out == "-" {
				_, err := stdout.Write(buf.Bytes())
				return err
			}
			if abs, err := filepath.Abs(out); err == nil {
				out = abs
			}
			if err := writeOutput(out, buf.Bytes()); err != nil {
				return failErr(err)
			}
			runsWord := "runs"
			if len(r.Runs) == 1 {
				runsWord = "run"
			}
			notice(slog.LevelInfo, fmt.Sprintf("wrote %s (%d %s)", out, len(r.Runs), runsWord))
			return nil
		},
	}
	cmd.Flags().IntVar(&runs, "runs", 10, "how many of the last runs to compare")
	cmd.Flags().StringVar(&out, "out", "", "the HTML file to write (- for stdout)")
	root.AddCommand(cmd)
}

// A watched entry is a stage's cache entry that may hold TensorBoard
// events, or with live set, the scratch folder of a stage in progress (or
// interrupted) that may hold the events it wrote as it ran.
type watched struct {
	stage, dir string
	live       bool
}

// eventsDir is where the events of w are, or "" when there are none.
func (w watched) eventsDir() string {
	d := filepath.Join(w.dir, stages.EventsDir)
	if w.live {
		d = filepath.Join(w.dir, stages.LiveEventsDir)
	}
	if fi, err := os.Stat(d); err == nil && fi.IsDir() {
		return d
	}
	return ""
}

// printWatch tells where to watch the runs of spec: the TensorBoard events
// of the entries given (named by stage when there may be several), and the
// HTML report.
func printWatch(w io.Writer, spec string, entries []watched, named bool) {
	for _, e := range entries {
		if d := e.eventsDir(); d != "" {
			name := ""
			if named {
				name = e.stage + ": "
			}
			if e.live {
				name = e.stage + " (in progress or interrupted): "
			}
			fmt.Fprintf(w, "events    %stensorboard --logdir %s\n", name, shellQuote(d))
		}
	}
	fmt.Fprintf(w, "report    pipeline report %s --out report.html\n", specArgs(spec))
}
