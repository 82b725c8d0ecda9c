package hub_test

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"testing"

	"gemmaft/hub"
	"gemmaft/internal/testenv"
)

// jsClient runs the JavaScript Hub client (@huggingface/hub) and decodes
// what it prints.
func jsClient(t *testing.T, out any, args ...string) {
	t.Helper()
	script := testenv.HubClient(t)
	cmd := exec.Command("node", append([]string{script}, args...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	data, err := cmd.Output()
	if err != nil {
		t.Fatalf("node %s %v: %v\n%s", filepath.Base(script), args, err, stderr.String())
	}
	if err := json.Unmarshal(data, out); err != nil {
		t.Fatalf("%s: %v", data, err)
	}
}

type jsScan struct {
	Repos []struct {
		ID, Type  string
		Revisions []struct {
			Commit string
			Refs   []string
			Files  []struct {
				Path string
				Size int64
				Blob string
			}
		}
	}
	Warnings []string
}

// TestJSClientReadsOurCache: what our client put in the cache, the
// JavaScript client finds there: the same repositories, commit, ref, files
// and sizes, with no warning; asked for a file at the commit, it takes the
// cached one without asking the Hub.
func TestJSClientReadsOurCache(t *testing.T) {
	testenv.HubClient(t)
	f := newFixture(t)
	cache := t.TempDir()
	c := f.client(t, cache)
	ctx := context.Background()
	if _, _, err := c.Local(ctx, mustRef(t, "hf://google/gemma-3-tiny-it"), hub.FetchOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, _, err := c.Local(ctx, mustRef(t, "hf://datasets/malhajar/alpaca-gpt4-tr/*"), hub.FetchOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, _, err := c.Local(ctx, mustRef(t, "hf://datasets/malhajar/alpaca-gpt4-tr/data/*.parquet"), hub.FetchOptions{}); err != nil {
		t.Fatal(err)
	}
	var scan jsScan
	jsClient(t, &scan, "scan", cache)
	if len(scan.Warnings) != 0 || len(scan.Repos) != 2 {
		t.Fatalf("scan: %+v", scan)
	}
	want := map[string]map[string][]byte{
		"model/google/gemma-3-tiny-it":    {},
		"dataset/malhajar/alpaca-gpt4-tr": {},
	}
	for _, p := range []string{"config.json", "tokenizer_config.json", "tokenizer.json", "model.safetensors", "generation_config.json", "chat_template.jinja"} {
		want["model/google/gemma-3-tiny-it"][p] = f.files[p]
	}
	// The JavaScript client's scan lists a snapshot's top level only.
	want["dataset/malhajar/alpaca-gpt4-tr"]["README.md"] = f.shards["README.md"]
	commits := map[string]string{"model/google/gemma-3-tiny-it": f.commit, "dataset/malhajar/alpaca-gpt4-tr": f.dcommit}
	for _, r := range scan.Repos {
		k := r.Type + "/" + r.ID
		files, ok := want[k]
		if !ok || len(r.Revisions) != 1 {
			t.Errorf("scan found %s with %d revisions", k, len(r.Revisions))
			continue
		}
		v := r.Revisions[0]
		if v.Commit != commits[k] || len(v.Refs) != 1 || v.Refs[0] != "main" {
			t.Errorf("%s: commit %s refs %v, want %s [main]", k, v.Commit, v.Refs, commits[k])
		}
		if len(v.Files) != len(files) {
			t.Errorf("%s: %d files, want %d", k, len(v.Files), len(files))
		}
		for _, fl := range v.Files {
			if b, ok := files[filepath.ToSlash(fl.Path)]; !ok || int64(len(b)) != fl.Size {
				t.Errorf("%s: file %s of %d bytes", k, fl.Path, fl.Size)
			}
		}
	}
	f.srv.ResetRequests()
	var got struct{ Path string }
	jsClient(t, &got, "file", f.srv.URL, cache, "model/google/gemma-3-tiny-it", f.commit, "tokenizer.json")
	if want := filepath.Join(cache, "models--google--gemma-3-tiny-it", "snapshots", f.commit, "tokenizer.json"); got.Path != want {
		t.Errorf("the JavaScript client's tokenizer.json: %s, want %s", got.Path, want)
	}
	shard := "data/train-00001-of-00002.parquet"
	jsClient(t, &got, "file", f.srv.URL, cache, "dataset/malhajar/alpaca-gpt4-tr", f.dcommit, shard)
	if want := filepath.Join(cache, "datasets--malhajar--alpaca-gpt4-tr", "snapshots", f.dcommit, "data", "train-00001-of-00002.parquet"); got.Path != want {
		t.Errorf("the JavaScript client's %s: %s, want %s", shard, got.Path, want)
	}
	if b, _ := os.ReadFile(got.Path); !bytes.Equal(b, f.shards[shard]) {
		t.Errorf("%s differs", shard)
	}
	if rq := f.srv.Requests(); len(rq) != 0 {
		t.Errorf("the JavaScript client asked the Hub for cached files: %+v", rq)
	}
}

// TestOurClientReadsJSCache: what the JavaScript client downloaded from
// the same Hub, our client uses offline: the commit its ref names, every
// file checked against its hash.
func TestOurClientReadsJSCache(t *testing.T) {
	testenv.HubClient(t)
	f := newFixture(t)
	cache := t.TempDir()
	var snap struct{ Path string }
	jsClient(t, &snap, "snapshot", f.srv.URL, cache, "model/google/gemma-3-tiny-it", "main")
	jsClient(t, &snap, "snapshot", f.srv.URL, cache, "dataset/malhajar/alpaca-gpt4-tr", "main")
	f.srv.Close()

	t.Setenv("HF_HUB_CACHE", cache)
	t.Setenv("HF_HUB_OFFLINE", "1")
	t.Setenv("HF_ENDPOINT", "http://127.0.0.1:1") // nothing may be asked
	c := hub.FromEnv()
	ctx := context.Background()
	r, paths, err := c.Local(ctx, mustRef(t, "hf://google/gemma-3-tiny-it"), hub.FetchOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if r.Commit != f.commit {
		t.Errorf("commit %s, want %s", r.Commit, f.commit)
	}
	for _, p := range []string{"config.json", "tokenizer.json", "model.safetensors", "chat_template.jinja"} {
		if b, err := os.ReadFile(filepath.Join(paths[0], p)); err != nil || !bytes.Equal(b, f.files[p]) {
			t.Errorf("%s: %v", p, err)
		}
	}
	r, paths, err = c.Local(ctx, mustRef(t, "hf://datasets/malhajar/alpaca-gpt4-tr/data/train-*.parquet"), hub.FetchOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if r.Commit != f.dcommit || len(paths) != 2 {
		t.Fatalf("dataset: %s %v", r.Commit, paths)
	}
	sort.Strings(paths)
	for i, name := range []string{"data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"} {
		if b, _ := os.ReadFile(paths[i]); !bytes.Equal(b, f.shards[name]) {
			t.Errorf("%s differs", name)
		}
	}
}
