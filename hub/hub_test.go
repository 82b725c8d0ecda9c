package hub_test

import (
	"bytes"
	"context"
	"crypto/sha1"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"gemmaft/hub"
	"gemmaft/hub/hubtest"
)

// content makes n bytes that differ from every other call's.
func content(seed string, n int) []byte {
	var b bytes.Buffer
	for i := 0; b.Len() < n; i++ {
		fmt.Fprintf(&b, "%s-%d;", seed, i)
	}
	return b.Bytes()[:n]
}

func sha(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// fixture is a server with a model repository and a dataset repository.
type fixture struct {
	srv     *hubtest.Server
	model   *hubtest.Repo
	data    *hubtest.Repo
	files   map[string][]byte // the model's
	shards  map[string][]byte // the dataset's
	commit  string            // the model's main
	dcommit string            // the dataset's main
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	f := &fixture{srv: hubtest.New()}
	t.Cleanup(f.srv.Close)
	f.files = map[string][]byte{
		"config.json":                  []byte(`{"model_type": "gemma3_text"}`),
		"tokenizer_config.json":        []byte(`{"tokenizer_class": "GemmaTokenizer"}`),
		"tokenizer.json":               content("tok", 5000),
		"model.safetensors":            content("weights", 300_000),
		"README.md":                    []byte("# a model\n"),
		"original/consolidated.pth":    content("pth", 2000),
		"pytorch_model.bin":            content("bin", 3000),
		"generation_config.json":       []byte(`{"do_sample": false}`),
		"chat_template.jinja":          []byte("{{ messages }}"),
		"model.safetensors.index.json": nil,
	}
	delete(f.files, "model.safetensors.index.json")
	f.model = f.srv.AddRepo("model", "google/gemma-3-tiny-it")
	f.commit = f.model.Commit("main", f.files)
	f.shards = map[string][]byte{
		"data/train-00000-of-00002.parquet": content("shard0", 4000),
		"data/train-00001-of-00002.parquet": content("shard1", 3000),
		"data/test-00000-of-00001.parquet":  content("test", 500),
		"README.md":                         []byte("---\nlicense: cc-by-4.0\n---\n"),
	}
	f.data = f.srv.AddRepo("dataset", "malhajar/alpaca-gpt4-tr")
	f.dcommit = f.data.Commit("main", f.shards)
	return f
}

func (f *fixture) client(t *testing.T, cache string) *hub.Client {
	t.Helper()
	t.Setenv("HF_ENDPOINT", f.srv.URL)
	t.Setenv("HF_HUB_CACHE", cache)
	t.Setenv("HF_TOKEN", "")
	t.Setenv("HF_HOME", t.TempDir())
	t.Setenv("HF_HUB_OFFLINE", "")
	c := hub.FromEnv()
	c.Backoff, c.MaxBackoff, c.IdleTimeout = time.Millisecond, 4*time.Millisecond, 2*time.Second
	c.Retries = 3
	return c
}

func mustRef(t *testing.T, s string) hub.Ref {
	t.Helper()
	r, err := hub.ParseRef(s)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// TestOneFile: a reference to the repository names its fallback file, one
// to a file names that file, and a glob is not one file.
func TestOneFile(t *testing.T) {
	for in, want := range map[string]string{
		"hf://google/gemma-3-1b-it":                    "hf://google/gemma-3-1b-it@main/tokenizer.json",
		"hf://google/gemma-3-1b-it@v1/tok/custom.json": "hf://google/gemma-3-1b-it@v1/tok/custom.json",
		"hf://google/gemma-3-1b-it/*.json":             "",
		"hf://google/gemma-3-1b-it/tokenizer.jso[n]":   "",
	} {
		ref, err := hub.ParseRef(in)
		if err != nil {
			t.Fatal(err)
		}
		one, ok := ref.OneFile("tokenizer.json")
		if ok != (want != "") || ok && one.String() != want {
			t.Errorf("%s: %s, %v; want %q", in, one, ok, want)
		}
	}
}

func TestParseRef(t *testing.T) {
	for _, c := range []struct {
		in                 string
		typ                hub.RepoType
		id, rev, path, out string
	}{
		{"hf://google/gemma-3-12b-it", hub.Model, "google/gemma-3-12b-it", "main", "", "hf://google/gemma-3-12b-it@main"},
		{"hf://google/gemma-3-12b-it@v1.0/tokenizer.json", hub.Model, "google/gemma-3-12b-it", "v1.0", "tokenizer.json", ""},
		{"hf://models/google/gemma-3-12b-it/", hub.Model, "google/gemma-3-12b-it", "main", "", "hf://google/gemma-3-12b-it@main"},
		{"hf://datasets/malhajar/alpaca-gpt4-tr@0123456789abcdef0123456789abcdef01234567/data/train-*.parquet", hub.Dataset, "malhajar/alpaca-gpt4-tr", "0123456789abcdef0123456789abcdef01234567", "data/train-*.parquet", ""},
		{"hf://datasets/x/y@refs/convert/parquet/default/train/0000.parquet", hub.Dataset, "x/y", "refs/convert/parquet", "default/train/0000.parquet", ""},
		{"hf://x/y@refs/pr/3", hub.Model, "x/y", "refs/pr/3", "", ""},
		{"hf://x/y@feature%2Fnew/a.json", hub.Model, "x/y", "feature/new", "a.json", "hf://x/y@feature%2Fnew/a.json"},
		{"hf://spaces/a/b@main/app.py", hub.Space, "a/b", "main", "app.py", ""},
	} {
		r, err := hub.ParseRef(c.in)
		if err != nil {
			t.Errorf("%s: %v", c.in, err)
			continue
		}
		if r.Type != c.typ || r.ID != c.id || r.Revision != c.rev || r.Path != c.path {
			t.Errorf("%s: got %+v", c.in, r)
		}
		want := c.out
		if want == "" {
			want = c.in
		}
		if r.String() != want {
			t.Errorf("%s: String() = %s, want %s", c.in, r.String(), want)
		}
	}
	for _, bad := range []string{"hf://gpt2", "hf://datasets/x", "hf://a/b/../c", "hf://a--b/c", "hf://a/b@", "/models/x", "hf://a/b//c"} {
		if _, err := hub.ParseRef(bad); err == nil {
			t.Errorf("%s: parsed", bad)
		}
	}
	if got := (hub.Repo{Type: hub.Dataset, ID: "malhajar/alpaca-gpt4-tr"}).Folder(); got != "datasets--malhajar--alpaca-gpt4-tr" {
		t.Errorf("folder %s", got)
	}
}

// TestFetchLayout: a fetch leaves exactly huggingface_hub's layout.
func TestFetchLayout(t *testing.T) {
	f := newFixture(t)
	cache := t.TempDir()
	c := f.client(t, cache)
	c.Token = "tok-read"
	f.srv.AddToken("tok-read")
	ctx := context.Background()
	var last [2]int64
	r, paths, err := c.Local(ctx, mustRef(t, "hf://google/gemma-3-tiny-it"), hub.FetchOptions{Progress: func(d, t int64) { last = [2]int64{d, t} }})
	if err != nil {
		t.Fatal(err)
	}
	if r.Commit != f.commit || r.Note != "" {
		t.Fatalf("resolved %+v, want %s", r, f.commit)
	}
	snap := filepath.Join(cache, "models--google--gemma-3-tiny-it", "snapshots", f.commit)
	if len(paths) != 1 || paths[0] != snap {
		t.Fatalf("paths %v", paths)
	}
	var want int64
	for _, p := range []string{"config.json", "tokenizer_config.json", "tokenizer.json", "model.safetensors", "generation_config.json", "chat_template.jinja"} {
		want += int64(len(f.files[p]))
		pointer := filepath.Join(snap, p)
		target, err := os.Readlink(pointer)
		if err != nil {
			t.Fatalf("%s: not a symlink: %v", p, err)
		}
		if filepath.IsAbs(target) || !strings.HasPrefix(target, "../../blobs/") {
			t.Errorf("%s -> %s: want a relative link into blobs/", p, target)
		}
		got, err := os.ReadFile(pointer)
		if err != nil || !bytes.Equal(got, f.files[p]) {
			t.Errorf("%s: content differs (%v)", p, err)
		}
		// LFS files are named by their sha256, others by their git blob id.
		name := filepath.Base(target)
		if len(f.files[p]) >= hubtest.LFSThreshold || strings.HasSuffix(p, ".safetensors") {
			if name != sha(f.files[p]) {
				t.Errorf("%s: blob %s, want its sha256", p, name)
			}
		} else if len(name) != 40 {
			t.Errorf("%s: blob %s, want a git blob id", p, name)
		}
	}
	if last != [2]int64{want, want} {
		t.Errorf("progress ended at %v, want %d of %d", last, want, want)
	}
	for _, p := range []string{"README.md", "pytorch_model.bin", "original"} {
		if _, err := os.Lstat(filepath.Join(snap, p)); err == nil {
			t.Errorf("%s fetched; a model folder has no use for it", p)
		}
	}
	ref, err := os.ReadFile(filepath.Join(cache, "models--google--gemma-3-tiny-it", "refs", "main"))
	if err != nil || string(ref) != f.commit {
		t.Errorf("refs/main = %q (%v), want %s", ref, err, f.commit)
	}
	var tree struct {
		FormatVersion int `json:"format_version"`
		Files         map[string]struct {
			Size      int64  `json:"size"`
			BlobID    string `json:"blob_id"`
			LFSSHA256 string `json:"lfs_sha256"`
		} `json:"files"`
	}
	data, err := os.ReadFile(filepath.Join(cache, "models--google--gemma-3-tiny-it", "trees", f.commit+".json"))
	if err != nil || json.Unmarshal(data, &tree) != nil || tree.FormatVersion != 1 || len(tree.Files) != len(f.files) {
		t.Errorf("trees/%s.json: %v %s", f.commit, err, data)
	}
	if e := tree.Files["model.safetensors"]; e.LFSSHA256 != sha(f.files["model.safetensors"]) || e.Size != 300_000 {
		t.Errorf("tree entry of the weights: %+v", e)
	}
	if _, err := os.Stat(filepath.Join(cache, "CACHEDIR.TAG")); err != nil {
		t.Error("no CACHEDIR.TAG")
	}
	for _, rq := range f.srv.Requests() {
		if rq.Host == "storage" && rq.Auth != "" {
			t.Errorf("the token went to the storage host: %+v", rq)
		}
		if rq.Host == "hub" && rq.Auth != "Bearer tok-read" {
			t.Errorf("no token to the Hub: %+v", rq)
		}
	}

	// Again: one request to resolve main, nothing else.
	f.srv.ResetRequests()
	if _, _, err := c.Local(ctx, mustRef(t, "hf://google/gemma-3-tiny-it"), hub.FetchOptions{}); err != nil {
		t.Fatal(err)
	}
	if rq := f.srv.Requests(); len(rq) != 1 || !strings.Contains(rq[0].Path, "/revision/main") {
		t.Errorf("second fetch made requests %+v; want only the revision", rq)
	}
	// Pinned to the commit: no request at all.
	f.srv.ResetRequests()
	if _, _, err := c.Local(ctx, mustRef(t, "hf://google/gemma-3-tiny-it@"+f.commit+"/tokenizer.json"), hub.FetchOptions{}); err != nil {
		t.Fatal(err)
	}
	if rq := f.srv.Requests(); len(rq) != 0 {
		t.Errorf("a pinned, cached file made requests %+v", rq)
	}
}

func TestDatasetGlobPaginated(t *testing.T) {
	f := newFixture(t)
	f.srv.SetPageSize(2)
	cache := t.TempDir()
	c := f.client(t, cache)
	r, paths, err := c.Local(context.Background(), mustRef(t, "hf://datasets/malhajar/alpaca-gpt4-tr/data/train-*.parquet"), hub.FetchOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if r.Commit != f.dcommit || len(paths) != 2 {
		t.Fatalf("%+v %v", r, paths)
	}
	for i, p := range paths {
		name := fmt.Sprintf("data/train-0000%d-of-00002.parquet", i)
		if want := filepath.Join(cache, "datasets--malhajar--alpaca-gpt4-tr", "snapshots", f.dcommit, name); p != want {
			t.Errorf("path %d: %s, want %s", i, p, want)
		}
		if b, _ := os.ReadFile(p); !bytes.Equal(b, f.shards[name]) {
			t.Errorf("%s differs", name)
		}
	}
	pages := 0
	for _, rq := range f.srv.Requests() {
		if strings.Contains(rq.Path, "/tree/") {
			pages++
		}
	}
	if pages < 3 {
		t.Errorf("%d pages of the file list; the page size was 2 for 6 entries", pages)
	}
	_, _, err = c.Local(context.Background(), mustRef(t, "hf://datasets/malhajar/alpaca-gpt4-tr/data/valid-*.parquet"), hub.FetchOptions{})
	if !errors.Is(err, hub.ErrEntryNotFound) || !strings.Contains(err.Error(), "data/train-00000-of-00002.parquet") {
		t.Errorf("a glob matching nothing: %v", err)
	}
}

// TestResume: a download cut off mid-file resumes with a Range request,
// within one fetch and across fetches (the .incomplete file kept).
func TestResume(t *testing.T) {
	f := newFixture(t)
	cache := t.TempDir()
	c := f.client(t, cache)
	ctx := context.Background()
	ref := mustRef(t, "hf://google/gemma-3-tiny-it/model.safetensors")
	weights := f.files["model.safetensors"]

	f.srv.CutNext(100_000)
	_, paths, err := c.Local(ctx, ref, hub.FetchOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(paths[0]); !bytes.Equal(b, weights) {
		t.Fatal("resumed download differs")
	}
	if !hasRange(f.srv.Requests(), "bytes=100000-") {
		t.Errorf("no Range request resumed at 100000: %+v", f.srv.Requests())
	}

	// Across runs: the first gives up (no retries), leaving .incomplete.
	cache2 := t.TempDir()
	c2 := f.client(t, cache2)
	c2.Retries = 0
	f.srv.CutNext(120_000)
	if _, _, err := c2.Local(ctx, ref, hub.FetchOptions{}); !errors.Is(err, hub.ErrUnreachable) {
		t.Fatalf("cut download with no retries: %v", err)
	}
	partial := filepath.Join(cache2, "models--google--gemma-3-tiny-it", "blobs", sha(weights)+".incomplete")
	if fi, err := os.Stat(partial); err != nil || fi.Size() != 120_000 {
		t.Fatalf("partial download: %v %v", fi, err)
	}
	f.srv.ResetRequests()
	var first int64 = -1
	_, paths, err = c2.Local(ctx, ref, hub.FetchOptions{Progress: func(d, _ int64) {
		if first < 0 {
			first = d
		}
	}})
	if err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(paths[0]); !bytes.Equal(b, weights) {
		t.Fatal("download resumed across runs differs")
	}
	if !hasRange(f.srv.Requests(), "bytes=120000-") {
		t.Errorf("second run did not resume at 120000: %+v", f.srv.Requests())
	}
	if first != 120_000 {
		t.Errorf("progress started at %d, want the 120000 bytes already there", first)
	}
	if _, err := os.Stat(partial); err == nil {
		t.Error(".incomplete left behind")
	}
}

func hasRange(rs []hubtest.Request, want string) bool {
	for _, r := range rs {
		if r.Range == want && r.Host == "storage" {
			return true
		}
	}
	return false
}

// TestCorruptBlobRefetched: a damaged blob in the cache (or a download that
// does not match its hash) is detected and fetched again.
func TestCorruptBlobRefetched(t *testing.T) {
	f := newFixture(t)
	cache := t.TempDir()
	c := f.client(t, cache)
	ctx := context.Background()
	ref := mustRef(t, "hf://google/gemma-3-tiny-it")
	if _, _, err := c.Local(ctx, ref, hub.FetchOptions{}); err != nil {
		t.Fatal(err)
	}
	blobs := filepath.Join(cache, "models--google--gemma-3-tiny-it", "blobs")
	for _, name := range []string{sha(f.files["model.safetensors"]), gitBlob(f.files["config.json"])} {
		b, err := os.ReadFile(filepath.Join(blobs, name))
		if err != nil {
			t.Fatal(err)
		}
		b[len(b)/2] ^= 1 // same size, one bit off
		if err := os.WriteFile(filepath.Join(blobs, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	f.srv.ResetRequests()
	_, paths, err := c.Local(ctx, ref, hub.FetchOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"model.safetensors", "config.json"} {
		if b, _ := os.ReadFile(filepath.Join(paths[0], p)); !bytes.Equal(b, f.files[p]) {
			t.Errorf("%s not repaired", p)
		}
	}
	gets := 0
	for _, r := range f.srv.Requests() {
		if r.Method == http.MethodGet && !strings.HasPrefix(r.Path, "/api/") {
			gets++
		}
	}
	if gets != 2 {
		t.Errorf("%d downloads to repair two files", gets)
	}

	// The server sends a damaged body once: detected, started over.
	cache2 := t.TempDir()
	c2 := f.client(t, cache2)
	f.srv.CorruptNext()
	_, paths, err = c2.Local(ctx, mustRef(t, "hf://google/gemma-3-tiny-it/model.safetensors"), hub.FetchOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(paths[0]); !bytes.Equal(b, f.files["model.safetensors"]) {
		t.Error("a corrupted download was kept")
	}
	// Every time: an error that says so.
	c3 := f.client(t, t.TempDir())
	f.srv.CorruptNext()
	f.srv.CorruptNext()
	_, _, err = c3.Local(ctx, mustRef(t, "hf://google/gemma-3-tiny-it/model.safetensors"), hub.FetchOptions{})
	if !errors.Is(err, hub.ErrCorrupt) || !strings.Contains(err.Error(), "does not hash to its name") ||
		!strings.HasPrefix(err.Error(), "hf://google/gemma-3-tiny-it@main/model.safetensors: ") || !strings.HasSuffix(err.Error(), "run again to download it afresh") {
		t.Errorf("corrupted twice: %v", err)
	}
}

func gitBlob(b []byte) string {
	s := sha1.Sum(fmt.Appendf(nil, "blob %d\x00%s", len(b), b))
	return hex.EncodeToString(s[:])
}

func TestErrors(t *testing.T) {
	f := newFixture(t)
	f.model.SetGated(true)
	f.srv.AddToken("tok-nogrant")
	f.srv.AddToken("tok-granted", "model/google/gemma-3-tiny-it")
	cache := t.TempDir()
	c := f.client(t, cache)
	ctx := context.Background()
	ref := mustRef(t, "hf://google/gemma-3-tiny-it")

	_, _, err := c.Local(ctx, ref, hub.FetchOptions{})
	if !errors.Is(err, hub.ErrGated) || !strings.Contains(err.Error(), "accept its license at "+f.srv.URL+"/google/gemma-3-tiny-it") || !strings.Contains(err.Error(), "HF_TOKEN") {
		t.Errorf("gated without a token: %v", err)
	}
	c.Token = "tok-nogrant"
	if _, _, err := c.Local(ctx, ref, hub.FetchOptions{}); !errors.Is(err, hub.ErrGated) || !strings.Contains(err.Error(), "not granted access") {
		t.Errorf("gated, token without access: %v", err)
	}
	c.Token = "tok-granted"
	if _, _, err := c.Local(ctx, ref, hub.FetchOptions{}); err != nil {
		t.Errorf("gated, token granted: %v", err)
	}
	c.Token = "tok-unknown"
	if _, err := c.Resolve(ctx, mustRef(t, "hf://google/other")); !errors.Is(err, hub.ErrBadToken) || !strings.Contains(err.Error(), "settings/tokens") {
		t.Errorf("unknown token: %v", err)
	}
	c.Token = ""
	_, err = c.Resolve(ctx, mustRef(t, "hf://google/gemma-3-tiny-itt"))
	if !errors.Is(err, hub.ErrRepoNotFound) || !strings.Contains(err.Error(), "check the name") || !strings.Contains(err.Error(), "hf://datasets/") {
		t.Errorf("wrong name: %v", err)
	}
	_, err = c.Resolve(ctx, mustRef(t, "hf://datasets/google/gemma-3-tiny-it"))
	if !errors.Is(err, hub.ErrRepoNotFound) {
		t.Errorf("model named as a dataset: %v", err)
	}
	_, err = c.Resolve(ctx, mustRef(t, "hf://google/gemma-3-tiny-it@v9"))
	if !errors.Is(err, hub.ErrRevisionNotFound) || !strings.Contains(err.Error(), `"v9"`) || strings.Contains(err.Error(), "%2F") {
		t.Errorf("wrong revision: %v", err)
	}
	// A branch with a slash, written bare, reads as its first part.
	_, err = c.Resolve(ctx, mustRef(t, "hf://google/gemma-3-tiny-it@feat/x/config.json"))
	if !errors.Is(err, hub.ErrRevisionNotFound) || !strings.Contains(err.Error(), "a revision with a slash in its name is written with %2F (@feat%2F…)") {
		t.Errorf("a revision with a slash: %v", err)
	}
	c.Token = "tok-granted"
	_, _, err = c.Local(ctx, mustRef(t, "hf://google/gemma-3-tiny-it/tokenizer.model"), hub.FetchOptions{})
	if !errors.Is(err, hub.ErrEntryNotFound) {
		t.Errorf("missing file: %v", err)
	}
	// A missing commit is a wrong revision too.
	_, _, err = c.Local(ctx, mustRef(t, "hf://google/gemma-3-tiny-it@"+strings.Repeat("ab", 20)), hub.FetchOptions{})
	if !errors.Is(err, hub.ErrRevisionNotFound) {
		t.Errorf("unknown commit: %v", err)
	}
}

// TestRetries: 5xx answers are retried with backoff; a renamed repository's
// relative redirect is followed.
func TestRetriesAndRename(t *testing.T) {
	f := newFixture(t)
	c := f.client(t, t.TempDir())
	f.srv.FailNext(http.StatusServiceUnavailable, 3)
	if _, _, err := c.Local(context.Background(), mustRef(t, "hf://google/gemma-3-tiny-it/config.json"), hub.FetchOptions{}); err != nil {
		t.Fatalf("after three 503s: %v", err)
	}
	f.srv.FailNext(http.StatusServiceUnavailable, 10)
	_, err := c.Resolve(context.Background(), mustRef(t, "hf://datasets/malhajar/alpaca-gpt4-tr"))
	if !errors.Is(err, hub.ErrUnreachable) || !strings.Contains(err.Error(), "503") {
		t.Errorf("after ten 503s: %v", err)
	}
	f.srv.ClearFailures()
	f.srv.Rename("model", "google/gemma-3-tiny-it", "google/gemma-3-tiny-it-renamed")
	_, paths, err := f.client(t, t.TempDir()).Local(context.Background(), mustRef(t, "hf://google/gemma-3-tiny-it/config.json"), hub.FetchOptions{})
	if err != nil {
		t.Fatalf("renamed repository: %v", err)
	}
	if b, _ := os.ReadFile(paths[0]); !bytes.Equal(b, f.files["config.json"]) {
		t.Error("renamed repository: wrong content")
	}
}

func TestOffline(t *testing.T) {
	f := newFixture(t)
	cache := t.TempDir()
	c := f.client(t, cache)
	ctx := context.Background()
	ref := mustRef(t, "hf://google/gemma-3-tiny-it")
	if _, _, err := c.Local(ctx, ref, hub.FetchOptions{}); err != nil {
		t.Fatal(err)
	}
	moved := f.model.Commit("main", map[string][]byte{"config.json": []byte(`{"model_type": "gemma3_text", "v": 2}`)})

	t.Setenv("HF_HUB_OFFLINE", "1")
	off := hub.FromEnv()
	if !off.Offline {
		t.Fatal("HF_HUB_OFFLINE=1 not honoured")
	}
	f.srv.ResetRequests()
	r, paths, err := off.Local(ctx, ref, hub.FetchOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if r.Commit != f.commit || !strings.Contains(r.Note, "HF_HUB_OFFLINE") || !strings.Contains(r.Note, "refs/main") {
		t.Errorf("offline: %+v", r)
	}
	if b, _ := os.ReadFile(filepath.Join(paths[0], "config.json")); !bytes.Equal(b, f.files["config.json"]) {
		t.Error("offline read the wrong config")
	}
	if rq := f.srv.Requests(); len(rq) != 0 {
		t.Errorf("offline made requests: %+v", rq)
	}
	_, _, err = off.Local(ctx, mustRef(t, "hf://google/gemma-3-tiny-it/README.md"), hub.FetchOptions{})
	if !errors.Is(err, hub.ErrNotCached) || !strings.Contains(err.Error(), "HF_HUB_OFFLINE is set and") || !strings.Contains(err.Error(), "unset HF_HUB_OFFLINE to download it") {
		t.Errorf("offline, file not cached: %v", err)
	}
	_, err = off.Resolve(ctx, mustRef(t, "hf://datasets/malhajar/alpaca-gpt4-tr"))
	if !errors.Is(err, hub.ErrNotCached) {
		t.Errorf("offline, never fetched: %v", err)
	}

	// Online again, the branch moved.
	t.Setenv("HF_HUB_OFFLINE", "")
	if r, err := c.Resolve(ctx, ref); err != nil || r.Commit != moved {
		t.Errorf("moved branch resolved to %+v (%v), want %s", r, err, moved)
	}

	// The Hub goes away: the cache's refs/ stand in, saying so.
	f.srv.Close()
	r, err = c.Resolve(ctx, ref)
	if err != nil || r.Commit != f.commit || !strings.Contains(r.Note, "cannot reach") {
		t.Errorf("Hub gone: %+v %v", r, err)
	}
	if _, err := c.Fetch(ctx, r, []string{"config.json"}, hub.FetchOptions{}); err != nil {
		t.Errorf("Hub gone, cached file: %v", err)
	}
	// A file not cached says why the Hub could not give it.
	_, err = c.Fetch(ctx, r, []string{"README.md"}, hub.FetchOptions{})
	if !errors.Is(err, hub.ErrNotCached) || !errors.Is(err, hub.ErrUnreachable) || !strings.Contains(err.Error(), "the Hub could not be asked for it: cannot reach") {
		t.Errorf("Hub gone, file not cached: %v", err)
	}
	_, err = c.Resolve(ctx, mustRef(t, "hf://datasets/malhajar/alpaca-gpt4-tr"))
	if !errors.Is(err, hub.ErrUnreachable) || !strings.Contains(err.Error(), "HF_HUB_OFFLINE=1") {
		t.Errorf("Hub gone, nothing cached: %v", err)
	}
}

// TestCacheWithoutTrees: a cache filled by another client (no trees/) is
// read offline from its snapshot folder, blobs checked by their names.
func TestCacheWithoutTrees(t *testing.T) {
	f := newFixture(t)
	cache := t.TempDir()
	c := f.client(t, cache)
	ctx := context.Background()
	if _, _, err := c.Local(ctx, mustRef(t, "hf://datasets/malhajar/alpaca-gpt4-tr/data/*.parquet"), hub.FetchOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(filepath.Join(cache, "datasets--malhajar--alpaca-gpt4-tr", "trees")); err != nil {
		t.Fatal(err)
	}
	t.Setenv("HF_HUB_OFFLINE", "true")
	off := hub.FromEnv()
	_, paths, err := off.Local(ctx, mustRef(t, "hf://datasets/malhajar/alpaca-gpt4-tr/data/train-*.parquet"), hub.FetchOptions{})
	if err != nil || len(paths) != 2 {
		t.Fatalf("%v %v", paths, err)
	}
	blob := filepath.Join(cache, "datasets--malhajar--alpaca-gpt4-tr", "blobs", sha(f.shards["data/train-00001-of-00002.parquet"]))
	os.WriteFile(blob, []byte("not a parquet file"), 0o644)
	_, _, err = off.Local(ctx, mustRef(t, "hf://datasets/malhajar/alpaca-gpt4-tr/data/train-*.parquet"), hub.FetchOptions{})
	if !errors.Is(err, hub.ErrCorrupt) {
		t.Errorf("damaged blob offline: %v", err)
	}
	// A model of which such a cache holds one file: what it lacks is not
	// in the cache, not missing from the repository, and the snapshot is
	// no checkpoint.
	if _, _, err := c.Local(ctx, mustRef(t, "hf://google/gemma-3-tiny-it/config.json"), hub.FetchOptions{}); err != nil {
		t.Fatal(err)
	}
	os.RemoveAll(filepath.Join(cache, "models--google--gemma-3-tiny-it", "trees"))
	for ref, want := range map[string]string{
		"hf://google/gemma-3-tiny-it":                "HF_HUB_OFFLINE is set and hf://google/gemma-3-tiny-it@main/*.safetensors (commit",
		"hf://google/gemma-3-tiny-it/tokenizer.json": "HF_HUB_OFFLINE is set and hf://google/gemma-3-tiny-it@main/tokenizer.json (commit",
	} {
		if _, _, err := off.Local(ctx, mustRef(t, ref), hub.FetchOptions{}); !errors.Is(err, hub.ErrNotCached) || !strings.Contains(err.Error(), want) {
			t.Errorf("%s offline from a partial snapshot: %v, want %q", ref, err, want)
		}
	}
}

// TestEndpointNotAURL: an HF_ENDPOINT without its scheme is said to be
// mistyped, not taken for a Hub that cannot be reached.
func TestEndpointNotAURL(t *testing.T) {
	for _, endpoint := range []string{"127.0.0.1:8080", "htp://mirror.example"} {
		c := &hub.Client{Endpoint: endpoint, CacheDir: t.TempDir(), HTTP: http.DefaultClient}
		_, err := c.Resolve(context.Background(), mustRef(t, "hf://google/gemma-3-tiny-it"))
		if err == nil || !strings.Contains(err.Error(), "(HF_ENDPOINT) is not an http:// or https:// URL") {
			t.Errorf("HF_ENDPOINT %s: %v", endpoint, err)
		}
	}
}

func TestFromEnv(t *testing.T) {
	home := t.TempDir()
	for _, v := range []string{"HF_ENDPOINT", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "XDG_CACHE_HOME"} {
		t.Setenv(v, "")
	}
	t.Setenv("HOME", home)
	t.Setenv("HF_HOME", "")
	c := hub.FromEnv()
	if c.CacheDir != filepath.Join(home, ".cache", "huggingface", "hub") || c.Endpoint != hub.DefaultEndpoint || c.Token != "" || c.Offline {
		t.Errorf("defaults: %+v", c)
	}
	// $XDG_CACHE_HOME as huggingface_hub takes it, relative too.
	t.Setenv("XDG_CACHE_HOME", "rel-cache")
	if c := hub.FromEnv(); c.CacheDir != filepath.Join("rel-cache", "huggingface", "hub") {
		t.Errorf("relative XDG_CACHE_HOME: %s", c.CacheDir)
	}
	t.Setenv("XDG_CACHE_HOME", "")
	t.Setenv("HF_HOME", filepath.Join(home, "hf"))
	os.MkdirAll(filepath.Join(home, "hf"), 0o755)
	os.WriteFile(filepath.Join(home, "hf", "token"), []byte("hf_fromfile\n"), 0o600)
	t.Setenv("HF_ENDPOINT", "http://mirror.example/")
	t.Setenv("TRANSFORMERS_OFFLINE", "yes")
	c = hub.FromEnv()
	if c.CacheDir != filepath.Join(home, "hf", "hub") || c.Token != "hf_fromfile" || c.Endpoint != "http://mirror.example" || !c.Offline {
		t.Errorf("HF_HOME: %+v", c)
	}
	t.Setenv("HF_TOKEN", "hf_env")
	t.Setenv("HF_HUB_CACHE", "~/elsewhere")
	c = hub.FromEnv()
	if c.Token != "hf_env" || c.CacheDir != filepath.Join(home, "elsewhere") {
		t.Errorf("HF_TOKEN, HF_HUB_CACHE: %+v", c)
	}
}

// TestStorageRefusal: storage that refuses a download resumed later (its
// signed address expired) gets a new address from the Hub, and the bytes
// already there are kept; refused again, the error names the file, keeps
// the bytes and does not print the signature.
func TestStorageRefusal(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	ref := mustRef(t, "hf://google/gemma-3-tiny-it/model.safetensors")
	weights := f.files["model.safetensors"]
	// cut leaves a first run's 100,000 bytes in the cache, as a run that
	// lost its connection does.
	cut := func() (*hub.Client, string) {
		cache := t.TempDir()
		c := f.client(t, cache)
		c.Retries = 0
		f.srv.CutNext(100_000)
		if _, _, err := c.Local(ctx, ref, hub.FetchOptions{}); !errors.Is(err, hub.ErrUnreachable) {
			t.Fatalf("cut download with no retries: %v", err)
		}
		return c, filepath.Join(cache, "models--google--gemma-3-tiny-it", "blobs", sha(weights)+".incomplete")
	}

	c, _ := cut()
	f.srv.FailStorageNext(http.StatusForbidden, 1)
	f.srv.ResetRequests()
	var last, total int64
	_, paths, err := c.Local(ctx, ref, hub.FetchOptions{Progress: func(d, tot int64) { last, total = d, tot }})
	if err != nil {
		t.Fatal(err)
	}
	if last != int64(len(weights)) || total != int64(len(weights)) {
		t.Errorf("progress ended at %d of %d, want %d of it", last, total, len(weights))
	}
	if b, _ := os.ReadFile(paths[0]); !bytes.Equal(b, weights) {
		t.Fatal("the download differs")
	}
	var asked []string
	for _, r := range f.srv.Requests() {
		asked = append(asked, fmt.Sprintf("%s %s %s %d", r.Method, r.Host, r.Range, r.Status))
	}
	if want := "GET hub  200 HEAD hub  302 GET storage bytes=100000- 403 HEAD hub  302 GET storage bytes=100000- 206"; strings.Join(asked, " ") != want {
		t.Errorf("requests %q, want %q", asked, want)
	}

	c, partial := cut()
	f.srv.FailStorageNext(http.StatusForbidden, 10)
	_, _, err = c.Local(ctx, ref, hub.FetchOptions{})
	if !errors.Is(err, hub.ErrRefused) || !strings.Contains(err.Error(), "google/gemma-3-tiny-it@main/model.safetensors") || strings.Contains(err.Error(), "sig=") {
		t.Errorf("refused again: %v", err)
	}
	if fi, err := os.Stat(partial); err != nil || fi.Size() != 100_000 {
		t.Errorf("the bytes so far: %v %v", fi, err)
	}
	f.srv.ClearFailures()
}

// TestDiskFull: a download that cannot be written stops at once, saying
// so, instead of retrying and blaming the network.
func TestDiskFull(t *testing.T) {
	if _, err := os.Stat("/dev/full"); err != nil {
		t.Skip("no /dev/full")
	}
	f := newFixture(t)
	cache := t.TempDir()
	c := f.client(t, cache)
	c.Retries = 3
	c.Backoff, c.MaxBackoff = time.Second, time.Second
	weights := f.files["model.safetensors"]
	blobs := filepath.Join(cache, "models--google--gemma-3-tiny-it", "blobs")
	os.MkdirAll(blobs, 0o755)
	if err := os.Symlink("/dev/full", filepath.Join(blobs, sha(weights)+".incomplete")); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	_, _, err := c.Local(context.Background(), mustRef(t, "hf://google/gemma-3-tiny-it/model.safetensors"), hub.FetchOptions{})
	if err == nil || !errors.Is(err, syscall.ENOSPC) || !strings.Contains(err.Error(), "HF_HUB_CACHE") || errors.Is(err, hub.ErrUnreachable) {
		t.Errorf("disk full: %v", err)
	}
	if d := time.Since(start); d > 900*time.Millisecond {
		t.Errorf("took %v: retried", d)
	}
}

// TestCheckingCachedFilesSaid: files taken from the cache are hashed
// first, which takes seconds for a large model; that is said, not silent.
func TestCheckingCachedFilesSaid(t *testing.T) {
	f := newFixture(t)
	c := f.client(t, t.TempDir())
	ctx := context.Background()
	ref := mustRef(t, "hf://google/gemma-3-tiny-it")
	if _, _, err := c.Local(ctx, ref, hub.FetchOptions{}); err != nil {
		t.Fatal(err)
	}
	defer hub.SetCheckNoteBytes(100_000)()
	var logs bytes.Buffer
	if _, _, err := c.Local(ctx, ref, hub.FetchOptions{Log: slog.New(slog.NewTextHandler(&logs, nil))}); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(logs.String(), `msg="checking the files already in the Hugging Face cache" repo=hf://google/gemma-3-tiny-it@main`) {
		t.Errorf("log: %s", logs.String())
	}
}

// failStorage is a transport whose connections to the storage host fail.
type failStorage struct {
	host string
	next http.RoundTripper
}

func (f failStorage) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.URL.Host == f.host {
		return nil, errors.New("connection reset by peer")
	}
	return f.next.RoundTrip(req)
}

// TestStorageUnreachable: a storage host that cannot be reached is said
// without the signature of its address.
func TestStorageUnreachable(t *testing.T) {
	f := newFixture(t)
	c := f.client(t, t.TempDir())
	storage, err := url.Parse(f.srv.StorageURL)
	if err != nil {
		t.Fatal(err)
	}
	next := c.HTTP.Transport
	if next == nil {
		next = http.DefaultTransport
	}
	c.HTTP.Transport = failStorage{host: storage.Host, next: next}
	_, _, err = c.Local(context.Background(), mustRef(t, "hf://google/gemma-3-tiny-it/model.safetensors"), hub.FetchOptions{})
	if err == nil || !strings.Contains(err.Error(), "connection reset by peer") || strings.Contains(err.Error(), "sig=") {
		t.Errorf("storage unreachable: %v", err)
	}
}
