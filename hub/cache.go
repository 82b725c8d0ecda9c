package hub

import (
	"crypto/sha1"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"

	"gemmaft/internal/atomicfile"
)

// storage is the folder of repo in the cache.
func (c *Client) storage(repo Repo) string { return filepath.Join(c.CacheDir, repo.Folder()) }

// SnapshotDir is the folder that holds the files of repo at commit, as
// symlinks into the blobs.
func (c *Client) SnapshotDir(repo Repo, commit string) string {
	return filepath.Join(c.storage(repo), "snapshots", commit)
}

func (c *Client) blobPath(repo Repo, etag string) string {
	return filepath.Join(c.storage(repo), "blobs", etag)
}

func (c *Client) lockPath(repo Repo, etag string) string {
	return filepath.Join(c.CacheDir, ".locks", repo.Folder(), etag+".lock")
}

// cachedRef reads the commit refs/<rev> holds, or "".
func (c *Client) cachedRef(repo Repo, rev string) string {
	data, err := os.ReadFile(filepath.Join(c.storage(repo), "refs", filepath.FromSlash(rev)))
	if err != nil {
		return ""
	}
	if s := strings.TrimSpace(string(data)); IsCommit(s) {
		return s
	}
	return ""
}

// writeRef records that rev names commit, as huggingface_hub does: only
// when it changed, through a temporary file, so readers never see half.
func (c *Client) writeRef(repo Repo, rev, commit string) error {
	if rev == commit || c.cachedRef(repo, rev) == commit {
		return nil
	}
	return writeCacheFile(filepath.Join(c.storage(repo), "refs", filepath.FromSlash(rev)), []byte(commit))
}

// writeCacheFile writes a small file of the cache whole or not at all.
func writeCacheFile(path string, data []byte) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	return atomicfile.WriteFile(path, data)
}

// A File is one file of a repository at a commit.
type File struct {
	Path      string
	Size      int64
	BlobID    string // the git blob id
	LFSSHA256 string // the sha256 of the content, for files stored with LFS
}

// etag is the name the file's blob has in the cache: what the Hub sends as
// its (linked) ETag.
func (f File) etag() string {
	if f.LFSSHA256 != "" {
		return f.LFSSHA256
	}
	return f.BlobID
}

// treeFile is huggingface_hub's cached file list of a commit,
// trees/<commit>.json. A commit never changes, so neither does its list.
type treeFile struct {
	FormatVersion int                  `json:"format_version"`
	Files         map[string]treeEntry `json:"files"`
}

type treeEntry struct {
	Size      int64  `json:"size"`
	BlobID    string `json:"blob_id"`
	LFSSHA256 string `json:"lfs_sha256,omitempty"`
	LFSSize   int64  `json:"lfs_size,omitempty"`
	XetHash   string `json:"xet_hash,omitempty"`
}

const treeFormat = 1

func (c *Client) treePath(repo Repo, commit string) string {
	return filepath.Join(c.storage(repo), "trees", commit+".json")
}

func (c *Client) readTree(repo Repo, commit string) []File {
	data, err := os.ReadFile(c.treePath(repo, commit))
	if err != nil {
		return nil
	}
	var t treeFile
	if json.Unmarshal(data, &t) != nil || t.FormatVersion != treeFormat || t.Files == nil {
		return nil
	}
	files := make([]File, 0, len(t.Files))
	for p, e := range t.Files {
		f := File{Path: p, Size: e.Size, BlobID: e.BlobID, LFSSHA256: e.LFSSHA256}
		if e.LFSSHA256 != "" && e.LFSSize > 0 {
			f.Size = e.LFSSize
		}
		files = append(files, f)
	}
	sort.Slice(files, func(i, j int) bool { return files[i].Path < files[j].Path })
	return files
}

func (c *Client) writeTree(repo Repo, commit string, files []File) error {
	t := treeFile{FormatVersion: treeFormat, Files: map[string]treeEntry{}}
	for _, f := range files {
		e := treeEntry{Size: f.Size, BlobID: f.BlobID}
		if f.LFSSHA256 != "" {
			e.LFSSHA256, e.LFSSize = f.LFSSHA256, f.Size
		}
		t.Files[f.Path] = e
	}
	data, err := json.MarshalIndent(t, "", " ")
	if err != nil {
		return err
	}
	return writeCacheFile(c.treePath(repo, commit), data)
}

// snapshotFiles lists what the snapshot folder of commit holds, for a cache
// without trees/ (filled by an older huggingface_hub, or another client):
// sizes from the blobs, hashes from their names.
func (c *Client) snapshotFiles(repo Repo, commit string) []File {
	root := c.SnapshotDir(repo, commit)
	var files []File
	filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return nil
		}
		fi, err := os.Stat(p) // through the symlink
		if err != nil || !fi.Mode().IsRegular() {
			return nil
		}
		rel, _ := filepath.Rel(root, p)
		f := File{Path: filepath.ToSlash(rel), Size: fi.Size()}
		if target, err := os.Readlink(p); err == nil {
			switch name := filepath.Base(target); {
			case sha256RE.MatchString(name):
				f.LFSSHA256 = name
			case IsCommit(name):
				f.BlobID = name
			}
		}
		files = append(files, f)
		return nil
	})
	return files
}

var sha256RE = regexp.MustCompile(`^[0-9a-f]{64}$`)

// contentHash returns a hash to check a blob named etag against and the
// digest it must give: the sha256 of the content for a 64-hex etag (LFS),
// the git blob id (sha1 over "blob SIZE\0" and the content) for a 40-hex
// one. Other etags cannot be checked: nil.
func contentHash(etag string, size int64) (hash.Hash, string) {
	switch {
	case sha256RE.MatchString(etag):
		return sha256.New(), etag
	case IsCommit(etag) && size >= 0:
		h := sha1.New()
		io.WriteString(h, "blob "+strconv.FormatInt(size, 10)+"\x00")
		return h, etag
	}
	return nil, ""
}

// verifyBlob checks the file at path against etag and size (size < 0:
// unknown). A mismatch is an *Error of kind ErrCorrupt.
func verifyBlob(path, etag string, size int64) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	if size >= 0 && fi.Size() != size {
		return &Error{Kind: ErrCorrupt, Msg: fmt.Sprintf("%s has %d bytes, not %d", path, fi.Size(), size)}
	}
	h, want := contentHash(etag, fi.Size())
	if h == nil {
		return nil
	}
	if _, err := io.Copy(h, f); err != nil {
		return err
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != want {
		return &Error{Kind: ErrCorrupt, Msg: fmt.Sprintf("%s does not hash to its name (got %s)", path, got)}
	}
	return nil
}

// linkPointer makes snapshots/<commit>/<file> a relative symlink to blob,
// as huggingface_hub does, so that the cache survives being moved.
func linkPointer(pointer, blob string) error {
	if err := os.MkdirAll(filepath.Dir(pointer), 0o755); err != nil {
		return err
	}
	rel, err := filepath.Rel(filepath.Dir(pointer), blob)
	if err != nil {
		rel = blob
	}
	if err := os.Remove(pointer); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	if err := os.Symlink(rel, pointer); err != nil {
		if errors.Is(err, fs.ErrExist) {
			if a, _ := filepath.EvalSymlinks(pointer); a != "" {
				if b, _ := filepath.EvalSymlinks(blob); a == b {
					return nil // another process linked it meanwhile
				}
			}
		}
		return err
	}
	return nil
}

const cachedirTag = "Signature: 8a477f597d28d172789f06886806bc55\n" +
	"# This file is a cache directory tag created by a Hugging Face Hub client.\n" +
	"# For information about cache directory tags, see:\n" +
	"#\thttps://bford.info/cachedir/\n"

// tagCache marks the cache folder for backup tools, as huggingface_hub does.
func (c *Client) tagCache() {
	p := filepath.Join(c.CacheDir, "CACHEDIR.TAG")
	if _, err := os.Stat(p); errors.Is(err, fs.ErrNotExist) {
		_ = os.WriteFile(p, []byte(cachedirTag), 0o644)
	}
}
