package hub

import (
	"context"
	"path"
	"path/filepath"
	"slices"
)

// Select returns the paths of the files r names: those its path matches
// (a file or a glob), or, for a reference to a whole model repository, the
// files of a model folder (ModelPatterns); every file of another kind of
// repository.
func (c *Client) Select(ctx context.Context, r *Resolved) ([]string, error) {
	// Offline, a cache without the commit's file list (huggingface_hub
	// writes none) is known only by what its snapshot holds: a file it
	// lacks may be one the repository has.
	files, partial, err := c.list(ctx, r)
	if err != nil {
		return nil, err
	}
	if r.Path != "" {
		matched, err := Match(files, []string{r.Path}, r.RepoRef())
		if err != nil && partial {
			return nil, c.notCached(r, r.Path)
		}
		return matched, err
	}
	if partial && r.Type == Model {
		has := func(pattern string) bool {
			return slices.ContainsFunc(files, func(f File) bool { ok, _ := path.Match(pattern, f.Path); return ok })
		}
		for _, need := range []string{"config.json", "*.safetensors"} {
			if !has(need) {
				return nil, c.notCached(r, need)
			}
		}
	}
	var out []string
	for _, f := range files {
		if r.Type != Model {
			out = append(out, f.Path)
			continue
		}
		for _, p := range ModelPatterns {
			if ok, _ := path.Match(p, f.Path); ok {
				out = append(out, f.Path)
				break
			}
		}
	}
	return out, nil
}

// Local resolves ref, fetches what it names (see Select) and returns the
// resolution with the local paths: the files a path names, or the snapshot
// folder of a reference to the whole repository.
func (c *Client) Local(ctx context.Context, ref Ref, opts FetchOptions) (*Resolved, []string, error) {
	r, err := c.Resolve(ctx, ref)
	if err != nil {
		return nil, nil, err
	}
	var paths []string
	if len(opts.Only) > 0 && ref.Path == "" {
		files, err := c.List(ctx, r)
		if err != nil {
			return nil, nil, err
		}
		for _, f := range files {
			for _, p := range opts.Only {
				if ok, _ := path.Match(p, f.Path); ok {
					paths = append(paths, f.Path)
					break
				}
			}
		}
	} else if paths, err = c.Select(ctx, r); err != nil {
		return nil, nil, err
	}
	dir, err := c.Fetch(ctx, r, paths, opts)
	if err != nil {
		return nil, nil, err
	}
	if ref.Path == "" {
		return r, []string{dir}, nil
	}
	local := make([]string, len(paths))
	for i, p := range paths {
		local[i] = filepath.Join(dir, filepath.FromSlash(p))
	}
	return r, local, nil
}
