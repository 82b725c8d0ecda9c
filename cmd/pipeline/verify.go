package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"gemmaft/pipeline"
)

func init() {
	var remove bool
	cmd := &cobra.Command{
		Use:   "verify [SPEC]",
		Short: "Re-hash cache entries and report damaged ones",
		Long: `Re-hash every output file of every cache entry (or, with SPEC, of that DAG's
current entries) and compare with the digests in their manifests, and every
checkpoint that an unfinished stage (an interrupted training run) would resume
from with the digests in its SHA256SUMS. Exits 1 if anything is damaged; a later
run recomputes damaged entries and sets damaged checkpoints aside by itself, and
--remove deletes them now.`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var (
				st   *pipeline.Store
				keys []string
				err  error
			)
			if len(args) == 1 {
				dag, err := loadSpec(args[0])
				if err != nil {
					return err
				}
				if st, err = openExistingStore(dag); err != nil {
					return err
				}
				// The stages that have a key now: one whose model is
				// missing has no entry to verify.
				status, err := st.Status(dag)
				if err != nil {
					return specOrFailErr(err)
				}
				for _, s := range status.Stages {
					if s.Key != "" {
						keys = append(keys, s.Key)
					}
				}
			} else if st, err = openExistingStore(nil); err != nil {
				return err
			}
			defer st.Close()
			bad, checked, err := st.Verify(keys)
			if err != nil {
				return failErr(err)
			}
			for _, d := range bad {
				fmt.Fprintf(stdout, "damaged %s: %v\n", d.Key, d.Err)
				if remove {
					if err := st.Remove(d.Key); err != nil {
						return failErr(err)
					}
					fmt.Fprintf(stdout, "removed %s\n", d.Key)
				}
			}
			// Resumable state too: a damaged checkpoint would be set aside
			// at the next resume; say so now.
			badScratch, checkpoints := st.VerifyScratch(keys)
			for _, d := range badScratch {
				fmt.Fprintf(stdout, "damaged checkpoint %s: %v\n", d.Scratch, d.Err)
				if remove {
					if err := os.RemoveAll(d.Scratch); err != nil {
						return failErr(err)
					}
					fmt.Fprintf(stdout, "removed %s\n", d.Scratch)
				}
			}
			fmt.Fprintf(stdout, "verified %d entries, %d damaged\n", checked, len(bad))
			if checkpoints > 0 || len(badScratch) > 0 {
				fmt.Fprintf(stdout, "verified %d checkpoints of unfinished stages, %d damaged\n", checkpoints, len(badScratch))
			}
			if n := len(bad) + len(badScratch); n > 0 {
				return &exitError{exitFailed, fmt.Errorf("%d damaged cache entries, %d damaged checkpoints", len(bad), len(badScratch))}
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&remove, "remove", false, "delete damaged entries")
	root.AddCommand(cmd)
}
