package pipeline

// Read access to a DAG's run history, for reports.

// Runs returns dag's recorded runs, newest first: at most n of them, or
// every kept one when n <= 0. Damaged records are left out.
func (s *Store) Runs(dag *DAG, n int) []*RunRecord {
	files := s.runRecords(dagID(dag))
	var out []*RunRecord
	for i := len(files) - 1; i >= 0 && (n <= 0 || len(out) < n); i-- {
		if r := readRunRecord(files[i]); r != nil {
			out = append(out, r)
		}
	}
	return out
}

// RunningBy says who runs dag now, or "" if nobody does.
func (s *Store) RunningBy(dag *DAG) string {
	running, _ := s.lockHolder(dag)
	return running
}

// Unfinished names dag's last run when it did not finish and left no
// record ("pid 123 on host since …"; see UnfinishedCauses), "" otherwise.
func (s *Store) Unfinished(dag *DAG) string {
	_, unfinished := s.lockHolder(dag)
	return unfinished
}

// ScratchDir is the folder where the stage of key keeps its resumable
// state (a training run's checkpoints and the metrics logged so far) until
// its entry is committed.
func (s *Store) ScratchDir(key string) string { return s.scratchDir(key) }
