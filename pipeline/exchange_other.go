//go:build !linux

package pipeline

// exchangeDirs cannot swap folders atomically here; the caller replaces
// the entry in two steps.
func exchangeDirs(a, b string) (bool, error) { return false, nil }
