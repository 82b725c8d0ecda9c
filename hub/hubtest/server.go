// Package hubtest is a Hugging Face Hub in a process, for tests: it answers
// the endpoints and headers that huggingface_hub, @huggingface/hub and
// package hub rely on, from repositories a test fills, and misbehaves on
// request.
//
//	GET  /api/{models,datasets,spaces}/ID[/revision/REV]   revision info: sha, siblings
//	GET  /api/.../ID/tree/REV[/PATH]?recursive=&cursor=    file list, paginated with Link
//	POST /api/.../ID/paths-info/REV                        {"paths": [...], "expand": bool}
//	HEAD, GET /[datasets/|spaces/]ID/resolve/REV/PATH      the file: X-Repo-Commit, ETag;
//	                                                       LFS files redirect to the second
//	                                                       host with X-Linked-Etag (sha256)
//	                                                       and X-Linked-Size
//	GET  (storage host) /lfs/SHA256?sig=...                LFS content, with Range
//
// Errors carry X-Error-Code and X-Error-Message as the Hub's do: a missing
// or private repository is 401 without a token and 404 with one
// (RepoNotFound); a gated one lists its files to anyone but serves them
// only to a token granted access (401, then 403, GatedRepo); an unknown
// revision is RevisionNotFound, a missing file EntryNotFound; a token the
// server does not know is 401 "Invalid credentials in Authorization header".
package hubtest

import (
	"crypto/sha1"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

// LFSThreshold: files at least this large, and weights and data files of
// any size, are stored with LFS (served from the storage host).
const LFSThreshold = 1024

// A Request is one request the server answered, for tests to inspect.
type Request struct {
	Host   string // "hub" or "storage"
	Method string
	Path   string // unescaped
	Range  string
	Auth   string // the Authorization header
	Status int
}

// A Server is a Hub and its LFS storage, on two loopback host names.
type Server struct {
	URL        string // the Hub: what HF_ENDPOINT is set to
	StorageURL string // where LFS files are served from

	hub, storage *httptest.Server

	mu          sync.Mutex
	repos       map[string]*Repo // by type/id
	renamed     map[string]string
	tokens      map[string]map[string]bool // token -> repos granted (by key)
	blobs       map[string][]byte          // LFS content by sha256
	pageSize    int
	cut         int64 // cut the next file body after this many bytes (0: never)
	stall       int64 // hold the next file body after this many bytes (0: never)
	corrupt     int   // flip a byte of the next this many file bodies
	fail        []int // statuses for the next requests
	storageFail []int // statuses for the next requests to the storage host
	log         []Request
	clock       time.Time
}

// New starts a server. Close it when done.
func New() *Server {
	s := &Server{repos: map[string]*Repo{}, renamed: map[string]string{}, tokens: map[string]map[string]bool{},
		blobs: map[string][]byte{}, pageSize: 50, clock: time.Date(2025, 3, 12, 9, 0, 0, 0, time.UTC)}
	s.hub = httptest.NewServer(http.HandlerFunc(s.serveHub))
	s.storage = httptest.NewServer(http.HandlerFunc(s.serveStorage))
	// The storage answers under another host name, as the Hub's CDN does:
	// clients follow a redirect within one host name themselves
	// (huggingface_hub 1.33 does, and then misses the Hub's headers), and
	// keep the token from other hosts.
	s.URL, s.StorageURL = s.hub.URL, strings.Replace(s.storage.URL, "//127.0.0.1:", "//localhost:", 1)
	return s
}

// Close stops both hosts: from then on, connections are refused, as from a
// Hub that went away.
func (s *Server) Close() {
	s.hub.CloseClientConnections()
	s.storage.CloseClientConnections()
	s.hub.Close()
	s.storage.Close()
}

// A Repo is a repository of the server, with branches of commits.
type Repo struct {
	s        *Server
	Type     string // model, dataset or space
	ID       string
	Gated    bool
	Private  bool
	branches map[string]string // branch or tag -> commit
	commits  map[string]*commit
}

type commit struct {
	sha, parent, title string
	date               time.Time
	files              map[string][]byte
}

func key(typ, id string) string { return typ + "/" + id }

// AddRepo creates an empty repository of type model, dataset or space.
func (s *Server) AddRepo(typ, id string) *Repo {
	s.mu.Lock()
	defer s.mu.Unlock()
	r := &Repo{s: s, Type: typ, ID: id, branches: map[string]string{}, commits: map[string]*commit{}}
	s.repos[key(typ, id)] = r
	return r
}

// Commit adds a commit to branch (created if new) whose files are the
// branch's files with files laid over them (a nil content deletes one), and
// returns its id.
func (r *Repo) Commit(branch string, files map[string][]byte) string {
	r.s.mu.Lock()
	defer r.s.mu.Unlock()
	parent := r.commits[r.branches[branch]]
	c := &commit{files: map[string][]byte{}}
	if parent != nil {
		c.parent = parent.sha
		for p, b := range parent.files {
			c.files[p] = b
		}
	}
	var names []string
	for p, b := range files {
		if b == nil {
			delete(c.files, p)
		} else {
			c.files[p] = b
		}
		names = append(names, p)
	}
	sort.Strings(names)
	r.s.clock = r.s.clock.Add(time.Hour)
	c.date = r.s.clock
	c.title = "Update " + strings.Join(names, ", ")
	h := sha1.New()
	fmt.Fprintf(h, "%s\n%s\n%s\n%d\n", r.ID, c.parent, c.title, len(r.commits))
	for _, p := range sortedKeys(c.files) {
		fmt.Fprintf(h, "%s %s\n", p, blobID(c.files[p]))
	}
	c.sha = hex.EncodeToString(h.Sum(nil))
	r.commits[c.sha] = c
	r.branches[branch] = c.sha
	for p, b := range c.files {
		if isLFS(p, b) {
			sum := sha256.Sum256(b)
			r.s.blobs[hex.EncodeToString(sum[:])] = b
		}
	}
	return c.sha
}

// SetGated makes the repository gated (or not): its files go only to
// tokens granted access.
func (r *Repo) SetGated(g bool) { r.s.mu.Lock(); r.Gated = g; r.s.mu.Unlock() }

// SetPrivate makes the repository private (or not): it exists only for
// tokens granted access.
func (r *Repo) SetPrivate(p bool) { r.s.mu.Lock(); r.Private = p; r.s.mu.Unlock() }

// Tag points name at a commit, like a branch that is never committed to.
func (r *Repo) Tag(name, sha string) {
	r.s.mu.Lock()
	defer r.s.mu.Unlock()
	r.branches[name] = sha
}

// Head is the commit a branch names.
func (r *Repo) Head(branch string) string {
	r.s.mu.Lock()
	defer r.s.mu.Unlock()
	return r.branches[branch]
}

// AddToken makes token valid, granted access to the given gated or private
// repositories ("model/ORG/NAME", "dataset/ORG/NAME").
func (s *Server) AddToken(token string, repos ...string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	g := map[string]bool{}
	for _, r := range repos {
		g[r] = true
	}
	s.tokens[token] = g
}

// Rename moves a repository to a new id; the old one redirects, as the Hub
// does for renamed repositories.
func (s *Server) Rename(typ, oldID, newID string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	r := s.repos[key(typ, oldID)]
	delete(s.repos, key(typ, oldID))
	r.ID = newID
	s.repos[key(typ, newID)] = r
	s.renamed[key(typ, oldID)] = newID
}

// SetPageSize sets how many entries a page of a file list holds.
func (s *Server) SetPageSize(n int) { s.mu.Lock(); s.pageSize = n; s.mu.Unlock() }

// CutNext makes the next file body (from either host) stop after n bytes,
// the connection dropped, as a network failure mid-download does.
func (s *Server) CutNext(n int64) { s.mu.Lock(); s.cut = n; s.mu.Unlock() }

// StallNext makes the next file body stop after n bytes with the
// connection kept open, until the client goes away: a download a user
// interrupts.
func (s *Server) StallNext(n int64) { s.mu.Lock(); s.stall = n; s.mu.Unlock() }

// CorruptNext flips a byte of the next file body served.
func (s *Server) CorruptNext() { s.mu.Lock(); s.corrupt++; s.mu.Unlock() }

// ClearFailures drops the failures FailNext asked for that are left.
func (s *Server) ClearFailures() { s.mu.Lock(); s.fail = nil; s.mu.Unlock() }

// FailStorageNext answers the next n requests to the storage host with
// status (a signed address that expired: 403).
func (s *Server) FailStorageNext(status, n int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for range n {
		s.storageFail = append(s.storageFail, status)
	}
}

// FailNext answers the next n requests (to either host) with status.
func (s *Server) FailNext(status, n int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for range n {
		s.fail = append(s.fail, status)
	}
}

// Requests returns the requests answered so far.
func (s *Server) Requests() []Request {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Request(nil), s.log...)
}

// ResetRequests forgets the requests answered so far.
func (s *Server) ResetRequests() { s.mu.Lock(); s.log = nil; s.mu.Unlock() }

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

func isLFS(path string, b []byte) bool {
	if len(b) >= LFSThreshold {
		return true
	}
	for _, ext := range []string{".parquet", ".safetensors", ".bin", ".gguf", ".arrow"} {
		if strings.HasSuffix(path, ext) {
			return true
		}
	}
	return false
}

// blobID is git's id of a blob.
func blobID(b []byte) string {
	h := sha1.New()
	fmt.Fprintf(h, "blob %d\x00", len(b))
	h.Write(b)
	return hex.EncodeToString(h.Sum(nil))
}

// lfsPointer is the pointer file git keeps in place of an LFS file.
func lfsPointer(b []byte) []byte {
	sum := sha256.Sum256(b)
	return fmt.Appendf(nil, "version https://git-lfs.github.com/spec/v1\noid sha256:%s\nsize %d\n", hex.EncodeToString(sum[:]), len(b))
}

// recorder notes the status of a response for the request log.
type recorder struct {
	http.ResponseWriter
	status int
}

func (r *recorder) WriteHeader(code int) { r.status = code; r.ResponseWriter.WriteHeader(code) }

func (s *Server) begin(host string, w http.ResponseWriter, req *http.Request) (*recorder, func(), bool) {
	rec := &recorder{ResponseWriter: w, status: 200}
	s.mu.Lock()
	i := len(s.log)
	s.log = append(s.log, Request{Host: host, Method: req.Method, Path: req.URL.Path, Range: req.Header.Get("Range"), Auth: req.Header.Get("Authorization")})
	var fail int
	switch {
	case len(s.fail) > 0:
		fail, s.fail = s.fail[0], s.fail[1:]
	case host == "storage" && len(s.storageFail) > 0:
		fail, s.storageFail = s.storageFail[0], s.storageFail[1:]
	}
	s.mu.Unlock()
	done := func() {
		s.mu.Lock()
		if i < len(s.log) { // not forgotten by ResetRequests meanwhile
			s.log[i].Status = rec.status
		}
		s.mu.Unlock()
	}
	if fail != 0 {
		http.Error(rec, http.StatusText(fail), fail)
		done()
		return nil, nil, false
	}
	return rec, done, true
}

func hubError(w http.ResponseWriter, status int, code, msg string) {
	if code != "" {
		w.Header().Set("X-Error-Code", code)
	}
	w.Header().Set("X-Error-Message", msg)
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(map[string]string{"error": msg})
}

// access finds the repository and checks the token for reading its
// metadata (files false) or its files.
func (s *Server) access(w http.ResponseWriter, req *http.Request, typ, id string, files bool) *Repo {
	s.mu.Lock()
	r := s.repos[key(typ, id)]
	token := strings.TrimPrefix(req.Header.Get("Authorization"), "Bearer ")
	granted, known := s.tokens[token]
	var private, gated bool
	if r != nil {
		private, gated = r.Private, r.Gated
	}
	s.mu.Unlock()
	if token != "" && !known {
		hubError(w, http.StatusUnauthorized, "", "Invalid credentials in Authorization header")
		return nil
	}
	if r == nil || private && !granted[key(typ, id)] {
		if token == "" {
			hubError(w, http.StatusUnauthorized, "RepoNotFound", "Repository not found")
		} else {
			hubError(w, http.StatusNotFound, "RepoNotFound", "Repository not found")
		}
		return nil
	}
	if files && gated && !granted[key(typ, id)] {
		if token == "" {
			hubError(w, http.StatusUnauthorized, "GatedRepo", fmt.Sprintf("Access to %s %s is restricted. You must have access to it and be authenticated to access it. Please log in.", typ, id))
		} else {
			hubError(w, http.StatusForbidden, "GatedRepo", fmt.Sprintf("Access to %s %s is restricted and you are not in the authorized list. Visit %s/%s to ask for access.", typ, id, s.URL, id))
		}
		return nil
	}
	return r
}

// commitOf resolves a revision of r.
func (s *Server) commitOf(w http.ResponseWriter, r *Repo, rev string) *commit {
	s.mu.Lock()
	defer s.mu.Unlock()
	if c := r.commits[rev]; c != nil {
		return c
	}
	if c := r.commits[r.branches[rev]]; c != nil {
		return c
	}
	hubError(w, http.StatusNotFound, "RevisionNotFound", "Invalid rev id: "+rev)
	return nil
}

var types = map[string]string{"models": "model", "datasets": "dataset", "spaces": "space"}

// segments splits an escaped path, unescaping each segment, so that a
// revision written refs%2Fpr%2F1 stays one segment.
func segments(escaped string) []string {
	parts := strings.Split(strings.Trim(escaped, "/"), "/")
	for i, p := range parts {
		if u, err := url.PathUnescape(p); err == nil {
			parts[i] = u
		}
	}
	return parts
}

func (s *Server) serveHub(w http.ResponseWriter, req *http.Request) {
	rec, done, ok := s.begin("hub", w, req)
	if !ok {
		return
	}
	defer done()
	parts := segments(req.URL.EscapedPath())
	if loc, ok := s.movedTo(req); ok {
		rec.Header().Set("Location", loc)
		rec.WriteHeader(http.StatusTemporaryRedirect)
		return
	}
	if len(parts) >= 3 && parts[0] == "api" {
		typ, ok := types[parts[1]]
		if !ok || len(parts) < 4 {
			hubError(rec, http.StatusNotFound, "", "Not found")
			return
		}
		id := parts[2] + "/" + parts[3]
		rest := parts[4:]
		switch {
		case len(rest) == 0 && req.Method == http.MethodGet:
			s.revisionInfo(rec, req, typ, id, "main")
		case len(rest) == 2 && rest[0] == "revision" && req.Method == http.MethodGet:
			s.revisionInfo(rec, req, typ, id, rest[1])
		case len(rest) >= 2 && rest[0] == "tree" && req.Method == http.MethodGet:
			s.tree(rec, req, typ, id, rest[1], strings.Join(rest[2:], "/"))
		case len(rest) == 2 && rest[0] == "paths-info" && req.Method == http.MethodPost:
			s.pathsInfo(rec, req, typ, id, rest[1])
		default:
			hubError(rec, http.StatusNotFound, "", "Not found")
		}
		return
	}
	typ := "model"
	if len(parts) > 0 {
		if t, ok := types[parts[0]]; ok && t != "model" {
			typ, parts = t, parts[1:]
		}
	}
	if len(parts) < 5 || parts[2] != "resolve" {
		hubError(rec, http.StatusNotFound, "", "Not found")
		return
	}
	id := parts[0] + "/" + parts[1]
	s.resolve(rec, req, typ, id, parts[3], strings.Join(parts[4:], "/"))
}

// movedTo is the relative address a request for a renamed repository is
// redirected to.
func (s *Server) movedTo(req *http.Request) (string, bool) {
	esc := strings.Split(strings.Trim(req.URL.EscapedPath(), "/"), "/")
	at := 0 // where ORG/NAME starts
	switch {
	case len(esc) > 2 && esc[0] == "api":
		at = 2
	case len(esc) > 0 && (esc[0] == "datasets" || esc[0] == "spaces"):
		at = 1
	}
	if len(esc) < at+2 {
		return "", false
	}
	typ := "model"
	if at > 0 {
		typ = types[esc[at-1]]
	}
	s.mu.Lock()
	newID, ok := s.renamed[key(typ, esc[at]+"/"+esc[at+1])]
	s.mu.Unlock()
	if !ok {
		return "", false
	}
	out := append(append(append([]string{}, esc[:at]...), newID), esc[at+2:]...)
	loc := "/" + strings.Join(out, "/")
	if req.URL.RawQuery != "" {
		loc += "?" + req.URL.RawQuery
	}
	return loc, true
}

// repoAt finds the repository, checks the token (for its files, or its
// metadata) and resolves rev; on failure it has answered, and c is nil.
func (s *Server) repoAt(w http.ResponseWriter, req *http.Request, typ, id, rev string, files bool) (*Repo, *commit) {
	r := s.access(w, req, typ, id, files)
	if r == nil {
		return nil, nil
	}
	return r, s.commitOf(w, r, rev)
}

func (s *Server) revisionInfo(w http.ResponseWriter, req *http.Request, typ, id, rev string) {
	r, c := s.repoAt(w, req, typ, id, rev, false)
	if c == nil {
		return
	}
	siblings := []map[string]string{}
	for _, p := range sortedKeys(c.files) {
		siblings = append(siblings, map[string]string{"rfilename": p})
	}
	s.mu.Lock()
	isGated, private := r.Gated, r.Private
	s.mu.Unlock()
	var gated any = false
	if isGated {
		gated = "manual"
	}
	info := map[string]any{
		"_id": fmt.Sprintf("%x", sha1.Sum([]byte(key(typ, id))))[:24], "id": id, "author": strings.Split(id, "/")[0],
		"sha": c.sha, "lastModified": c.date.Format(hubTime), "createdAt": c.date.Format(hubTime),
		"private": private, "gated": gated, "disabled": false, "downloads": 0, "likes": 0, "tags": []string{},
		"siblings": siblings,
	}
	if typ == "model" {
		info["modelId"] = id
		info["pipeline_tag"] = "text-generation"
		info["library_name"] = "transformers"
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(info)
}

// entry is a file or folder as the tree and paths-info endpoints list it.
func (s *Server) entry(r *Repo, c *commit, p string, expand bool) map[string]any {
	b, isFile := c.files[p]
	if !isFile {
		return map[string]any{"type": "directory", "oid": blobID([]byte(p)), "size": 0, "path": p}
	}
	e := map[string]any{"type": "file", "size": len(b), "path": p, "oid": blobID(b)}
	if isLFS(p, b) {
		sum := sha256.Sum256(b)
		ptr := lfsPointer(b)
		e["oid"] = blobID(ptr)
		e["lfs"] = map[string]any{"oid": hex.EncodeToString(sum[:]), "size": len(b), "pointerSize": len(ptr)}
	}
	if expand {
		// The last commit that changed the file.
		last := c
		for last.parent != "" {
			prev := r.commits[last.parent]
			if pb, ok := prev.files[p]; !ok || string(pb) != string(b) {
				break
			}
			last = prev
		}
		e["lastCommit"] = map[string]any{"id": last.sha, "title": last.title, "date": last.date.Format(hubTime)}
	}
	return e
}

func (s *Server) tree(w http.ResponseWriter, req *http.Request, typ, id, rev, dir string) {
	r, c := s.repoAt(w, req, typ, id, rev, false)
	if c == nil {
		return
	}
	q := req.URL.Query()
	recursive := q.Get("recursive") == "true" || q.Get("recursive") == "True" || q.Get("recursive") == "1"
	expand := q.Get("expand") == "true" || q.Get("expand") == "True" || q.Get("expand") == "1"
	prefix := ""
	if dir != "" {
		prefix = dir + "/"
	}
	seen := map[string]bool{}
	var paths []string
	for _, p := range sortedKeys(c.files) {
		if !strings.HasPrefix(p, prefix) {
			continue
		}
		rel := strings.Split(strings.TrimPrefix(p, prefix), "/")
		// Folders on the way, then the file (or only the first folder).
		for i := 1; i < len(rel); i++ {
			d := prefix + strings.Join(rel[:i], "/")
			if !seen[d] {
				seen[d] = true
				paths = append(paths, d)
			}
			if !recursive {
				break
			}
		}
		if recursive || len(rel) == 1 {
			paths = append(paths, p)
		}
	}
	if dir != "" && len(paths) == 0 {
		hubError(w, http.StatusNotFound, "EntryNotFound", "Entry not found")
		return
	}
	sort.Strings(paths)
	s.mu.Lock()
	size := s.pageSize
	s.mu.Unlock()
	start, _ := strconv.Atoi(q.Get("cursor"))
	end := min(start+size, len(paths))
	start = min(start, end)
	out := []map[string]any{}
	s.mu.Lock()
	for _, p := range paths[start:end] {
		out = append(out, s.entry(r, c, p, expand))
	}
	s.mu.Unlock()
	if end < len(paths) {
		next := *req.URL
		nq := next.Query()
		nq.Set("cursor", strconv.Itoa(end))
		next.RawQuery = nq.Encode()
		w.Header().Set("Link", fmt.Sprintf(`<%s%s>; rel="next"`, s.URL, next.RequestURI()))
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(out)
}

func (s *Server) pathsInfo(w http.ResponseWriter, req *http.Request, typ, id, rev string) {
	r, c := s.repoAt(w, req, typ, id, rev, false)
	if c == nil {
		return
	}
	var body struct {
		Paths  []string `json:"paths"`
		Expand bool     `json:"expand"`
	}
	if req.Header.Get("Content-Type") == "application/x-www-form-urlencoded" {
		req.ParseForm()
		body.Paths = req.Form["paths"]
		body.Expand = req.Form.Get("expand") == "true" || req.Form.Get("expand") == "True"
	} else if err := json.NewDecoder(req.Body).Decode(&body); err != nil {
		hubError(w, http.StatusBadRequest, "", "bad body")
		return
	}
	out := []map[string]any{}
	s.mu.Lock()
	for _, p := range body.Paths {
		if _, ok := c.files[p]; ok {
			out = append(out, s.entry(r, c, p, body.Expand))
		}
	}
	s.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(out)
}

func (s *Server) resolve(w http.ResponseWriter, req *http.Request, typ, id, rev, p string) {
	if req.Method != http.MethodGet && req.Method != http.MethodHead {
		hubError(w, http.StatusMethodNotAllowed, "", "method not allowed")
		return
	}
	_, c := s.repoAt(w, req, typ, id, rev, true)
	if c == nil {
		return
	}
	w.Header().Set("X-Repo-Commit", c.sha)
	s.mu.Lock()
	b, ok := c.files[p]
	s.mu.Unlock()
	if !ok {
		hubError(w, http.StatusNotFound, "EntryNotFound", "Entry not found")
		return
	}
	if isLFS(p, b) {
		sum := sha256.Sum256(b)
		hexsum := hex.EncodeToString(sum[:])
		w.Header().Set("ETag", `"`+blobID(lfsPointer(b))+`"`)
		w.Header().Set("X-Linked-Etag", `"`+hexsum+`"`)
		w.Header().Set("X-Linked-Size", strconv.Itoa(len(b)))
		w.Header().Set("Location", fmt.Sprintf("%s/lfs/%s?sig=%x&filename=%s", s.StorageURL, hexsum, sha1.Sum([]byte(hexsum+"secret")), url.QueryEscape(p)))
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.WriteHeader(http.StatusFound)
		return
	}
	s.serveBody(w, req, b, `"`+blobID(b)+`"`)
}

func (s *Server) serveStorage(w http.ResponseWriter, req *http.Request) {
	rec, done, ok := s.begin("storage", w, req)
	if !ok {
		return
	}
	defer done()
	sum, ok := strings.CutPrefix(req.URL.Path, "/lfs/")
	s.mu.Lock()
	b, found := s.blobs[sum]
	s.mu.Unlock()
	if !ok || !found || req.URL.Query().Get("sig") == "" {
		http.Error(rec, "NoSuchKey", http.StatusNotFound)
		return
	}
	if req.Header.Get("Authorization") != "" {
		// Signed storage addresses refuse a second credential, as S3 does.
		http.Error(rec, "InvalidArgument: Only one auth mechanism allowed", http.StatusBadRequest)
		return
	}
	s.serveBody(rec, req, b, `"`+sum+`"`)
}

// serveBody writes b (or the range asked), cutting or corrupting it when a
// test asked for that.
func (s *Server) serveBody(w http.ResponseWriter, req *http.Request, b []byte, etag string) {
	h := w.Header()
	h.Set("ETag", etag)
	h.Set("Accept-Ranges", "bytes")
	h.Set("Content-Type", "application/octet-stream")
	start, end := int64(0), int64(len(b))
	status := http.StatusOK
	if rg := req.Header.Get("Range"); rg != "" {
		a, z, ok := parseRange(rg, int64(len(b)))
		if !ok {
			h.Set("Content-Range", fmt.Sprintf("bytes */%d", len(b)))
			w.WriteHeader(http.StatusRequestedRangeNotSatisfiable)
			return
		}
		start, end, status = a, z, http.StatusPartialContent
		h.Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", a, z-1, len(b)))
	}
	h.Set("Content-Length", strconv.FormatInt(end-start, 10))
	w.WriteHeader(status)
	if req.Method == http.MethodHead {
		return
	}
	body := b[start:end]
	s.mu.Lock()
	cut, stall, corrupt := s.cut, s.stall, s.corrupt > 0
	s.cut, s.stall = 0, 0
	if corrupt {
		s.corrupt--
	}
	s.mu.Unlock()
	if corrupt && len(body) > 0 {
		body = append([]byte(nil), body...)
		body[len(body)/2] ^= 0x55
	}
	if cut > 0 && cut < int64(len(body)) {
		w.Write(body[:cut])
		if f, ok := w.(http.Flusher); ok {
			f.Flush()
		}
		panic(http.ErrAbortHandler) // drop the connection mid-body
	}
	if stall > 0 && stall < int64(len(body)) {
		w.Write(body[:stall])
		if f, ok := w.(http.Flusher); ok {
			f.Flush()
		}
		<-req.Context().Done()
		return
	}
	w.Write(body)
}

func (r *recorder) Flush() {
	if f, ok := r.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

// parseRange reads a single "bytes=a-b", "bytes=a-" or "bytes=-n" range.
func parseRange(h string, size int64) (int64, int64, bool) {
	spec, ok := strings.CutPrefix(h, "bytes=")
	if !ok || strings.Contains(spec, ",") {
		return 0, 0, false
	}
	a, b, ok := strings.Cut(spec, "-")
	if !ok {
		return 0, 0, false
	}
	if a == "" {
		n, err := strconv.ParseInt(b, 10, 64)
		if err != nil || n <= 0 {
			return 0, 0, false
		}
		return max(size-n, 0), size, true
	}
	start, err := strconv.ParseInt(a, 10, 64)
	if err != nil || start < 0 || start >= size {
		return 0, 0, false
	}
	end := size
	if b != "" {
		e, err := strconv.ParseInt(b, 10, 64)
		if err != nil || e < start {
			return 0, 0, false
		}
		end = min(e+1, size)
	}
	return start, end, true
}

// hubTime is how the Hub writes dates (huggingface_hub parses this form).
const hubTime = "2006-01-02T15:04:05.000Z"
