package main

import (
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"gemmaft/pipeline"
)

func init() {
	var (
		keepLast  int
		olderThan string
		dryRun    bool
		noWait    bool
	)
	cmd := &cobra.Command{
		Use:   "gc",
		Short: "Remove cache entries that recent runs do not use",
		Long: `Remove cache entries that no recent run uses, and leftovers of interrupted runs.

An entry is kept when one of the last --keep-last runs of any DAG used it, or, with
--older-than, when it was used more recently than that (with --older-than, the runs
of a spec that no longer exists keep nothing once the last is that old). A stage
those runs made no entry for (left out by --until, failed, canceled by a failure,
or in a run stopped before it began) keeps the entry it last had, and what a run killed before it was recorded (SIGKILL,
the OOM killer) planned stays until that DAG runs again. Leftovers are the
unfinished outputs of killed runs (tmp/) and training checkpoints in which nothing
changed for a week (scratch/). gc waits (saying so) until no run uses the cache
(with --no-wait it exits at once with code 75 instead), and a run that starts while
gc removes entries waits for it; --dry-run waits for no run.`,
		Example: `  pipeline gc                              # keep what the last 3 runs of each DAG used
  pipeline gc --keep-last 1 --older-than 30d --dry-run`,
		Args: exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, args []string) error {
			switch {
			case keepLast < 0:
				return usageErr(errors.New("--keep-last must not be negative"))
			case keepLast == 0 && olderThan == "" && !dryRun:
				// Many tools read 0 as no limit; here it would empty the cache.
				return usageErr(fmt.Errorf("--keep-last 0 keeps the entries of no run: every entry would go, trained adapters too; give 1 or more, add --older-than to keep by age alone, --dry-run to see what would go, or remove the cache folder to empty it"))
			}
			opts := pipeline.GCOptions{KeepLast: keepLast, DryRun: dryRun, NoWait: noWait}
			if olderThan != "" {
				d, err := parseAge(olderThan)
				if err != nil {
					return usageErr(fmt.Errorf("--older-than: %w", err))
				}
				if strings.HasSuffix(olderThan, "m") && d < time.Hour {
					// As durations go, m is minutes; a month is 30d.
					notice(slog.LevelWarn, fmt.Sprintf("gc: --older-than %s is %v (minutes); a month is 30d", olderThan, d))
				}
				opts.OlderThan = d
			}
			st, err := openExistingStore(nil)
			if err != nil {
				return err
			}
			if opts.Log, err = newLogger(); err != nil {
				return err
			}
			ctx, stop := signalContext(5 * time.Second)
			defer stop()
			res, err := st.GC(ctx, opts)
			if pipeline.IsBusy(err) {
				return &exitError{exitLockBusy, err}
			}
			if err != nil {
				return failErr(err)
			}
			verb := "removed"
			if dryRun {
				verb = "would remove"
			}
			for i, k := range res.Removed {
				if what := res.RemovedWhat[i]; what != "" {
					fmt.Fprintf(stdout, "%s %s: %s\n", verb, pipeline.ShortKey(k), what)
				} else {
					fmt.Fprintf(stdout, "%s %s\n", verb, k)
				}
			}
			entries := "entries"
			if len(res.Removed) == 1 {
				entries = "entry"
			}
			fmt.Fprintf(stdout, "%s %d %s (%s), kept %d\n", verb, len(res.Removed), entries, pipeline.HumanBytes(res.Freed), res.Kept)
			if len(res.Leftovers) > 0 {
				fmt.Fprintf(stdout, "%s %s left by runs that were killed (tmp/, and checkpoints unchanged for a week in scratch/)\n", verb, pipeline.HumanBytes(res.LeftoverBytes))
			}
			if res.RunsActive {
				notice(slog.LevelInfo, "gc: runs (or another gc) are using this cache now: the entries made since the last recorded run are kept, as gc, which waits for the runs, would keep them")
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.IntVar(&keepLast, "keep-last", 3, "keep the entries used by each DAG's last N runs (0 only with --older-than, by age alone, or --dry-run)")
	f.StringVar(&olderThan, "older-than", "", "remove only entries unused for this long (e.g. 12h, 30d, 2w)")
	f.BoolVar(&dryRun, "dry-run", false, "only say what would be removed")
	f.BoolVar(&noWait, "no-wait", false, "exit at once (code 75) if runs are using the cache, instead of waiting for them")
	root.AddCommand(cmd)
}
