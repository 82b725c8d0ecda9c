package main

import (
	"errors"
	"fmt"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"gemmaft/pipeline"
)

func init() {
	var check bool
	cmd := &cobra.Command{
		Use:   "status SPEC",
		Short: "Show the state of each stage's cached output and of the last run",
		Long: `Show, for each stage of SPEC, whether its current output is cached, missing or
damaged, with its rows, size and when it was computed; whether a run of SPEC is in
progress now; how the last run ended; and where to watch the runs: the TensorBoard
events of the training stages, and the command that writes the HTML report.

With --check it exits 1 (after printing the same) when the last run failed, was
interrupted or did not finish, when none is recorded, or when a stage's entry is
damaged: a health check for monitoring (the exit code of the cron job itself says
the same of each run).`,
		Args:              exactArgs(1, "one spec file"),
		ValidArgsFunction: specArg,
		RunE: func(cmd *cobra.Command, args []string) error {
			dag, err := loadSpec(args[0])
			if err != nil {
				return err
			}
			st, err := lookAtStore(dag)
			if err != nil {
				return err
			}
			defer st.Close()
			s, err := st.Status(dag)
			if err != nil {
				return specOrFailErr(err)
			}
			fmt.Fprintf(stdout, "dag %s (%s)\ncache %s\n", dag.Name, dag.Path, st.Root)
			if s.RunningBy != "" {
				fmt.Fprintf(stdout, "running now: %s\n", s.RunningBy)
			}
			last := "last run"
			if s.Unfinished != "" {
				fmt.Fprintf(stdout, "last run: DID NOT FINISH: %s; it was %s\n", s.Unfinished, pipeline.UnfinishedCauses)
				last = "the run before it" // recorded, ended well or not
			}
			if s.Last != nil {
				result := "ok"
				switch {
				case s.Last.Interrupted:
					result = "INTERRUPTED: " + s.Last.Error
				case !s.Last.OK:
					result = "FAILED: " + s.Last.Error
				}
				fmt.Fprintf(stdout, "%s: %s, %.1fs, %s\n", last, pipeline.LocalTime(s.Last.Started), s.Last.Seconds, result)
			} else {
				fmt.Fprintf(stdout, "%s: never\n", last)
			}
			fmt.Fprintln(stdout)
			w := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "STAGE\tKIND\tSTATE\tROWS\tSIZE\tCOMPUTED\tKEY")
			for _, e := range s.Stages {
				rows, size, when := "-", "-", "-"
				if e.Manifest != nil {
					rows = fmt.Sprint(e.Manifest.Rows)
					when = pipeline.LocalTime(e.Manifest.Finished)
				}
				if e.State == "cached" { // a damaged entry's files are not what its manifest says
					size = pipeline.HumanBytes(e.Size)
				}
				state := e.State
				if e.Damage != nil {
					state += " (" + e.Damage.Error() + ")"
				}
				fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", e.Name, e.Kind, state, rows, size, when, keyColumn(e.Key))
			}
			if err := w.Flush(); err != nil {
				return err
			}
			for _, e := range s.Stages {
				switch {
				case e.Unavailable != nil:
					fmt.Fprintf(stdout, "\n%s is unavailable: %v\n", e.Name, e.Unavailable)
				case e.State == "missing" && e.Why != "":
					fmt.Fprintf(stdout, "\n%s is missing: %s\n", e.Name, e.Why)
				}
			}
			var entries []watched
			for _, e := range s.Stages {
				switch {
				case e.Key == "":
				case e.State == "cached":
					entries = append(entries, watched{stage: e.Name, dir: st.EntryDir(e.Key)})
				default:
					entries = append(entries, watched{stage: e.Name, dir: st.ScratchDir(e.Key), live: true})
				}
			}
			fmt.Fprintln(stdout)
			printWatch(stdout, args[0], entries, true)
			if check {
				return failErrIf(unhealthy(s))
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&check, "check", false, "exit 1 when the last run did not end well (or none is recorded), or an entry is damaged")
	root.AddCommand(cmd)
}

// unhealthy says what status --check finds wrong with s, or nil.
func unhealthy(s *pipeline.Status) error {
	switch {
	case s.Unfinished != "":
		return errors.New("status --check: the last run did not finish")
	case s.Last == nil:
		return errors.New("status --check: no run is recorded")
	case s.Last.Interrupted:
		return errors.New("status --check: the last run was interrupted")
	case !s.Last.OK:
		return errors.New("status --check: the last run failed")
	}
	for _, e := range s.Stages {
		if e.Damage != nil {
			return fmt.Errorf("status --check: stage %s's entry is damaged", e.Name)
		}
	}
	return nil
}

// failErrIf is failErr(err), nil when err is.
func failErrIf(err error) error {
	if err == nil {
		return nil
	}
	return failErr(err)
}
