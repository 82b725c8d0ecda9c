package stages

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/apache/arrow-go/v18/arrow"

	"gemmaft/hub/hubtest"
	"gemmaft/internal/testenv"
	"gemmaft/pipeline"
	"gemmaft/trainer"
)

// hubFixture is a test Hub holding a Turkish Alpaca dataset in two Parquet
// shards and a tiny Gemma 3 checkpoint with the real tokenizer, and the
// environment pointing the stages at it with an empty cache.
type hubFixture struct {
	srv   *hubtest.Server
	data  *hubtest.Repo
	model *hubtest.Repo
	cache string
	rows  int
}

func newHubFixture(t *testing.T) *hubFixture {
	t.Helper()
	f := &hubFixture{srv: hubtest.New(), cache: filepath.Join(t.TempDir(), "hf")}
	t.Cleanup(f.srv.Close)
	t.Setenv("HF_ENDPOINT", f.srv.URL)
	t.Setenv("HF_HUB_CACHE", f.cache)
	t.Setenv("HF_HOME", t.TempDir())
	t.Setenv("HF_TOKEN", "")
	t.Setenv("HF_HUB_OFFLINE", "")

	recs := demoRecords(t)[:30]
	shards := map[string][]byte{"README.md": []byte("---\nlanguage: [tr]\n---\n")}
	for i := range 2 {
		var rows [][]string
		for _, r := range recs[i*15 : (i+1)*15] {
			rows = append(rows, []string{r.Instruction, r.Input, r.Output})
		}
		shards[fmt.Sprintf("data/train-%05d-of-00002.parquet", i)] = parquetBytes(t, stringBatch([]string{"instruction", "input", "output"}, rows...))
	}
	f.rows = 30
	f.data = f.srv.AddRepo("dataset", "malhajar/alpaca-gpt4-tr")
	f.data.Commit("main", shards)

	dir := t.TempDir()
	cfg, _ := trainer.Preset("tiny")
	if err := trainer.WriteRandomCheckpoint(dir, cfg, trainer.InitOptions{Seed: 7, Std: 0.3}); err != nil {
		t.Fatal(err)
	}
	files := map[string][]byte{}
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			b, _ := os.ReadFile(p)
			files[filepath.Base(p)] = b
		}
		return nil
	})
	for _, n := range []string{"tokenizer.json", "tokenizer_config.json"} {
		b, err := os.ReadFile(testenv.GemmaFile(t, n))
		if err != nil {
			t.Fatal(err)
		}
		files[n] = b
	}
	f.model = f.srv.AddRepo("model", "google/gemma-3-tiny-it")
	f.model.Commit("main", files)
	return f
}

func parquetBytes(t *testing.T, rec arrow.RecordBatch) []byte {
	t.Helper()
	p := filepath.Join(t.TempDir(), "x.parquet")
	writeParquet(t, p, rec)
	rec.Release()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

const hubSpec = `name: hub
stages:
  alpaca: {kind: parquet, with: {paths: ["hf://datasets/malhajar/alpaca-gpt4-tr/data/train-*.parquet"]}}
  chat: {kind: chat_template, needs: [alpaca]}
  tokens: {kind: tokenize, needs: [chat], with: {tokenizer: "hf://google/gemma-3-tiny-it/tokenizer.json"}}
  pack: {kind: pack, needs: [tokens], with: {seq_len: 128}}
  adapter:
    kind: qlora
    needs: [pack]
    with: {model: "hf://google/gemma-3-tiny-it", r: 4, alpha: 8, batch_size: 1, grad_accum: 1,
           max_steps: 2, log_every: 1, backend: cpu}
`

func stageRecord(t *testing.T, rec *pipeline.RunRecord, name string) pipeline.StageRecord {
	t.Helper()
	for _, s := range rec.Stages {
		if s.Name == name {
			return s
		}
	}
	t.Fatalf("no stage %s", name)
	return pipeline.StageRecord{}
}

// TestHubDAG: a DAG whose data, tokenizer and model are hf:// references
// downloads them into the Hugging Face cache once; a second run asks the
// Hub only which commit each branch names; a run offline (HF_HUB_OFFLINE,
// or the Hub gone) finds everything cached; a branch that moves changes
// the keys of what reads it, and the plan says it moved.
func TestHubDAG(t *testing.T) {
	f := newHubFixture(t)
	r := newTestRun(t)
	spec := r.spec(hubSpec)

	rec, err := r.run(spec, pipeline.Options{})
	if err != nil {
		t.Fatal(err)
	}
	dcommit, mcommit := f.data.Head("main"), f.model.Head("main")
	al := stageRecord(t, rec, "alpaca")
	if al.Rows != int64(f.rows) || len(al.Refs) != 1 || al.Refs[0].Name != "hf://datasets/malhajar/alpaca-gpt4-tr@main" || al.Refs[0].Revision != dcommit {
		t.Fatalf("alpaca: rows %d, refs %+v", al.Rows, al.Refs)
	}
	if len(al.Files) != 0 {
		t.Errorf("hf:// files are keyed by their commit, not hashed: %+v", al.Files)
	}
	for _, name := range []string{"tokens", "adapter"} {
		if s := stageRecord(t, rec, name); len(s.Refs) != 1 || s.Refs[0].Revision != mcommit || s.State != "computed" {
			t.Errorf("%s: %s refs %+v", name, s.State, s.Refs)
		}
	}
	// The adapter names its base as AutoPeftModelForCausalLM loads it: the
	// repository id at the commit training read, not the hf:// reference.
	var ac struct {
		Base     string  `json:"base_model_name_or_path"`
		Revision *string `json:"revision"`
	}
	data, err := os.ReadFile(filepath.Join(r.store.EntryDir(stageRecord(t, rec, "adapter").Key), "adapter", "adapter_config.json"))
	if err := errors.Join(err, json.Unmarshal(data, &ac)); err != nil || ac.Base != "google/gemma-3-tiny-it" || ac.Revision == nil || *ac.Revision != mcommit {
		t.Errorf("adapter_config.json names its base %q at %v, want google/gemma-3-tiny-it at %s (%v)", ac.Base, ac.Revision, mcommit, err)
	}
	snap := filepath.Join(f.cache, "datasets--malhajar--alpaca-gpt4-tr", "snapshots", dcommit, "data", "train-00001-of-00002.parquet")
	if _, err := os.Stat(snap); err != nil {
		t.Errorf("the shard is not in the Hugging Face cache: %v", err)
	}
	if _, err := os.Stat(filepath.Join(f.cache, "models--google--gemma-3-tiny-it", "snapshots", mcommit, "model.safetensors")); err != nil {
		t.Errorf("the checkpoint is not in the Hugging Face cache: %v", err)
	}

	// Again, online: cached, and the Hub is asked nothing but the commits.
	f.srv.ResetRequests()
	rec, err = r.run(spec, pipeline.Options{})
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range rec.Stages {
		if s.State != "cached" {
			t.Errorf("second run: %s %s (%s)", s.Name, s.State, s.Reason)
		}
	}
	for _, q := range f.srv.Requests() {
		if !strings.Contains(q.Path, "/revision/main") {
			t.Errorf("second run asked %s %s", q.Method, q.Path)
		}
	}

	// Offline: no request at all, everything cached, and the run says how
	// the branches were resolved.
	t.Setenv("HF_HUB_OFFLINE", "1")
	f.srv.ResetRequests()
	rec, err = r.run(spec, pipeline.Options{})
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range rec.Stages {
		if s.State != "cached" {
			t.Errorf("offline: %s %s (%s)", s.Name, s.State, s.Reason)
		}
	}
	if q := f.srv.Requests(); len(q) != 0 {
		t.Errorf("offline run made requests: %+v", q)
	}
	if n := stageRecord(t, rec, "alpaca").Refs[0].Note; !strings.Contains(n, "HF_HUB_OFFLINE") {
		t.Errorf("offline note %q", n)
	}
	t.Setenv("HF_HUB_OFFLINE", "")

	// The dataset's main moves: its stages recompute (the plan says why),
	// the tokenizer and model, at the same commit, keep their keys.
	shard := parquetBytes(t, stringBatch([]string{"instruction", "input", "output"}, []string{"Merhaba de.", "", "Merhaba!"}))
	moved := f.data.Commit("main", map[string][]byte{"data/train-00002-of-00003.parquet": shard})
	dag, err := loadSpec(spec, Registry())
	if err != nil {
		t.Fatal(err)
	}
	plan, err := r.store.Plan(dag, pipeline.Options{Until: "tokens"})
	if err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf("hf://datasets/malhajar/alpaca-gpt4-tr@main moved from %s to %s", dcommit[:7], moved[:7])
	if st := plan.Step("alpaca"); !st.Compute || st.Reason != want {
		t.Errorf("alpaca after the move: compute %v, %q; want %q", st.Compute, st.Reason, want)
	}
	rec, err = r.run(spec, pipeline.Options{Until: "tokens"})
	if err != nil {
		t.Fatal(err)
	}
	if s := stageRecord(t, rec, "alpaca"); s.Rows != int64(f.rows+1) || s.State != "computed" {
		t.Errorf("after the move: alpaca %s with %d rows", s.State, s.Rows)
	}

	// The Hub goes away: the cache's refs/ stand in, and the run says so.
	f.srv.Close()
	rec, err = r.run(spec, pipeline.Options{Until: "tokens"})
	if err != nil {
		t.Fatal(err)
	}
	if s := stageRecord(t, rec, "alpaca"); s.State != "cached" || !strings.Contains(s.Refs[0].Note, "cannot reach") {
		t.Errorf("Hub gone: alpaca %s, note %q", s.State, s.Refs[0].Note)
	}
}

// TestHubErrors: a bad reference fails the plan, before anything runs,
// with the Hub's reason and what to do.
func TestHubErrors(t *testing.T) {
	f := newHubFixture(t)
	r := newTestRun(t)
	for _, c := range []struct{ spec, want string }{
		{strings.Replace(hubSpec, "malhajar/alpaca-gpt4-tr/", "malhajar/alpaca-gpt4-trr/", 1), "no dataset repository malhajar/alpaca-gpt4-trr"},
		{strings.Replace(hubSpec, "train-*.parquet", "valid-*.parquet", 1), `matches "data/valid-*.parquet"`},
		{strings.Replace(hubSpec, "gemma-3-tiny-it/tokenizer.json", "gemma-3-tiny-it@v2/tokenizer.json", 1), `has no revision "v2"`},
		{strings.Replace(hubSpec, "hf://google/gemma-3-tiny-it\"", "hf://google/gemma-3-tiny-it/config.json\"", 1), "not a checkpoint"},
		{strings.Replace(hubSpec, "/data/train-*.parquet", "", 1), "names no file"},
	} {
		spec := r.spec(c.spec)
		dag, err := loadSpec(spec, Registry())
		if err == nil {
			_, err = r.store.Plan(dag, pipeline.Options{})
		}
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("want %q, got %v", c.want, err)
		}
	}
	// Gated: the plan fails at once, saying how to get in.
	f.model.SetGated(true)
	dag, err := loadSpec(r.spec(hubSpec), Registry())
	if err != nil {
		t.Fatal(err)
	}
	_, err = r.store.Plan(dag, pipeline.Options{})
	if err == nil || !strings.Contains(err.Error(), "is gated: accept its license at "+f.srv.URL+"/google/gemma-3-tiny-it") {
		t.Errorf("gated: %v", err)
	}
	if n := r.entries(); n != 0 {
		t.Errorf("%d entries after failed plans", n)
	}
}

type alpacaRecord struct{ Instruction, Input, Output string }

// demoRecords reads the Turkish demo records the repository embeds.
func demoRecords(t *testing.T) []alpacaRecord {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(testenv.RepoRoot(t), "dataset", "demo", "alpaca-tr-demo.jsonl"))
	if err != nil {
		t.Fatal(err)
	}
	var out []alpacaRecord
	for _, line := range bytes.Split(bytes.TrimSpace(data), []byte("\n")) {
		var r alpacaRecord
		if err := json.Unmarshal(line, &r); err != nil {
			t.Fatal(err)
		}
		out = append(out, r)
	}
	return out
}
