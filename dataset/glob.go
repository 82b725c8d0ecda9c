package dataset

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/bmatcuk/doublestar/v4"
)

// ExpandGlobs expands shell patterns (filepath.Match syntax, and ** for any
// number of folders, as fsspec and the Hub's data_files read it) relative
// to base, in the order given; the matches of each pattern are sorted, so shards such
// as train-00000-of-00002.parquet come in order. A pattern that matches
// nothing is an error, as is a malformed one, unless it names an existing
// file as it is written. Absolute patterns ignore base.
func ExpandGlobs(base string, patterns []string) ([]string, error) {
	var paths []string
	for _, pattern := range patterns {
		full := pattern
		if !filepath.IsAbs(full) {
			full = filepath.Join(base, pattern)
		}
		matches, err := doublestar.FilepathGlob(full)
		if _, serr := os.Lstat(full); len(matches) == 0 && serr == nil {
			// A file whose name holds [, * or ?, given as it is: the
			// pattern matches nothing else, and shells keep it too. A
			// link that leads nowhere passes too, for the reader's check
			// to say where it leads.
			matches, err = []string{full}, nil
		}
		if err != nil {
			return nil, fmt.Errorf("dataset: bad pattern %q: %w", pattern, err)
		}
		if len(matches) == 0 {
			where := ""
			if full != pattern { // relative: say where it was looked for
				where = fmt.Sprintf(" (in %s)", base)
			}
			if strings.Contains(pattern, "$") {
				where += "; a spec reads no environment variables: write ~/… for the home folder, or a path relative to the spec's folder"
			}
			return nil, fmt.Errorf("dataset: no file matches %q%s", pattern, where)
		}
		slices.Sort(matches)
		paths = append(paths, matches...)
	}
	return paths, nil
}
