package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"gemmaft/internal/atomicfile"
	"gemmaft/pipeline"
	"gemmaft/ranks"
)

func init() {
	var (
		opts     pipeline.Options
		jobs     int
		report   string
		noWait   bool
		gpus     int
		progress string
		logEvery time.Duration
	)
	cmd := &cobra.Command{
		Use:   "run SPEC",
		Short: "Run a DAG, computing only what is not cached",
		Long: `Run the DAG in SPEC. Each stage's output is cached under a key made of its kind,
its parameters (defaults filled in), the keys of its inputs and the digests of the
files it reads; a stage whose key is cached is not computed again.

Stages stream rows to each other as they compute. A stage that fails leaves no
partial cache entry and cancels the stages that need it; the others run to the end
and are cached. The run then exits 1, naming each failed stage and its cause.

If another run of the same SPEC holds its lock (an overlapping cron job), run waits
for it to finish and then uses what it computed; with --no-wait it exits at once
with code 75, as it does on reaching a stage whose entry a run of another spec is
computing.

On SIGINT, SIGTERM or SIGHUP the running stages stop, the table so far is printed
and the exit code is 130, 143 or 129; a second signal stops at once. A closed
output pipe (a log reader gone) does not stop the run: it runs to the end,
records itself, and exits 1 for the output it could not write. --report is checked to be
writable before anything runs, and written whole or not at all.

The table at the end is on stdout; with --log-format json it is JSON lines too (a
stage each, then the run's ok and seconds), so that a log of both streams is all JSON.

Exit codes: 0 success, 1 a stage failed, 2 usage or spec error, 75 busy (--no-wait),
130/143/129 interrupted.

Training on several GPUs: --gpus N starts N processes on this machine; torchrun,
srun and Kubernetes training operators start them across machines, setting RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (or SLURM_PROCID, SLURM_NTASKS,
SLURM_LOCALID and the job's node list), which every process reads. Each runs the same
command over the same cache folder: rank 0 runs the DAG, records the run and writes
the training stage's entry; each data stage is computed once, by whichever rank
takes its entry's lock first, and found cached by the others (a cache on a disk of
each node computes it once a node). The other ranks then train their share of each
step with rank 0 and stop there. A rank that fails or goes away stops the others.`,
		Example: `  pipeline run dags/gemma12b.yaml
  pipeline run dags/gemma12b.yaml --until pack        # preprocess only
  pipeline run dags/gemma12b.yaml --force tokens      # recompute one stage
  pipeline run dags/gemma12b.yaml --no-wait --report /var/log/pipeline/last.json
  pipeline run dags/gemma12b.yaml --gpus 2            # both GPUs of this machine
  torchrun --nnodes 2 --nproc-per-node 8 --no-python pipeline run dags/gemma27b.yaml`,
		Args:              exactArgs(1, "one spec file"),
		ValidArgsFunction: specArg,
		RunE: func(cmd *cobra.Command, args []string) error {
			if jobs < 0 {
				return usageErr(errors.New("--jobs must be at least 1 (or 0, the default: every core)"))
			}
			if logEvery <= 0 {
				return usageErr(fmt.Errorf("--log-every %v: want a positive interval, e.g. 30s", logEvery))
			}
			if !slices.Contains([]string{"auto", "tty", "log", "none"}, progress) {
				return usageErr(fmt.Errorf("--progress %q: want auto, tty, log or none", progress))
			}
			// A report that cannot be written is found out now, not after
			// hours of training.
			if report == "-" {
				return usageErr(errors.New("--report -: the run's table goes to standard output; give the report a file, e.g. --report last.json"))
			}
			if report != "" {
				if err := checkWritable(report, "report.json"); err != nil {
					return usageErr(fmt.Errorf("--report: %w", err))
				}
			}
			dag, err := loadSpec(args[0])
			if err != nil {
				if report != "" { // not yesterday's report saying ok
					now := time.Now().UTC()
					rec := &pipeline.RunRecord{Spec: args[0], Started: now, Finished: now, Error: err.Error(), Program: pipeline.Version(), Stages: []pipeline.StageRecord{}}
					if werr := writeReport(report, rec); werr != nil {
						notice(slog.LevelError, fmt.Sprintf("pipeline: could not write the report %s: %v", report, werr))
					}
				}
				return err
			}
			// A file or model the run needs and cannot have is found
			// before the cache is opened or locked.
			if err := dag.Check(opts); err != nil {
				recordUnstarted(dag, opts, report, err)
				return usageErr(err)
			}
			// Several GPUs share a training stage; a run that trains
			// nothing runs alone. Checked before any rank starts.
			if gpus > 1 {
				switch trains := qloraStages(dag, opts); {
				case len(trains) == 0:
					notice(slog.LevelWarn, fmt.Sprintf("pipeline: --gpus %d: this run trains nothing; it runs as one process", gpus))
					gpus = 1
				case len(trains) > 1:
					return usageErr(fmt.Errorf("--gpus %d: the ranks train one stage at a time, and this run selects %s: add --until or --only", gpus, strings.Join(trains, ", ")))
				}
			}
			if started, err := startRanks(gpus); started {
				return err
			}
			if r, ok, _ := ranks.FromEnv(os.Getenv); !ok || r.Rank == 0 { // once, not once a rank
				warnUnselectedForce(dag, opts)
			}
			rp, err := planRanks(dag, opts)
			if err != nil {
				return err
			}
			collective := ""
			if rp.follows() {
				if rp.stage == "" {
					notice(slog.LevelInfo, fmt.Sprintf("%v: nothing to do; only the training stage runs on every rank", rp.rank))
					return nil
				}
				// Over the same cache as rank 0.
				opts, report, collective = rp.followerOptions(opts), "", rp.stage
			}
			st, err := openStore(dag)
			if err != nil {
				return err
			}
			defer st.Close()
			log, err := newLogger()
			if err != nil {
				return err
			}
			eng := &pipeline.Engine{Store: st, Log: log, NoWait: noWait, Collective: collective, Ranked: rp != nil && rp.rank.Size > 1}
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
			}
			if jobs > 0 {
				// Stages parallelise with goroutines; this bounds the cores they use.
				runtime.GOMAXPROCS(jobs)
			}

			// SIGINT, SIGTERM or SIGHUP stops the stages; the run is
			// recorded, the table so far printed, and the exit code is 130,
			// 143 or 129. A log reader gone (`| tee` ended) is no reason to
			// stop: writes to its pipe fail and the run carries on.
			signal.Ignore(syscall.SIGPIPE)
			ctx, stop := signalContext(30 * time.Second)
			defer stop()
			log.Info("run", "dag", dag.Name, "spec", dag.Path, "cache", st.Root)
			rec, runErr := eng.Run(ctx, dag, opts)
			var reportErr error
			if report != "" {
				if reportErr = writeReport(report, rec); reportErr != nil {
					log.Error("could not write the report", "file", report, "err", reportErr)
				}
			}
			if runErr != nil {
				switch {
				case pipeline.IsBusy(runErr):
					if len(rec.Stages) > 0 { // a stage another spec's run computes: what ran before it
						printSummary(rec)
					}
					return &exitError{exitLockBusy, runErr}
				case pipeline.IsSpecError(runErr):
					return usageErr(runErr)
				}
				if len(rec.Stages) > 0 {
					printSummary(rec)
				}
				return failErr(everyFailure(rec, runErr))
			}
			printSummary(rec)
			if reportErr != nil {
				return failErr(fmt.Errorf("the run succeeded, but its report was not written: %w", reportErr))
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&opts.Until, "until", "", "run this stage and the stages it needs, nothing after it")
	f.StringVar(&opts.Only, "only", "", "run only this stage (its inputs must be cached)")
	f.StringArrayVar(&opts.Force, "force", nil, "recompute this stage even if cached (repeatable; \"all\" for every stage)")
	f.IntVar(&jobs, "jobs", 0, "cores the run may use (default: all)")
	f.StringVar(&report, "report", "", "write a JSON report of the run to this file")
	f.BoolVar(&noWait, "no-wait", false, "exit at once (code 75) if another run of this spec holds its lock or computes an entry this run needs, or gc is cleaning the cache")
	f.IntVar(&gpus, "gpus", 1, "train on this many GPUs of this machine, one process each (under torchrun, srun or a training operator, leave it out)")
	f.StringVar(&progress, "progress", "auto", "progress display: auto (live lines on a terminal, log lines otherwise), tty, log or none")
	f.DurationVar(&logEvery, "log-every", 30*time.Second, "interval of progress log lines when not on a terminal")
	completeStageFlags(cmd)
	completeValues(cmd, "progress", "auto", "tty", "log", "none")
	root.AddCommand(cmd)
}

// recordUnstarted keeps a run that its stages stopped before it began (a
// data file gone, a model not downloaded) where nightly runs are watched:
// in --report, and in the cache's run history when the cache exists, so
// that status and report say that the night failed. A cache is not made
// for it: a first try of a spec with a typo leaves nothing behind.
func recordUnstarted(dag *pipeline.DAG, opts pipeline.Options, report string, cause error) {
	if r, ok, _ := ranks.FromEnv(os.Getenv); ok && r.Rank != 0 {
		return // rank 0 records it
	}
	var st *pipeline.Store
	exists := false
	root, err := pipeline.CacheRoot(cacheFlag, dag)
	if err == nil {
		st, exists, err = pipeline.LookAtStore(root)
	}
	var rec *pipeline.RunRecord
	if err == nil && exists {
		rec, err = st.RecordUnstarted(dag, opts, cause)
		st.Close()
		if err != nil {
			notice(slog.LevelError, fmt.Sprintf("pipeline: could not record the run: %v", err))
		}
	} else {
		if st != nil {
			root = st.Root
		}
		rec = pipeline.UnstartedRecord(dag, opts, cause, root)
	}
	if report != "" {
		if err := writeReport(report, rec); err != nil {
			notice(slog.LevelError, fmt.Sprintf("pipeline: could not write the report %s: %v", report, err))
		}
	}
}

// writeReport writes the run's record to path, whole or not at all.
func writeReport(path string, rec *pipeline.RunRecord) error {
	data, err := json.MarshalIndent(rec, "", "  ")
	if err != nil {
		return err
	}
	return writeOutput(path, append(data, '\n'))
}

// writeOutput writes data to a path the user named (--out, --report),
// whole or not at all; a device or a FIFO there is written in place
// (atomicfile.CreateOutput).
func writeOutput(path string, data []byte) error {
	p, err := atomicfile.CreateOutput(path)
	if err != nil {
		return err
	}
	if _, err := p.Write(data); err != nil {
		p.Abort()
		return err
	}
	return p.Commit()
}

// checkWritable says why a file could not be written at path: its folder
// is missing or not writable, or path is a folder (in which a file called
// like would do).
func checkWritable(path, like string) error {
	if target, err := filepath.EvalSymlinks(path); err == nil {
		path = target // written through the link (atomicfile.CreateOutput)
	}
	if fi, err := os.Stat(path); err == nil && !fi.IsDir() && !fi.Mode().IsRegular() {
		return nil // a device or a FIFO, written in place: nothing to replace in its folder
	}
	dir := filepath.Dir(path)
	fi, err := os.Stat(dir)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("the folder %s does not exist; create it first", dir)
	case err != nil:
		return err
	case !fi.IsDir():
		return fmt.Errorf("%s is not a folder", dir)
	}
	if fi, err := os.Stat(path); err == nil && fi.IsDir() {
		return fmt.Errorf("%s is a folder; give a file name, e.g. %s", path, filepath.Join(path, like))
	}
	f, err := os.CreateTemp(dir, ".pipeline-write-test-*")
	if err != nil {
		return fmt.Errorf("cannot write in %s: %w", dir, err)
	}
	f.Close()
	os.Remove(f.Name())
	return nil
}

// everyFailure adds to a run's error the reasons of the other stages that
// failed beside the first: stages run side by side, and a user fixing one
// should not meet the next only on the following run.
func everyFailure(rec *pipeline.RunRecord, runErr error) error {
	errs := []error{runErr}
	for _, s := range rec.Stages {
		if s.State == "failed" && s.Error != "" && !strings.Contains(runErr.Error(), s.Error) {
			errs = append(errs, fmt.Errorf("stage %s (%s): %s", s.Name, s.Kind, s.Error))
		}
	}
	return errors.Join(errs...)
}

// printSummary shows, on stdout, what each stage did and where its output
// is: a table, or, with --log-format json, a JSON object a line (a stage
// each, then the run), so that a log of stdout and stderr together holds
// nothing but JSON.
func printSummary(rec *pipeline.RunRecord) {
	if logFormat == "json" {
		enc := json.NewEncoder(stdout)
		for _, s := range rec.Stages {
			if s.State != "not selected" {
				enc.Encode(map[string]any{"stage": s.Name, "state": s.State, "rows": s.Rows, "seconds": s.Seconds,
					"wait_seconds": s.WaitSeconds, "output": s.Entry})
			}
		}
		enc.Encode(map[string]any{"dag": rec.DAG, "ok": rec.OK, "seconds": rec.Seconds})
		return
	}
	w := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "STAGE\tSTATE\tROWS\tSECONDS\tOUTPUT")
	for _, s := range rec.Stages {
		if s.State == "not selected" {
			continue
		}
		secs := "-"
		if s.State != "cached" {
			secs = fmt.Sprintf("%.2f", s.Seconds)
			if s.WaitSeconds >= 0.5 { // a stage that waited on another's entry: its own time apart
				secs = fmt.Sprintf("%.2f (%.2f waiting)", s.Seconds, s.WaitSeconds)
			}
		}
		rows := "-" // a stage stopped or failed wrote none, whatever it had read
		if s.State == "computed" || s.State == "cached" {
			rows = strconv.FormatInt(s.Rows, 10)
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\n", s.Name, s.State, rows, secs, s.Entry)
	}
	w.Flush()
	if rec.OK {
		fmt.Fprintf(stdout, "done in %.2fs\n", rec.Seconds)
	} else {
		fmt.Fprintf(stdout, "stopped after %.2fs\n", rec.Seconds)
	}
}
