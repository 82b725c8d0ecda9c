package pipeline

// Status is the state of a DAG's outputs in a store.
type Status struct {
	RunningBy string // who holds the DAG's lock now ("" when nobody)
	// Unfinished names the last run when it did not finish ("pid 123 on
	// host since …"): it was killed (SIGKILL, the OOM killer) or its machine
	// stopped, so it left no record; Last is the run before it.
	Unfinished string
	Last       *RunRecord // the last run that ended, or nil
	Stages     []StageStatus
}

// StageStatus is one stage's current output.
type StageStatus struct {
	Name, Kind, Key string
	State           string // cached, missing, damaged
	Damage          error
	Manifest        *Manifest
	Size            int64
}

// Status looks at every stage's current entry without running anything.
func (s *Store) Status(dag *DAG) (*Status, error) {
	plan, err := s.Plan(dag, Options{})
	if err != nil {
		return nil, err
	}
	out := &Status{Last: plan.lastRun}
	out.RunningBy, out.Unfinished = s.lockHolder(dag)
	for _, st := range plan.Steps {
		ss := StageStatus{Name: st.Node.Name, Kind: st.Node.KindName, Key: st.Key, Manifest: st.Manifest, Damage: st.Damage}
		switch st.State {
		case Valid:
			ss.State = "cached"
			for _, o := range st.Manifest.Outputs {
				ss.Size += o.Size
			}
		case Damaged:
			ss.State = "damaged"
		default:
			ss.State = "missing"
		}
		out.Stages = append(out.Stages, ss)
	}
	return out, nil
}
