package dataset

import (
	"fmt"
	"path/filepath"
	"slices"
)

// ExpandGlobs expands shell patterns (filepath.Match syntax) relative to base,
// in the order given; the matches of each pattern are sorted, so shards such
// as train-00000-of-00002.parquet come in order. A pattern that matches
// nothing is an error, as is a malformed one. Absolute patterns ignore base.
func ExpandGlobs(base string, patterns []string) ([]string, error) {
	var paths []string
	for _, pattern := range patterns {
		full := pattern
		if !filepath.IsAbs(full) {
			full = filepath.Join(base, pattern)
		}
		matches, err := filepath.Glob(full)
		if err != nil {
			return nil, fmt.Errorf("dataset: bad pattern %q: %w", pattern, err)
		}
		if len(matches) == 0 {
			where := ""
			if full != pattern { // relative: say where it was looked for
				where = fmt.Sprintf(" (in %s)", base)
			}
			return nil, fmt.Errorf("dataset: no file matches %q%s", pattern, where)
		}
		slices.Sort(matches)
		paths = append(paths, matches...)
	}
	return paths, nil
}
