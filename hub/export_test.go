package hub

// SetCheckNoteBytes sets checkNoteBytes for a test and returns the undo.
func SetCheckNoteBytes(n int64) (undo func()) {
	old := checkNoteBytes
	checkNoteBytes = n
	return func() { checkNoteBytes = old }
}
