// Package hub reads models and datasets from the Hugging Face Hub by name,
// through the same cache huggingface_hub keeps, so that what one of them
// downloaded the other uses as it is.
//
// A reference is written
//
//	hf://[datasets/|spaces/|models/]ORG/NAME[@REVISION][/PATH]
//
// where REVISION is a branch, a tag or a commit (main when left out; a
// revision holding a slash is written percent-encoded, except refs/pr/N and
// refs/convert/NAME, which are taken as they are) and PATH a file, a glob
// over the repository's files, or nothing for the repository itself.
//
// The cache is huggingface_hub's layout, in $HF_HUB_CACHE, else
// $HF_HOME/hub, else ~/.cache/huggingface/hub:
//
//	models--ORG--NAME/
//	  blobs/<etag>                   file contents, named by their ETag: the
//	                                 sha256 of LFS files, the git blob id of others
//	  snapshots/<commit>/<path>      relative symlinks into blobs/
//	  refs/<revision>                the commit a branch or tag named when last fetched
//	  trees/<commit>.json            the commit's file list (format_version 1)
//	.locks/models--ORG--NAME/<etag>.lock
//
// The client speaks the Hub's HTTP interface as huggingface_hub does:
// /api/{models,datasets,spaces}/ID/revision/REV for the commit a revision
// names, /api/.../tree/COMMIT for the file list (paginated with Link
// headers), and HEAD then GET on /[datasets/|spaces/]ID/resolve/COMMIT/PATH,
// whose X-Repo-Commit, ETag, X-Linked-Etag, X-Linked-Size and Location
// (often another host, for LFS files) say what the file is and where its
// bytes are. HF_TOKEN (or the file huggingface-cli login writes),
// HF_ENDPOINT and HF_HUB_OFFLINE are honoured.
package hub

import (
	"fmt"
	"net/url"
	"regexp"
	"strings"
)

// RepoType is the kind of a repository on the Hub.
type RepoType string

// The kinds of repositories.
const (
	Model   RepoType = "model"
	Dataset RepoType = "dataset"
	Space   RepoType = "space"
)

// Prefix is what every reference starts with.
const Prefix = "hf://"

// DefaultRevision is the revision of a reference that names none.
const DefaultRevision = "main"

// A Repo is a repository on the Hub.
type Repo struct {
	Type RepoType
	ID   string // ORG/NAME
}

// Folder is the repository's folder in the cache: models--ORG--NAME.
func (r Repo) Folder() string {
	return string(r.Type) + "s--" + strings.ReplaceAll(r.ID, "/", "--")
}

// urlPrefix is what precedes the id in the Hub's URLs: "" for models,
// "datasets/" and "spaces/" for the others.
func (r Repo) urlPrefix() string {
	if r.Type == Model {
		return ""
	}
	return string(r.Type) + "s/"
}

// Page is the repository's page on the Hub at endpoint, where its license
// is accepted.
func (r Repo) Page(endpoint string) string {
	return strings.TrimRight(endpoint, "/") + "/" + r.urlPrefix() + r.ID
}

func (r Repo) String() string { return Prefix + r.urlPrefix() + r.ID }

// A Ref is a parsed hf:// reference.
type Ref struct {
	Repo
	Revision string // DefaultRevision when the reference names none
	Path     string // a file, a glob or "" (the repository), without a leading slash
}

// fileExts are the extensions of files a path names, not a repository.
var fileExts = map[string]bool{"json": true, "jsonl": true, "gz": true, "parquet": true, "arrow": true, "safetensors": true,
	"gguf": true, "yaml": true, "yml": true, "txt": true, "md": true, "csv": true, "model": true}

// repoIDLike is a path written as a Hub repository's id: ORG/NAME.
var repoIDLike = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$`)

// RefFor is the hf:// reference a local path that does not exist was
// most likely meant as (google/gemma-3-1b-it, written as transformers
// takes it), with file appended when one is wanted ("tokenizer.json"), or
// "" when the path does not look like a repository's id.
func RefFor(path, file string) string {
	if !repoIDLike.MatchString(path) || strings.HasSuffix(path, "..") || fileExts[strings.ToLower(path[strings.LastIndex(path, ".")+1:])] {
		return ""
	}
	if file != "" {
		return Prefix + path + "/" + file
	}
	return Prefix + path
}

// IsRef says whether s is written as an hf:// reference.
func IsRef(s string) bool { return strings.HasPrefix(s, Prefix) }

var (
	nameRE   = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]*$`)
	commitRE = regexp.MustCompile(`^[0-9a-f]{40}$`)
)

// IsCommit says whether rev is a full commit id, which never moves.
func IsCommit(rev string) bool { return commitRE.MatchString(rev) }

// ParseRef reads an hf:// reference.
func ParseRef(s string) (Ref, error) {
	bad := func(format string, args ...any) (Ref, error) {
		return Ref{}, fmt.Errorf("%q: %s; write hf://ORG/NAME[@REVISION][/PATH], with datasets/ before ORG for a dataset", s, fmt.Sprintf(format, args...))
	}
	rest, ok := strings.CutPrefix(s, Prefix)
	if !ok {
		return bad("not an hf:// reference")
	}
	r := Ref{Repo: Repo{Type: Model}, Revision: DefaultRevision}
	parts := strings.Split(rest, "/")
	switch parts[0] {
	case "datasets":
		r.Type, parts = Dataset, parts[1:]
	case "spaces":
		r.Type, parts = Space, parts[1:]
	case "models":
		r.Type, parts = Model, parts[1:]
	}
	if len(parts) < 2 || parts[0] == "" || parts[1] == "" {
		return bad("a repository is named ORG/NAME")
	}
	org, name := parts[0], parts[1]
	parts = parts[2:]
	if i := strings.IndexByte(name, '@'); i >= 0 {
		rev := name[i+1:]
		name = name[:i]
		// refs/pr/N and refs/convert/NAME hold slashes of their own.
		if rev == "refs" && len(parts) >= 2 && (parts[0] == "pr" || parts[0] == "convert") {
			rev += "/" + parts[0] + "/" + parts[1]
			parts = parts[2:]
		}
		dec, err := url.PathUnescape(rev)
		if err != nil || dec == "" {
			return bad("bad revision %q", rev)
		}
		r.Revision = dec
	}
	for _, n := range []string{org, name} {
		if !nameRE.MatchString(n) || strings.Contains(n, "--") || strings.Contains(n, "..") || len(n) > 96 {
			return bad("%q is not a repository name (letters, digits, '-', '_', '.')", n)
		}
	}
	r.ID = org + "/" + name
	for _, p := range parts {
		if p == "" || p == "." || p == ".." {
			if p == "" && len(parts) == 1 {
				break // a trailing slash: the repository itself
			}
			return bad("bad path %q", strings.Join(parts, "/"))
		}
	}
	r.Path = strings.TrimSuffix(strings.Join(parts, "/"), "/")
	return r, nil
}

// OneFile is r as the reference to one file: fallback when r names only
// the repository (a tokenizer is the repository's tokenizer.json). It is
// false when r names a glob, which callers refuse before anything
// downloads.
func (r Ref) OneFile(fallback string) (Ref, bool) {
	if r.Path == "" {
		r.Path = fallback
	}
	return r, !strings.ContainsAny(r.Path, "*?[")
}

// RepoRef is the reference without its path: the repository at the
// revision, as plans name it.
func (r Ref) RepoRef() string {
	return r.Repo.String() + "@" + revisionText(r.Revision)
}

func (r Ref) String() string {
	if r.Path == "" {
		return r.RepoRef()
	}
	return r.RepoRef() + "/" + r.Path
}

// revisionText writes a revision as a reference holds it.
func revisionText(rev string) string {
	if strings.HasPrefix(rev, "refs/pr/") || strings.HasPrefix(rev, "refs/convert/") {
		return rev
	}
	return url.PathEscape(rev)
}

// ShortCommit is the first 7 characters of a commit id, as git shows it.
func ShortCommit(c string) string {
	if len(c) > 7 {
		return c[:7]
	}
	return c
}
