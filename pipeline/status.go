package pipeline

import "context"

// Status is the state of a DAG's outputs in a store.
type Status struct {
	RunningBy string // who holds the DAG's lock now ("" when nobody)
	// Unfinished names the last run when it did not finish ("pid 123 on
	// host since …"): it was killed (SIGKILL, the OOM killer), its machine
	// stopped, or its record could not be written (a full disk); Last is
	// the run before it.
	Unfinished string
	Last       *RunRecord // the last run that ended, or nil
	Stages     []StageStatus
}

// UnfinishedCauses is what stops a run before it can record how it ended.
const UnfinishedCauses = "killed (SIGKILL, out of memory, or stopped at once by a second Ctrl-C or SIGTERM, or by a first whose stages did not end within 30 s), its machine stopped, or its record could not be written (disk full)"

// StageStatus is one stage's current output.
type StageStatus struct {
	Name, Kind, Key string
	State           string // cached, missing, damaged, unavailable
	Damage          error
	// Unavailable is why the stage has no key now: a file or model it
	// reads is missing, a reference cannot be resolved offline, or it
	// reads such a stage. Preprocessing runs without those (--until).
	Unavailable error
	// Why is, of a missing entry, what the plan says of it: no earlier
	// entry, or what changed since the one it had (an input file, a
	// parameter, an input stage).
	Why      string
	Manifest *Manifest
	Size     int64
}

// Status looks at every stage's current entry without running anything.
func (s *Store) Status(dag *DAG) (*Status, error) {
	plan, err := s.plan(context.Background(), dag, Options{}, true)
	if err != nil {
		return nil, err
	}
	out := &Status{Last: plan.lastRun}
	out.RunningBy, out.Unfinished = s.lockHolder(dag)
	for _, st := range plan.Steps {
		ss := StageStatus{Name: st.Node.Name, Kind: st.Node.KindName, Key: st.Key, Manifest: st.Manifest, Damage: st.Damage}
		switch {
		case st.Unkeyed != nil:
			ss.State, ss.Unavailable = "unavailable", st.Unkeyed
		case st.State == Valid:
			ss.State = "cached"
			for _, o := range st.Manifest.Outputs {
				ss.Size += o.Size
			}
		case st.State == Damaged:
			ss.State = "damaged"
		default:
			ss.State, ss.Why = "missing", st.Reason
			if st.Key != "" && s.EntryBusy(st.Key) {
				ss.Why = ComputingElsewhere + "; " + st.Reason
			}
		}
		out.Stages = append(out.Stages, ss)
	}
	return out, nil
}
