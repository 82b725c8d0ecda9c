package main

import (
	"encoding/json"
	"fmt"
	"io"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"gemmaft/pipeline"
)

func init() {
	var (
		opts   pipeline.Options
		asJSON bool
	)
	cmd := &cobra.Command{
		Use:   "plan SPEC",
		Short: "Show each stage's key, whether it is cached, and why it would be computed",
		Long: `Plan the DAG in SPEC without running it: compute every stage's cache key and
say, for each, whether its output is cached or will be computed, and why (never
computed, parameters changed, a file's content changed, an hf:// branch moved
to another commit, an input changed, the kind's version changed, the entry is
damaged, forced).`,
		Example: `  pipeline plan dags/gemma12b.yaml
  pipeline plan dags/gemma12b.yaml --until pack --json`,
		Args:              exactArgs(1, "one spec file"),
		ValidArgsFunction: specArg,
		RunE: func(cmd *cobra.Command, args []string) error {
			dag, err := loadSpec(args[0])
			if err != nil {
				return err
			}
			if err := dag.Check(opts); err != nil {
				return usageErr(err)
			}
			warnUnselectedForce(dag, opts)
			st, err := lookAtStore(dag)
			if err != nil {
				return err
			}
			defer st.Close()
			plan, err := st.Plan(dag, opts)
			if err == nil {
				err = plan.CheckInputs()
			}
			if err != nil {
				return specOrFailErr(err)
			}
			type row struct {
				Stage  string         `json:"stage"`
				Kind   string         `json:"kind"`
				Key    string         `json:"key"`
				Action string         `json:"action"` // cached, compute, skip
				Why    string         `json:"why,omitempty"`
				Refs   []pipeline.Ref `json:"refs,omitempty"`
			}
			var rows []row
			for _, s := range plan.Steps {
				r := row{Stage: s.Node.Name, Kind: s.Node.KindName, Key: s.Key, Why: s.Reason, Refs: s.Refs}
				switch {
				case !s.Selected:
					r.Action, r.Why = "skip", "not selected"
				case s.Compute:
					r.Action = "compute"
					if st.EntryBusy(s.Key) { // a run would wait for it, then find it cached
						r.Why = pipeline.ComputingElsewhere + "; " + r.Why
					}
				default:
					r.Action, r.Why = "cached", ""
				}
				rows = append(rows, r)
			}
			if asJSON {
				enc := json.NewEncoder(stdout)
				enc.SetIndent("", "  ")
				return enc.Encode(rows)
			}
			w := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "STAGE\tKIND\tKEY\tACTION\tWHY")
			for _, r := range rows {
				fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\n", r.Stage, r.Kind, keyColumn(r.Key), r.Action, r.Why)
			}
			if err := w.Flush(); err != nil {
				return err
			}
			printRefs(stdout, plan)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&opts.Until, "until", "", "plan this stage and the stages it needs")
	f.StringVar(&opts.Only, "only", "", "plan only this stage")
	f.StringArrayVar(&opts.Force, "force", nil, "plan as if this stage were forced (repeatable; \"all\")")
	f.BoolVar(&asJSON, "json", false, "print JSON with full keys")
	completeStageFlags(cmd)
	root.AddCommand(cmd)
}

// printRefs lists the references the plan resolved (hf://...@main is
// commit abc1234), once each, with what was said about how.
func printRefs(w io.Writer, plan *pipeline.Plan) {
	seen := map[string]bool{}
	first := true
	for _, s := range plan.Steps {
		for _, r := range s.Refs {
			if seen[r.Name+" "+r.Revision] {
				continue
			}
			seen[r.Name+" "+r.Revision] = true
			if first {
				fmt.Fprintln(w)
				first = false
			}
			fmt.Fprintf(w, "%s is commit %s\n", r.Name, r.Revision)
			if r.Note != "" {
				fmt.Fprintf(w, "  note: %s\n", r.Note)
			}
		}
	}
}
