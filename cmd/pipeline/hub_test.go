package main

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"gemmaft/hub/hubtest"
	"gemmaft/internal/testenv"
	"gemmaft/trainer"
)

// testHub starts a test Hub and points the environment at it, with the
// Hugging Face cache (hf/) and HF_HOME in a new folder, which it returns.
func testHub(t *testing.T) (*hubtest.Server, string) {
	srv := hubtest.New()
	t.Cleanup(srv.Close)
	dir := t.TempDir()
	t.Setenv("HF_ENDPOINT", srv.URL)
	t.Setenv("HF_HUB_CACHE", filepath.Join(dir, "hf"))
	t.Setenv("HF_HOME", filepath.Join(dir, "hfhome"))
	t.Setenv("HF_TOKEN", "")
	t.Setenv("HF_HUB_OFFLINE", "")
	return srv, dir
}

// TestHubCLI: commands take hf:// references: fetch fills the Hugging Face
// cache, tokenize reads a tokenizer from the Hub, a spec of hf://
// references runs, its plan says when a branch moved, and with
// HF_HUB_OFFLINE=1 a cached run needs no Hub; a gated model's error says
// what to do.
func TestHubCLI(t *testing.T) {
	srv, dir := testHub(t)
	cache := filepath.Join(dir, "hf")

	tokFiles := map[string][]byte{}
	for _, n := range []string{"tokenizer.json", "tokenizer_config.json"} {
		b, err := os.ReadFile(testenv.GemmaFile(t, n))
		if err != nil {
			t.Fatal(err)
		}
		tokFiles[n] = b
	}
	model := srv.AddRepo("model", "google/gemma-3-tok")
	mcommit := model.Commit("main", tokFiles)
	data := srv.AddRepo("dataset", "acme/tr-mini")
	data.Commit("main", map[string][]byte{"train.jsonl": []byte(sampleJSONL)})

	res := runCLI(t, dir, "fetch", "--json", "hf://google/gemma-3-tok")
	if res.code != 0 {
		t.Fatalf("fetch: %d %s", res.code, res.stderr)
	}
	var fetched []struct {
		Commit string
		Paths  []string
	}
	if err := json.Unmarshal([]byte(res.stdout), &fetched); err != nil || len(fetched) != 1 || fetched[0].Commit != mcommit {
		t.Fatalf("fetch printed %s (%v)", res.stdout, err)
	}
	if want := filepath.Join(cache, "models--google--gemma-3-tok", "snapshots", mcommit); fetched[0].Paths[0] != want {
		t.Errorf("fetch path %s, want %s", fetched[0].Paths[0], want)
	}

	in := filepath.Join(dir, "in.jsonl")
	writeFile(t, in, `{"text": "Merhaba dünya"}`+"\n")
	local := runCLI(t, dir, "tokenize", "--tokenizer", testenv.GemmaFile(t, "tokenizer.json"), "--in", in)
	remote := runCLI(t, dir, "tokenize", "--tokenizer", "hf://google/gemma-3-tok", "--in", in)
	if local.code != 0 || remote.code != 0 || local.stdout != remote.stdout {
		t.Errorf("tokenize from the Hub: %d %q %s; local %q", remote.code, remote.stdout, remote.stderr, local.stdout)
	}
	// A glob names several files: refused before anything downloads.
	srv.ResetRequests()
	if res := runCLI(t, dir, "tokenize", "--tokenizer", "hf://google/gemma-3-tok/*.json", "--in", in); res.code != 2 || !strings.Contains(res.stderr, "names several files; name one") || len(srv.Requests()) != 0 {
		t.Errorf("a glob for --tokenizer: %d %s, %d requests", res.code, res.stderr, len(srv.Requests()))
	}

	spec := filepath.Join(dir, "hub.yaml")
	writeFile(t, spec, `name: hub
stages:
  alpaca: {kind: jsonl, with: {paths: ["hf://datasets/acme/tr-mini/*.jsonl"]}}
  chat: {kind: chat_template, needs: [alpaca]}
  tokens: {kind: tokenize, needs: [chat], with: {tokenizer: "hf://google/gemma-3-tok@main/tokenizer.json"}}
`)
	if res := runCLI(t, dir, "run", spec); res.code != 0 {
		t.Fatalf("run: %d %s", res.code, res.stderr)
	}
	// The rows decode with the tokenizer that made them, at its commit.
	if res := runCLI(t, dir, "inspect", spec, "tokens", "--decode", "--rows", "1"); res.code != 0 || !strings.Contains(res.stdout, "⟦Ankara.<end_of_turn>⟧") {
		t.Errorf("inspect --decode of rows an hf:// tokenizer made: %d\n%s%s", res.code, res.stdout, res.stderr)
	}
	old := data.Head("main")
	moved := data.Commit("main", map[string][]byte{"train.jsonl": []byte(sampleJSONL + `{"instruction": "Yeni", "input": "", "output": "Evet."}` + "\n")})
	res = runCLI(t, dir, "plan", spec)
	if res.code != 0 || !strings.Contains(res.stdout, "hf://datasets/acme/tr-mini@main moved from "+old[:7]+" to "+moved[:7]) ||
		!strings.Contains(res.stdout, "hf://datasets/acme/tr-mini@main is commit "+moved) {
		t.Errorf("plan after the branch moved:\n%s\n%s", res.stdout, res.stderr)
	}
	if res := runCLI(t, dir, "run", spec); res.code != 0 {
		t.Fatalf("run after the move: %d %s", res.code, res.stderr)
	}

	// What a reference names and the Hub does not have is the spec's error
	// (exit 2, at the parameter), as a missing local file is; a run it
	// stops is recorded as failed.
	good, _ := os.ReadFile(spec)
	for _, c := range []struct{ from, to, want string }{
		{"acme/tr-mini/*.jsonl", "acme/tr-mini/test-*.jsonl", `no file of hf://datasets/acme/tr-mini@main matches "test-*.jsonl"`},
		{"acme/tr-mini/*.jsonl", "acme/tr-nope/*.jsonl", "no dataset repository acme/tr-nope"},
		{"gemma-3-tok@main", "gemma-3-tok@v9", `has no revision "v9"`},
	} {
		writeFile(t, spec, strings.Replace(string(good), c.from, c.to, 1))
		for _, cmd := range []string{"plan", "run"} {
			res := runCLI(t, dir, cmd, spec)
			if res.code != 2 || !strings.Contains(res.stderr, "pipeline: "+spec+":") || !strings.Contains(res.stderr, c.want) {
				t.Errorf("%s with %s: exit %d, want 2 at the spec's line saying %q\n%s", cmd, c.to, res.code, c.want, res.stderr)
			}
		}
		if res := runCLI(t, dir, "status", spec); !strings.Contains(res.stdout, "FAILED: ") || !strings.Contains(res.stdout, c.want) {
			t.Errorf("status after a run with %s:\n%s", c.to, res.stdout)
		}
	}
	writeFile(t, spec, string(good))

	// Offline, and with the Hub gone: everything cached, and said so.
	t.Setenv("HF_HUB_OFFLINE", "1")
	srv.Close()
	res = runCLI(t, dir, "plan", spec)
	if res.code != 0 || strings.Contains(res.stdout, "compute") || !strings.Contains(res.stdout, "note: HF_HUB_OFFLINE is set") {
		t.Errorf("offline plan:\n%s\n%s", res.stdout, res.stderr)
	}
	if res := runCLI(t, dir, "run", spec); res.code != 0 || !strings.Contains(res.stderr, "HF_HUB_OFFLINE is set") {
		t.Errorf("offline run: %d %s", res.code, res.stderr)
	}
	t.Setenv("HF_HUB_OFFLINE", "")
	res = runCLI(t, dir, "run", spec)
	if res.code != 0 || !strings.Contains(res.stderr, "cannot reach") {
		t.Errorf("run with the Hub gone: %d %s", res.code, res.stderr)
	}
	res = runCLI(t, dir, "fetch", "hf://datasets/acme/other")
	if res.code != 1 || !strings.Contains(res.stderr, "cannot reach") || !strings.Contains(res.stderr, "HF_HUB_OFFLINE=1") {
		t.Errorf("fetch with the Hub gone: %d %s", res.code, res.stderr)
	}
}

// TestHubCLIGated: a gated model without a token fails with what to do.
func TestHubCLIGated(t *testing.T) {
	srv, dir := testHub(t)
	gated := srv.AddRepo("model", "google/gemma-3-gated")
	gated.SetGated(true)
	gated.Commit("main", map[string][]byte{"config.json": []byte("{}"), "model.safetensors": []byte("x")})
	res := runCLI(t, dir, "loss", "--model", "hf://google/gemma-3-gated", "--data", "rows.arrow", "--backend", "cpu")
	if res.code != 1 || !strings.Contains(res.stderr, "is gated: accept its license at "+srv.URL+"/google/gemma-3-gated") || !strings.Contains(res.stderr, "HF_TOKEN") {
		t.Errorf("gated: %d %s", res.code, res.stderr)
	}
	res = runCLI(t, dir, "merge", "--model", "hf://google/gemma-3-nope", "--adapter", "a", "--out", filepath.Join(dir, "out"))
	if res.code != 2 || !strings.Contains(res.stderr, "no model repository google/gemma-3-nope") {
		t.Errorf("wrong name: %d %s", res.code, res.stderr)
	}
}

// TestFetchInterrupted: SIGINT during a download exits 130, says that the
// bytes so far are kept, and the next fetch asks only for the rest.
func TestFetchInterrupted(t *testing.T) {
	srv, dir := testHub(t)
	cache := filepath.Join(dir, "hf")
	weights := bytes.Repeat([]byte("gemma3 "), 40_000)
	srv.AddRepo("model", "acme/big").Commit("main", map[string][]byte{"model.safetensors": weights})
	const sent = 100_000
	srv.StallNext(sent)

	cmd, _, stderr := startCLI(t, dir, nil, "fetch", "hf://acme/big/model.safetensors")
	deadline := time.Now().Add(20 * time.Second)
	for {
		parts, _ := filepath.Glob(filepath.Join(cache, "models--acme--big", "blobs", "*.incomplete"))
		if len(parts) == 1 {
			if fi, err := os.Stat(parts[0]); err == nil && fi.Size() == sent {
				break
			}
		}
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			t.Fatalf("the download never reached %d bytes: %s", sent, stderr)
		}
		time.Sleep(10 * time.Millisecond)
	}
	cmd.Process.Signal(syscall.SIGINT)
	if code := exitCode(t, cmd, 10*time.Second); code != 130 || !strings.Contains(stderr.String(), "the bytes downloaded so far are kept") {
		t.Fatalf("interrupted fetch: exit %d\n%s", code, stderr)
	}

	srv.ResetRequests()
	res := runCLI(t, dir, "fetch", "hf://acme/big/model.safetensors")
	if res.code != 0 {
		t.Fatalf("second fetch: %d %s", res.code, res.stderr)
	}
	var ranges []string
	for _, r := range srv.Requests() {
		if r.Host == "storage" {
			ranges = append(ranges, r.Range)
		}
	}
	if want := fmt.Sprintf("bytes=%d-", sent); len(ranges) != 1 || ranges[0] != want {
		t.Errorf("second fetch asked the storage for %q, want [%s]", ranges, want)
	}
}

// TestGGUFAdapterReadsTheBaseShapesOnly: pipeline gguf --adapter with an
// hf:// base fetches its config and weight index, not its weights (a 12B
// base is 24 GB), and writes the file a local base gives; a base of one
// weights file and no index fetches that file, whose header names the
// tensors.
func TestGGUFAdapterReadsTheBaseShapesOnly(t *testing.T) {
	srv, dir := testHub(t)
	model := filepath.Join(dir, "m")
	cfg, _ := trainer.Preset("tiny")
	if err := trainer.WriteRandomCheckpoint(model, cfg, trainer.InitOptions{Seed: 1}); err != nil {
		t.Fatal(err)
	}
	saveAdapter(t, model, filepath.Join(dir, "ad"), "acme/base")
	want := filepath.Join(dir, "local.gguf")
	if r := runCLI(t, dir, "gguf", "--model", "m", "--adapter", "ad", "--out", want, "--name", "ad"); r.code != 0 {
		t.Fatalf("local base: %d %s", r.code, r.stderr)
	}
	read := func(name string) []byte {
		b, err := os.ReadFile(filepath.Join(model, name))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	weights := read("model.safetensors")
	keys, err := safetensorsKeys(weights)
	if err != nil {
		t.Fatal(err)
	}
	index := map[string]any{"metadata": map[string]any{}, "weight_map": keys}
	ib, _ := json.Marshal(index)
	sharded := srv.AddRepo("model", "acme/base")
	sharded.Commit("main", map[string][]byte{"config.json": read("config.json"), "model.safetensors.index.json": ib,
		"model-00001-of-00001.safetensors": weights})
	single := srv.AddRepo("model", "acme/single")
	single.Commit("main", map[string][]byte{"config.json": read("config.json"), "model.safetensors": weights})

	for repo, weightsFile := range map[string]string{"acme/base": "model-00001-of-00001.safetensors", "acme/single": "model.safetensors"} {
		srv.ResetRequests()
		out := filepath.Join(dir, strings.ReplaceAll(repo, "/", "-")+".gguf")
		if r := runCLI(t, dir, "gguf", "--model", "hf://"+repo, "--adapter", "ad", "--out", out, "--name", "ad"); r.code != 0 {
			t.Fatalf("%s: %d %s", repo, r.code, r.stderr)
		}
		fetched := false
		for _, req := range srv.Requests() {
			fetched = fetched || strings.HasSuffix(req.Path, "/"+weightsFile)
		}
		if got, w := readAll(t, out), readAll(t, want); !bytes.Equal(got, w) {
			t.Errorf("%s: another file than the local base's", repo)
		}
		if wantFetch := repo == "acme/single"; fetched != wantFetch {
			t.Errorf("%s: the weights fetched: %v, want %v", repo, fetched, wantFetch)
		}
	}
}

func readAll(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// safetensorsKeys maps each tensor of a safetensors file to the one shard
// of a sharded copy of it.
func safetensorsKeys(b []byte) (map[string]string, error) {
	n := binary.LittleEndian.Uint64(b)
	var h map[string]json.RawMessage
	if err := json.Unmarshal(b[8:8+n], &h); err != nil {
		return nil, err
	}
	keys := map[string]string{}
	for k := range h {
		if k != "__metadata__" {
			keys[k] = "model-00001-of-00001.safetensors"
		}
	}
	return keys, nil
}
