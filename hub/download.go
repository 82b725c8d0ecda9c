package hub

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/bmatcuk/doublestar/v4"
	"github.com/gofrs/flock"
	"golang.org/x/sync/errgroup"

	"gemmaft/internal/diskfull"
)

// A Resolved reference names a commit.
type Resolved struct {
	Ref
	Commit string
	// Note is set when the commit was not asked of the Hub but read from the
	// cache's refs/ (offline, or the Hub unreachable): it says so.
	Note string
	// unasked is why the Hub could not be asked, when it could not.
	unasked error
}

// Resolve finds the commit ref's revision names now. A commit id names
// itself without asking anything. A branch or tag is asked of the Hub, and
// read from the cache's refs/ when offline or when the Hub cannot be asked
// (then Note says so).
func (c *Client) Resolve(ctx context.Context, ref Ref) (*Resolved, error) {
	r := &Resolved{Ref: ref}
	if IsCommit(ref.Revision) {
		r.Commit = ref.Revision
		return r, nil
	}
	if c.Offline {
		if r.Commit = c.cachedRef(ref.Repo, ref.Revision); r.Commit == "" {
			return nil, &Error{Kind: ErrNotCached, Msg: fmt.Sprintf("HF_HUB_OFFLINE is set and %s was never fetched into %s (no refs/%s there): run once online, or pin a commit (@<sha>) whose files are cached",
				ref.RepoRef(), c.CacheDir, ref.Revision)}
		}
		r.Note = fmt.Sprintf("HF_HUB_OFFLINE is set: %s is taken to be commit %s, as the cache's refs/%s says (not checked with the Hub)",
			ref.RepoRef(), ShortCommit(r.Commit), ref.Revision)
		return r, nil
	}
	commit, err := c.revisionInfo(ctx, ref)
	if err == nil {
		r.Commit = commit
		return r, nil
	}
	if fallsBack(err) {
		if r.Commit = c.cachedRef(ref.Repo, ref.Revision); r.Commit != "" {
			r.Note = fmt.Sprintf("%v; %s is taken to be commit %s, as the cache's refs/%s says", err, ref.RepoRef(), ShortCommit(r.Commit), ref.Revision)
			r.unasked = err
			return r, nil
		}
	}
	return nil, err
}

// revisionInfo asks the Hub which commit ref's revision names.
func (c *Client) revisionInfo(ctx context.Context, ref Ref) (string, error) {
	u := c.apiURL(ref.Repo, "revision", escapeRev(ref.Revision))
	resp, err := c.do(ctx, request{method: http.MethodGet, url: u, header: jsonHeader()})
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		err := c.statusError(resp, ref.Repo, ref.Revision, "")
		if errors.Is(err, ErrRevisionNotFound) && ref.Path != "" {
			// hf://ORG/NAME@feat/x/FILE reads as revision feat.
			err = fmt.Errorf("%w; a revision with a slash in its name is written with %%2F (@%s%%2F…)", err, ref.Revision)
		}
		return "", err
	}
	var info struct {
		SHA string `json:"sha"`
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 64<<20)).Decode(&info); err != nil || !IsCommit(info.SHA) {
		return "", &Error{Kind: ErrUnreachable, Msg: fmt.Sprintf("%s answered %s without a commit id (%v): is HF_ENDPOINT a Hugging Face Hub?", c.Endpoint, u, err)}
	}
	return info.SHA, nil
}

func jsonHeader() http.Header { return http.Header{"Accept": {"application/json"}} }

func escapeRev(rev string) string { return strings.ReplaceAll(pathEscape(rev), "/", "%2F") }

func pathEscape(s string) string {
	var b strings.Builder
	for _, c := range []byte(s) {
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte("-._~", c) >= 0 {
			b.WriteByte(c)
		} else {
			fmt.Fprintf(&b, "%%%02X", c)
		}
	}
	return b.String()
}

// List returns the files of r's repository at its commit, sorted by path:
// from the cache's trees/<commit>.json when there is one (a commit never
// changes), else from the Hub (and then kept there), else, offline, from
// what the snapshot folder holds.
func (c *Client) List(ctx context.Context, r *Resolved) ([]File, error) {
	files, _, err := c.list(ctx, r)
	return files, err
}

// list is List, saying whether the files are only what the snapshot
// folder holds (offline, in a cache without the commit's file list): a
// file missing from them may be one the repository has.
func (c *Client) list(ctx context.Context, r *Resolved) (files []File, snapshotOnly bool, err error) {
	if files := c.readTree(r.Repo, r.Commit); files != nil {
		return files, false, nil
	}
	if c.Offline || r.Note != "" {
		files := c.snapshotFiles(r.Repo, r.Commit)
		if len(files) == 0 {
			return nil, true, &Error{Kind: ErrNotCached, Msg: fmt.Sprintf("nothing of %s at commit %s is in the cache %s, and the Hub was not asked: run once online to download it", r.RepoRef(), ShortCommit(r.Commit), c.CacheDir)}
		}
		return files, true, nil
	}
	next := c.apiURL(r.Repo, "tree", r.Commit) + "?recursive=true&expand=false"
	for next != "" {
		resp, err := c.do(ctx, request{method: http.MethodGet, url: next, header: jsonHeader(), retryNetwork: true})
		if err != nil {
			return nil, false, err
		}
		if resp.StatusCode != http.StatusOK {
			err := c.statusError(resp, r.Repo, r.Commit, "")
			resp.Body.Close()
			return nil, false, err
		}
		var page []struct {
			Type string `json:"type"`
			Path string `json:"path"`
			Size int64  `json:"size"`
			OID  string `json:"oid"`
			LFS  *struct {
				OID  string `json:"oid"`
				Size int64  `json:"size"`
			} `json:"lfs"`
		}
		err = json.NewDecoder(resp.Body).Decode(&page)
		resp.Body.Close()
		if err != nil {
			return nil, false, &Error{Kind: ErrUnreachable, Err: err, Msg: fmt.Sprintf("reading the file list of %s: %v", r.RepoRef(), err)}
		}
		for _, e := range page {
			if e.Type != "file" {
				continue
			}
			f := File{Path: e.Path, Size: e.Size, BlobID: e.OID}
			if e.LFS != nil {
				f.LFSSHA256, f.Size = e.LFS.OID, e.LFS.Size
			}
			files = append(files, f)
		}
		next = nextLink(resp.Header.Get("Link"), resp.Request.URL.String())
	}
	sort.Slice(files, func(i, j int) bool { return files[i].Path < files[j].Path })
	if err := c.writeTree(r.Repo, r.Commit, files); err != nil {
		return nil, false, fmt.Errorf("keeping the file list of %s: %w", r.RepoRef(), err)
	}
	return files, false, nil
}

// nextLink reads the rel="next" address of a Link header, as GitHub and
// the Hub paginate.
func nextLink(h, base string) string {
	for _, part := range strings.Split(h, ",") {
		segs := strings.Split(part, ";")
		if len(segs) < 2 {
			continue
		}
		u := strings.Trim(strings.TrimSpace(segs[0]), "<>")
		for _, p := range segs[1:] {
			if strings.ReplaceAll(strings.TrimSpace(p), `"`, "") == "rel=next" {
				if b, err := http.NewRequest(http.MethodGet, base, nil); err == nil {
					if abs, err := b.URL.Parse(u); err == nil {
						return abs.String()
					}
				}
				return u
			}
		}
	}
	return ""
}

// Match returns the paths of files that the patterns (path.Match syntax,
// and ** for any number of folders, relative to the repository's root)
// match, each pattern's matches sorted,
// in the order of the patterns. A pattern matching nothing is an error.
func Match(files []File, patterns []string, what string) ([]string, error) {
	var out []string
	seen := map[string]bool{}
	for _, p := range patterns {
		if !doublestar.ValidatePattern(p) {
			return nil, fmt.Errorf("bad pattern %q: %w", p, path.ErrBadPattern)
		}
		n := 0
		for _, f := range files {
			if ok, _ := doublestar.Match(p, f.Path); ok {
				n++
				if !seen[f.Path] {
					seen[f.Path] = true
					out = append(out, f.Path)
				}
			}
		}
		if n == 0 {
			var names []string
			for i, f := range files {
				if i == 12 {
					names = append(names, fmt.Sprintf("… %d more", len(files)-i))
					break
				}
				names = append(names, f.Path)
			}
			return nil, &Error{Kind: ErrEntryNotFound, Msg: fmt.Sprintf("no file of %s matches %q (it has: %s)", what, p, strings.Join(names, ", "))}
		}
	}
	return out, nil
}

// notCached is the error for a file of r (a path or a pattern) that the
// cache lacks while the Hub is not asked: offline, or unreachable.
func (c *Client) notCached(r *Resolved, file string) error {
	if c.Offline {
		return &Error{Kind: ErrNotCached, Msg: fmt.Sprintf("HF_HUB_OFFLINE is set and %s/%s (commit %s) is not in the cache %s: unset HF_HUB_OFFLINE to download it",
			r.RepoRef(), file, ShortCommit(r.Commit), c.CacheDir)}
	}
	return &Error{Kind: ErrNotCached, Err: r.unasked, Msg: fmt.Sprintf("%s/%s (commit %s) is not in the cache %s, and the Hub could not be asked for it: %v",
		r.RepoRef(), file, ShortCommit(r.Commit), c.CacheDir, r.unasked)}
}

// ModelPatterns select the files of a model repository that make its
// checkpoint folder: configs, tokenizer files, chat templates and
// safetensors weights at the top level (not other weight formats, not
// subfolders such as original/).
var ModelPatterns = []string{"*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"}

// FetchOptions are the optional parts of Fetch.
type FetchOptions struct {
	// Progress is called as bytes arrive: done of total bytes to fetch.
	Progress func(done, total int64)
	// Log receives a line per file fetched and per damaged blob replaced.
	Log *slog.Logger
	// Only, for Local with a reference to a whole repository, fetches the
	// files these patterns match (those there are) instead of Select's.
	Only []string
}

// Fetch makes the given files of r's commit present in the cache and
// returns the snapshot folder that holds them. A file already there is
// checked against its hash (a damaged one is fetched again); a missing one
// is downloaded into blobs/ (resuming a .incomplete one), checked, and
// linked into the snapshot. refs/<revision> then records the commit.
func (c *Client) Fetch(ctx context.Context, r *Resolved, paths []string, opts FetchOptions) (string, error) {
	log := opts.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	files, err := c.List(ctx, r)
	if err != nil {
		return "", err
	}
	byPath := map[string]File{}
	for _, f := range files {
		byPath[f.Path] = f
	}
	var want []File
	var total, cached int64
	for _, p := range paths {
		f, ok := byPath[p]
		if !ok {
			return "", &Error{Kind: ErrEntryNotFound, Msg: fmt.Sprintf("%s has no file %q at commit %s", r.RepoRef(), p, ShortCommit(r.Commit))}
		}
		want = append(want, f)
		if c.present(r, f) {
			cached += f.Size
		} else {
			total += f.Size
		}
	}
	if cached >= checkNoteBytes {
		// Every cached file is hashed before use (a damaged one is fetched
		// again): seconds for a model of tens of gigabytes.
		log.Info("checking the files already in the Hugging Face cache", "repo", r.RepoRef(), "gib", fmt.Sprintf("%.1f", float64(cached)/(1<<30)))
	}
	var done atomic.Int64
	var mu sync.Mutex
	report := func(n int64) {
		d := done.Add(n)
		if opts.Progress != nil {
			mu.Lock()
			opts.Progress(d, total)
			mu.Unlock()
		}
	}
	if !c.Offline {
		if err := os.MkdirAll(c.CacheDir, 0o755); err != nil {
			return "", err
		}
		c.tagCache()
	}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(max(c.Workers, 1))
	for _, f := range want {
		g.Go(func() error { return fileErr(r, f, c.fetchFile(gctx, r, f, report, log)) })
	}
	if err := g.Wait(); err != nil {
		return "", err
	}
	if !c.Offline && r.Note == "" {
		if err := c.writeRef(r.Repo, r.Revision, r.Commit); err != nil {
			return "", fmt.Errorf("recording %s in the cache: %w", r.RepoRef(), err)
		}
	}
	return c.SnapshotDir(r.Repo, r.Commit), nil
}

// fileErr names the file of r whose download failed with err, where err
// does not, and says what a new attempt does: a corrupt download starts
// afresh, a broken one resumes from the bytes kept.
func fileErr(r *Resolved, f File, err error) error {
	name := r.RepoRef() + "/" + f.Path
	switch {
	case err == nil, strings.Contains(err.Error(), name), errors.Is(err, context.Canceled):
		return err
	case errors.Is(err, ErrCorrupt):
		return fmt.Errorf("%s: %w; run again to download it afresh", name, err)
	case errors.Is(err, ErrGated), errors.Is(err, ErrBadToken), errors.Is(err, ErrRepoNotFound), errors.Is(err, ErrEntryNotFound):
		return fmt.Errorf("%s: %w", name, err)
	}
	return fmt.Errorf("%s: %w; the bytes downloaded so far are kept: run again (later, if the Hub is failing) to resume", name, err)
}

// checkNoteBytes is how many cached bytes make Fetch say that it checks
// them (a variable for tests).
var checkNoteBytes int64 = 1 << 30

// present says whether f's pointer exists (unchecked).
func (c *Client) present(r *Resolved, f File) bool {
	_, err := os.Stat(filepath.Join(c.SnapshotDir(r.Repo, r.Commit), filepath.FromSlash(f.Path)))
	return err == nil
}

// fetchFile makes one file of r's commit present and checked.
func (c *Client) fetchFile(ctx context.Context, r *Resolved, f File, report func(int64), log *slog.Logger) error {
	pointer := filepath.Join(c.SnapshotDir(r.Repo, r.Commit), filepath.FromSlash(f.Path))
	if fi, err := os.Stat(pointer); err == nil && fi.Mode().IsRegular() {
		etag := f.etag()
		if target, err := os.Readlink(pointer); err == nil && etag == "" {
			etag = filepath.Base(target)
		}
		err := verifyBlob(pointer, etag, f.Size)
		if err == nil {
			return nil
		}
		if !errors.Is(err, ErrCorrupt) {
			return err
		}
		if c.Offline || r.Note != "" {
			return &Error{Kind: ErrCorrupt, Err: err, Msg: fmt.Sprintf("%s/%s in the cache is damaged (%v) and the Hub cannot be asked for it again: run online, or delete it", r.RepoRef(), f.Path, err)}
		}
		log.Warn("damaged file in the Hugging Face cache; fetching it again", "file", r.RepoRef()+"/"+f.Path, "why", err.Error())
		if target, err := filepath.EvalSymlinks(pointer); err == nil {
			os.Remove(target)
		}
		os.Remove(pointer)
	}
	if c.Offline || r.unasked != nil {
		return c.notCached(r, f.Path)
	}
	meta, err := c.head(ctx, r, f.Path)
	if err != nil {
		return err
	}
	if meta.commit != "" && meta.commit != r.Commit {
		return &Error{Kind: ErrUnreachable, Msg: fmt.Sprintf("%s answered for commit %s when asked for %s", c.Endpoint, meta.commit, r.Commit)}
	}
	blob := c.blobPath(r.Repo, meta.etag)
	if err := os.MkdirAll(filepath.Dir(blob), 0o755); err != nil {
		return err
	}
	lock := flock.New(c.lockPath(r.Repo, meta.etag))
	if err := os.MkdirAll(filepath.Dir(lock.Path()), 0o755); err != nil {
		return err
	}
	if ok, err := lock.TryLockContext(ctx, 100*time.Millisecond); err != nil || !ok {
		if err == nil {
			err = context.Cause(ctx)
		}
		return fmt.Errorf("locking %s: %w", lock.Path(), err)
	}
	defer lock.Unlock()
	if _, err := os.Stat(blob); err == nil {
		if err := verifyBlob(blob, meta.etag, meta.size); err == nil {
			return linkPointer(pointer, blob)
		}
		log.Warn("damaged blob in the Hugging Face cache; fetching it again", "blob", blob)
		os.Remove(blob)
	}
	log.Info("downloading", "file", r.RepoRef()+"/"+f.Path, "size", meta.size)
	partial := blob + ".incomplete"
	// unreport takes the partial file's bytes back out of the progress:
	// each download reports those it finds there.
	unreport := func() {
		if fi, _ := os.Stat(partial); fi != nil {
			report(-fi.Size())
		}
	}
	for refreshed, restarted := false, false; ; {
		err := c.download(ctx, meta, partial, report)
		if errors.Is(err, ErrRefused) && !refreshed {
			// The storage address the Hub signed has expired (a download
			// resumed later): ask the Hub for a new one, keeping the bytes.
			refreshed = true
			log.Warn("the file's storage refused the download; asking the Hub for a new address", "file", f.Path, "why", err.Error())
			unreport()
			fresh, err := c.head(ctx, r, f.Path)
			if err != nil {
				return err
			}
			if fresh.etag != meta.etag || fresh.size != meta.size {
				return &Error{Kind: ErrUnreachable, Msg: fmt.Sprintf("%s answered for %s/%s a file other than before (ETag %s, was %s)", c.Endpoint, r.RepoRef(), f.Path, fresh.etag, meta.etag)}
			}
			meta = fresh
			continue
		}
		if errors.Is(err, ErrRefused) {
			return &Error{Kind: ErrRefused, Err: err, Msg: fmt.Sprintf("%s/%s: %v; the bytes so far are kept for the next attempt", r.RepoRef(), f.Path, err)}
		}
		if err == nil {
			err = verifyBlob(partial, meta.etag, meta.size)
		}
		if err == nil {
			break
		}
		if !errors.Is(err, ErrCorrupt) || restarted {
			return err
		}
		// A download that does not hash to its name starts over, once.
		restarted = true
		log.Warn("download did not match its hash; starting it over", "file", f.Path, "why", err.Error())
		unreport()
		os.Remove(partial)
	}
	if err := os.Rename(partial, blob); err != nil {
		return err
	}
	return linkPointer(pointer, blob)
}

// fileMeta is what a HEAD on a file's resolve address says about it.
type fileMeta struct {
	commit, etag, location string
	size                   int64
	sameHost               bool // location is on the Hub's host (send the token)
}

// head asks the Hub about one file of r's commit, as huggingface_hub's
// get_hf_file_metadata does: relative redirects followed, the first
// redirect to another host (LFS storage) kept as the download address.
func (c *Client) head(ctx context.Context, r *Resolved, file string) (*fileMeta, error) {
	u := c.resolveURL(r.Repo, r.Commit, file)
	resp, err := c.do(ctx, request{method: http.MethodHead, url: u,
		header: http.Header{"Accept-Encoding": {"identity"}}, retryNetwork: true})
	if err != nil {
		return nil, err
	}
	drain(resp)
	if resp.StatusCode >= 400 {
		return nil, c.statusError(resp, r.Repo, r.Commit, file)
	}
	m := &fileMeta{commit: resp.Header.Get("X-Repo-Commit"), location: resp.Request.URL.String()}
	etag := resp.Header.Get("X-Linked-Etag")
	if etag == "" {
		etag = resp.Header.Get("ETag")
	}
	m.etag = strings.Trim(strings.TrimPrefix(etag, "W/"), `"`)
	redirect := resp.StatusCode >= 300 && resp.StatusCode < 400
	size := resp.Header.Get("X-Linked-Size")
	if size == "" && !redirect {
		size = resp.Header.Get("Content-Length")
	}
	if redirect {
		loc, err := resp.Request.URL.Parse(resp.Header.Get("Location"))
		if err != nil {
			return nil, fmt.Errorf("%s redirected %s to a bad address: %w", c.Endpoint, u, err)
		}
		m.location = loc.String()
	}
	n, err := strconv.ParseInt(size, 10, 64)
	switch {
	case m.commit == "":
		return nil, &Error{Kind: ErrUnreachable, Msg: fmt.Sprintf("%s answered %s without X-Repo-Commit: it does not look like a Hugging Face Hub (check HF_ENDPOINT, proxies and firewalls)", c.Endpoint, u)}
	case m.etag == "" || strings.ContainsAny(m.etag, `/\`) || m.etag == "." || m.etag == "..":
		return nil, &Error{Kind: ErrUnreachable, Msg: fmt.Sprintf("%s answered %s without a usable ETag", c.Endpoint, u)}
	case err != nil || n < 0:
		return nil, &Error{Kind: ErrUnreachable, Msg: fmt.Sprintf("%s answered %s without the file's size", c.Endpoint, u)}
	}
	m.size = n
	if l, err := resp.Request.URL.Parse(m.location); err == nil {
		m.sameHost = c.sameHost(l)
	}
	return m, nil
}

// download fetches meta's bytes into partial, resuming what a previous
// attempt (of this or another process) left there with a Range request,
// and retrying with backoff when the connection breaks; attempts that
// brought bytes do not count against the retries.
func (c *Client) download(ctx context.Context, meta *fileMeta, partial string, report func(int64)) error {
	f, err := os.OpenFile(partial, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	defer f.Close()
	offset, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		return err
	}
	if offset > meta.size {
		if err := f.Truncate(0); err != nil {
			return err
		}
		offset, _ = f.Seek(0, io.SeekStart)
	}
	report(offset)
	for failures, restarts := 0, 0; offset < meta.size; {
		n, err := c.getRange(ctx, meta, f, offset, report)
		offset += n
		if err == nil && offset < meta.size {
			err = io.ErrUnexpectedEOF
		}
		if errors.Is(err, errRestart) && restarts < 2 {
			// The server sent the whole file, or could not serve the range:
			// start from the beginning.
			restarts++
			report(-offset)
			if err := f.Truncate(0); err != nil {
				return err
			}
			offset, _ = f.Seek(0, io.SeekStart)
			continue
		}
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			return context.Cause(ctx)
		}
		if we := (*writeError)(nil); errors.As(err, &we) {
			if diskfull.Is(we.err) {
				return fmt.Errorf("%w: free space there, or set HF_HUB_CACHE to a disk with room; the bytes so far are kept", we.err)
			}
			return we.err
		}
		var he *Error
		if errors.As(err, &he) && !errors.Is(err, ErrUnreachable) {
			return err // refused: retrying will not help
		}
		if n > 0 {
			failures = 0
		}
		if failures++; failures > c.Retries {
			if errors.As(err, &he) {
				return err
			}
			return c.unreachable(err)
		}
		if err := sleep(ctx, c.backoff(failures)); err != nil {
			return err
		}
	}
	if offset != meta.size {
		return &Error{Kind: ErrCorrupt, Msg: fmt.Sprintf("%s: got %d bytes, expected %d", partial, offset, meta.size)}
	}
	return f.Sync()
}

var errRestart = errors.New("server ignored the range; restart")

// A writeError is a download that could not be written here (a full
// disk): no retry helps.
type writeError struct{ err error }

func (e *writeError) Error() string { return e.err.Error() }
func (e *writeError) Unwrap() error { return e.err }

// unsigned is u without its query, which for a storage address holds the
// signature that grants access: not for logs.
func unsigned(u *url.URL) string {
	v := *u
	v.RawQuery, v.User = "", nil
	return v.String()
}

// getRange GETs meta's location from offset on and appends to f, returning
// the bytes written.
func (c *Client) getRange(ctx context.Context, meta *fileMeta, f *os.File, offset int64, report func(int64)) (int64, error) {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, meta.location, nil)
	if err != nil {
		return 0, err
	}
	req.Header.Set("User-Agent", c.UserAgent)
	req.Header.Set("Accept-Encoding", "identity")
	if offset > 0 {
		req.Header.Set("Range", fmt.Sprintf("bytes=%d-", offset))
	}
	if c.Token != "" && meta.sameHost && c.sameHost(req.URL) {
		req.Header.Set("Authorization", "Bearer "+c.Token)
	}
	resp, err := c.HTTP.Do(req)
	if err != nil {
		if ue := (*url.Error)(nil); errors.As(err, &ue) {
			ue.URL = unsigned(req.URL)
		}
		return 0, err
	}
	defer resp.Body.Close()
	switch {
	case resp.StatusCode == http.StatusPartialContent && offset > 0:
		if !strings.HasPrefix(resp.Header.Get("Content-Range"), fmt.Sprintf("bytes %d-", offset)) {
			return 0, errRestart
		}
	case resp.StatusCode == http.StatusOK && offset > 0:
		return 0, errRestart
	case resp.StatusCode == http.StatusOK:
	case resp.StatusCode == http.StatusRequestedRangeNotSatisfiable:
		return 0, errRestart
	case resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode >= 500:
		return 0, &Error{Kind: ErrUnreachable, Msg: fmt.Sprintf("GET %s: %s", unsigned(req.URL), resp.Status)}
	default:
		return 0, &Error{Kind: ErrRefused, Msg: fmt.Sprintf("the file's storage refused it (GET %s: %s)", unsigned(req.URL), resp.Status)}
	}
	// A body that stops arriving is cut after IdleTimeout, and retried.
	idle := c.IdleTimeout
	if idle <= 0 {
		idle = time.Minute
	}
	timer := time.AfterFunc(idle, func() { cancel(fmt.Errorf("no data for %s", idle)) })
	defer timer.Stop()
	buf := make([]byte, 1<<20)
	var n int64
	for {
		k, rerr := resp.Body.Read(buf)
		if k > 0 {
			timer.Reset(idle)
			if _, err := f.Write(buf[:k]); err != nil {
				return n, &writeError{err}
			}
			n += int64(k)
			report(int64(k))
		}
		if rerr == io.EOF {
			return n, nil
		}
		if rerr != nil {
			if c := context.Cause(ctx); c != nil && ctx.Err() != nil {
				return n, c
			}
			return n, rerr
		}
	}
}

// CheckAccess asks the Hub whether file of r's commit may be downloaded
// (a gated repository answers no without a token that was granted access),
// unless the file is in the cache already or the Hub is not being asked.
func (c *Client) CheckAccess(ctx context.Context, r *Resolved, file string) error {
	if c.Offline || r.Note != "" {
		return nil
	}
	if _, err := os.Stat(filepath.Join(c.SnapshotDir(r.Repo, r.Commit), filepath.FromSlash(file))); err == nil {
		return nil
	}
	_, err := c.head(ctx, r, file)
	return err
}
