package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"runtime"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"gemmaft/pipeline"
)

func init() {
	var (
		opts     pipeline.Options
		jobs     int
		report   string
		noWait   bool
		progress string
		logEvery time.Duration
	)
	cmd := &cobra.Command{
		Use:   "run SPEC",
		Short: "Run a DAG, computing only what is not cached",
		Long: `Run the DAG in SPEC. Each stage's output is cached under a key made of its kind,
its parameters (defaults filled in), the keys of its inputs and the digests of the
files it reads; a stage whose key is cached is not computed again.

Stages stream rows to each other as they compute. A failure stops the run, names the
stage and the cause, and leaves no partial cache entry.

If another run of the same SPEC holds its lock (an overlapping cron job), run waits
for it to finish and then uses what it computed; with --no-wait it exits at once
with code 75.

Exit codes: 0 success, 1 a stage failed, 2 usage or spec error, 75 busy (--no-wait).`,
		Example: `  pipeline run dags/gemma12b.yaml
  pipeline run dags/gemma12b.yaml --until pack        # preprocess only
  pipeline run dags/gemma12b.yaml --force tokens      # recompute one stage
  pipeline run dags/gemma12b.yaml --no-wait --report /var/log/pipeline/last.json`,
		Args: exactArgs(1, "one spec file"),
		RunE: func(cmd *cobra.Command, args []string) error {
			dag, st, err := specAndStore(args)
			if err != nil {
				return err
			}
			defer st.Close()
			log, err := newLogger()
			if err != nil {
				return err
			}
			eng := &pipeline.Engine{Store: st, Log: log, NoWait: noWait}
			switch progress {
			case "auto":
				if stderrIsTerminal() {
					eng.Progress = pipeline.TTYDisplay{W: os.Stderr, Logs: logSink}
				} else {
					eng.Progress = pipeline.LogDisplay{Log: log, Every: logEvery}
				}
			case "tty":
				eng.Progress = pipeline.TTYDisplay{W: os.Stderr, Logs: logSink}
			case "log":
				eng.Progress = pipeline.LogDisplay{Log: log, Every: logEvery}
			case "none":
			default:
				return usageErr(fmt.Errorf("--progress %q: want auto, tty, log or none", progress))
			}
			if jobs < 0 {
				return usageErr(errors.New("--jobs must be positive"))
			}
			if jobs > 0 {
				// Stages parallelise with goroutines; this bounds the cores they use.
				runtime.GOMAXPROCS(jobs)
			}

			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			log.Info("run", "dag", dag.Name, "spec", dag.Path, "cache", st.Root)
			rec, runErr := eng.Run(ctx, dag, opts)
			if report != "" {
				if err := writeReport(report, rec); err != nil {
					log.Error("could not write the report", "file", report, "err", err)
				}
			}
			if runErr != nil {
				switch {
				case pipeline.IsBusy(runErr):
					return &exitError{exitLockBusy, runErr}
				case pipeline.IsSpecError(runErr):
					return usageErr(runErr)
				}
				return failErr(runErr)
			}
			printSummary(rec)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&opts.Until, "until", "", "run this stage and the stages it needs, nothing after it")
	f.StringVar(&opts.Only, "only", "", "run only this stage (its inputs must be cached)")
	f.StringArrayVar(&opts.Force, "force", nil, "recompute this stage even if cached (repeatable; \"all\" for every stage)")
	f.IntVar(&jobs, "jobs", 0, "cores the run may use (default: all)")
	f.StringVar(&report, "report", "", "write a JSON report of the run to this file")
	f.BoolVar(&noWait, "no-wait", false, "exit at once (code 75) if another run of this spec holds its lock")
	f.StringVar(&progress, "progress", "auto", "progress display: auto (live lines on a terminal, log lines otherwise), tty, log or none")
	f.DurationVar(&logEvery, "log-every", 30*time.Second, "interval of progress log lines when not on a terminal")
	root.AddCommand(cmd)
}

func writeReport(path string, rec *pipeline.RunRecord) error {
	data, err := json.MarshalIndent(rec, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(data, '\n'), 0o644)
}

// printSummary shows, on stdout, what each stage did and where its output is.
func printSummary(rec *pipeline.RunRecord) {
	w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "STAGE\tSTATE\tROWS\tSECONDS\tOUTPUT")
	for _, s := range rec.Stages {
		if s.State == "not selected" {
			continue
		}
		secs := "-"
		if s.State == "computed" {
			secs = fmt.Sprintf("%.2f", s.Seconds)
		}
		fmt.Fprintf(w, "%s\t%s\t%d\t%s\t%s\n", s.Name, s.State, s.Rows, secs, s.Entry)
	}
	w.Flush()
	fmt.Printf("done in %.2fs\n", rec.Seconds)
}
