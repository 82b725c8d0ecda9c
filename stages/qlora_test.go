package stages

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"gemmaft/internal/testenv"
	"gemmaft/pipeline"
	"gemmaft/trainer"
)

// TestMain lets a test run a spec in a child process (this binary again,
// with STAGES_TEST_SPEC set), so that it can be killed.
func TestMain(m *testing.M) {
	if spec := os.Getenv("STAGES_TEST_SPEC"); spec != "" {
		st, err := pipeline.OpenStore(os.Getenv("STAGES_TEST_CACHE"))
		if err == nil {
			var dag *pipeline.DAG
			if dag, err = loadSpec(spec, Registry()); err == nil {
				_, err = (&pipeline.Engine{Store: st}).Run(context.Background(), dag, pipeline.Options{})
			}
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// trainSpec is a small QLoRA run on the demo records: a tiny Gemma 3 with
// the real vocabulary, short rows, a few steps, checkpoints every 2 steps.
func trainSpec(t *testing.T, steps int) string {
	tok := testenv.GemmaFile(t, "tokenizer.json")
	demo := filepath.Join(testenv.RepoRoot(t), "dataset", "demo", "alpaca-tr-demo.jsonl")
	return fmt.Sprintf(`name: train
stages:
  alpaca: {kind: jsonl, with: {paths: [%s], limit: 40}}
  chat: {kind: chat_template, needs: [alpaca]}
  tokens: {kind: tokenize, needs: [chat], with: {tokenizer: %s}}
  pack: {kind: pack, needs: [tokens], with: {seq_len: 128}}
  base: {kind: model, with: {preset: tiny, seed: 7, std: 0.3}}
  adapter:
    kind: qlora
    needs: [pack, base]
    with: {r: 4, alpha: 8, batch_size: 1, grad_accum: 2, lr: 1.0e-2, schedule: constant,
           max_steps: %d, log_every: 1, checkpoint_every: 2, backend: cpu}
`, demo, tok, steps)
}

// trainSpecOn is trainSpec training on the checkpoint folder model in
// place of its model stage.
func trainSpecOn(t *testing.T, steps int, model string) string {
	spec := strings.Replace(trainSpec(t, steps), "  base: {kind: model, with: {preset: tiny, seed: 7, std: 0.3}}\n", "", 1)
	return strings.Replace(spec, "needs: [pack, base]\n    with: {", "needs: [pack]\n    with: {model: "+model+", ", 1)
}

type metricLine struct {
	Step     int     `json:"step"`
	Loss     float64 `json:"loss"`
	LR       float64 `json:"lr"`
	GradNorm float64 `json:"grad_norm"`
	Tokens   int64   `json:"tokens"`
}

func readMetrics(t *testing.T, path string) []metricLine {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var out []metricLine
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		var m metricLine
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			t.Fatalf("metrics line %q: %v", sc.Text(), err)
		}
		out = append(out, m)
	}
	return out
}

func adapterEntry(t *testing.T, st *pipeline.Store, spec string) string {
	t.Helper()
	dag, err := loadSpec(spec, Registry())
	if err != nil {
		t.Fatal(err)
	}
	plan, err := st.Plan(dag, pipeline.Options{})
	if err != nil {
		t.Fatal(err)
	}
	s := plan.Step("adapter")
	if s.State != pipeline.Valid {
		t.Fatalf("adapter entry is %v (%v)", s.State, s.Damage)
	}
	return st.EntryDir(s.Key)
}

func TestQLoRAStageTrains(t *testing.T) {
	r := newTestRun(t)
	spec := r.spec(trainSpec(t, 12))
	rec, err := r.run(spec, pipeline.Options{})
	if err != nil {
		t.Fatal(err)
	}
	dir := adapterEntry(t, r.store, spec)
	for _, f := range []string{"adapter/adapter_model.safetensors", "adapter/adapter_config.json", "metrics.jsonl", "loss.svg"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			t.Errorf("entry lacks %s", f)
		}
	}
	var cfg struct {
		R             int      `json:"r"`
		Alpha         float64  `json:"lora_alpha"`
		TargetModules []string `json:"target_modules"`
		PeftType      string   `json:"peft_type"`
	}
	data, _ := os.ReadFile(filepath.Join(dir, "adapter", "adapter_config.json"))
	if err := json.Unmarshal(data, &cfg); err != nil || cfg.R != 4 || cfg.Alpha != 8 || len(cfg.TargetModules) != 7 || cfg.PeftType != "LORA" {
		t.Errorf("adapter_config.json: %s (%v)", data, err)
	}
	m := readMetrics(t, filepath.Join(dir, "metrics.jsonl"))
	if len(m) != 12 {
		t.Fatalf("%d metrics lines, want 12", len(m))
	}
	first := (m[0].Loss + m[1].Loss + m[2].Loss) / 3
	last := (m[9].Loss + m[10].Loss + m[11].Loss) / 3
	if !(last < first) {
		t.Errorf("loss did not fall: first steps %.3f, last steps %.3f", first, last)
	}
	if _, err := os.Stat(filepath.Join(r.store.Root, "scratch")); err == nil {
		if ents, _ := os.ReadDir(filepath.Join(r.store.Root, "scratch")); len(ents) != 0 {
			t.Errorf("checkpoints left in scratch after commit")
		}
	}
	rec, err = r.run(spec, pipeline.Options{})
	if err != nil || rec.Stages[5].State != "cached" {
		t.Fatalf("second run: %v, adapter %s", err, rec.Stages[5].State)
	}
}

// TestQLoRARSLoRA: rslora: true trains a rank-stabilised adapter, and its
// adapter_config.json says so, as PEFT reads it (use_rslora: its scale is
// alpha / √r; trainer's parity case rslora_gqa holds the numbers to PEFT's).
func TestQLoRARSLoRA(t *testing.T) {
	r := newTestRun(t)
	spec := r.spec(strings.Replace(trainSpec(t, 1), "backend: cpu}", "backend: cpu, rslora: true}", 1))
	if _, err := r.run(spec, pipeline.Options{}); err != nil {
		t.Fatal(err)
	}
	var cfg struct {
		UseRSLora bool `json:"use_rslora"`
	}
	data, _ := os.ReadFile(filepath.Join(adapterEntry(t, r.store, spec), "adapter", "adapter_config.json"))
	if err := json.Unmarshal(data, &cfg); err != nil || !cfg.UseRSLora {
		t.Errorf("adapter_config.json: %s (%v)", data, err)
	}
}

// TestQLoRAEarlyStopping: early_stopping_patience ends training and the
// manifest says where and which step's adapter the entry holds.
func TestQLoRAEarlyStopping(t *testing.T) {
	r := newTestRun(t)
	spec := r.spec(strings.Replace(trainSpec(t, 6), "backend: cpu}",
		"backend: cpu, eval_fraction: 0.2, eval_every: 1, early_stopping_patience: 1, early_stopping_threshold: 100}", 1))
	rec, err := r.run(spec, pipeline.Options{})
	if err != nil {
		t.Fatal(err)
	}
	st := stageRecord(t, rec, "adapter").Stats
	if b := fmt.Sprint(st["best_step"]); fmt.Sprint(st["steps"], st["stopped_early"]) != "2 true" || b != "1" && b != "2" {
		t.Errorf("stats %v", st)
	}
	// Nothing held out: said by the stage, before the model loads.
	spec = r.spec(strings.Replace(trainSpec(t, 6), "backend: cpu}", "backend: cpu, eval_every: 1, early_stopping_patience: 1}", 1))
	if _, err := r.run(spec, pipeline.Options{}); err == nil || !strings.Contains(err.Error(), "early_stopping_patience: nothing is held out to evaluate; set eval_fraction") {
		t.Errorf("early stopping without held-out rows: %v", err)
	}
}

// TestQLoRAResumesAfterKill kills the training run at random moments and
// checks that the finished adapter and metrics are those of a run that was
// never interrupted.
func TestQLoRAResumesAfterKill(t *testing.T) {
	if testing.Short() {
		t.Skip("trains several times")
	}
	r := newTestRun(t)
	spec := r.spec(trainSpec(t, 8))
	child := func(cache string) *exec.Cmd {
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), "STAGES_TEST_SPEC="+spec, "STAGES_TEST_CACHE="+cache)
		return cmd
	}
	refCache := filepath.Join(r.dir, "ref")
	start := time.Now()
	if out, err := child(refCache).CombinedOutput(); err != nil {
		t.Fatalf("uninterrupted run: %v\n%s", err, out)
	}
	full := time.Since(start)
	ref, _ := pipeline.OpenStore(refCache)
	refDir := adapterEntry(t, ref, spec)

	// Kill each attempt a moment after it writes a new checkpoint, so every
	// kill lands in training with state to resume from.
	cache := filepath.Join(r.dir, "killed")
	checkpoints := func() int {
		cks, _ := filepath.Glob(filepath.Join(cache, "scratch", "*", "checkpoints", "step-*"))
		return len(cks)
	}
	rng := rand.New(rand.NewPCG(3, 4))
	kills := 0
	for i := 0; i < 3; i++ {
		before := checkpoints()
		cmd := child(cache)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		deadline := time.After(2 * full)
	wait:
		for checkpoints() <= before {
			select {
			case <-done:
				break wait
			case <-deadline:
				break wait
			case <-time.After(20 * time.Millisecond):
			}
		}
		time.Sleep(time.Duration(rng.Int64N(int64(300 * time.Millisecond))))
		cmd.Process.Signal(syscall.SIGKILL)
		<-done
		if checkpoints() > 0 {
			kills++
		}
	}
	if kills == 0 {
		t.Error("no kill landed after a checkpoint; the test proves nothing")
	}
	if out, err := child(cache).CombinedOutput(); err != nil {
		t.Fatalf("run after kills: %v\n%s", err, out)
	}
	st, _ := pipeline.OpenStore(cache)
	dir := adapterEntry(t, st, spec)
	want, got := readMetrics(t, filepath.Join(refDir, "metrics.jsonl")), readMetrics(t, filepath.Join(dir, "metrics.jsonl"))
	if len(got) != len(want) {
		t.Fatalf("%d metrics lines after kills, %d uninterrupted", len(got), len(want))
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("step %d: %+v after kills, %+v uninterrupted", want[i].Step, got[i], want[i])
		}
	}
	if fileSum(t, filepath.Join(dir, "adapter", "adapter_model.safetensors")) != fileSum(t, filepath.Join(refDir, "adapter", "adapter_model.safetensors")) {
		t.Error("adapter after kills differs from the uninterrupted one")
	}
}

func fileSum(t *testing.T, p string) [32]byte {
	data, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(data)
}

// TestAdapterIndependentOfCachePath: the adapter an entry holds is the same
// bytes whichever cache computed it (adapter_config.json used to embed the
// absolute path of the base model, a folder inside the cache).
func TestAdapterIndependentOfCachePath(t *testing.T) {
	spec := trainSpec(t, 2)
	var dirs []string
	for _, name := range []string{"one", "other/cache"} {
		r := newTestRun(t)
		st, err := pipeline.OpenStore(filepath.Join(r.dir, name))
		if err != nil {
			t.Fatal(err)
		}
		r.store = st
		path := r.spec(spec)
		if _, err := r.run(path, pipeline.Options{}); err != nil {
			t.Fatal(err)
		}
		dirs = append(dirs, adapterEntry(t, st, path))
	}
	for _, f := range []string{"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} {
		a, _ := os.ReadFile(filepath.Join(dirs[0], f))
		b, _ := os.ReadFile(filepath.Join(dirs[1], f))
		if len(a) == 0 || !bytes.Equal(a, b) {
			t.Errorf("%s differs between caches:\n%s\n%s", f, a, b)
		}
	}
}

// TestQLoRADamagedCheckpointIsSetAside: an interrupted training run's
// newest checkpoint, damaged on disk, is set aside at the next run (the
// log says so) and the committed adapter is the uninterrupted run's.
func TestQLoRADamagedCheckpointIsSetAside(t *testing.T) {
	spec := trainSpec(t, 12)
	ref := newTestRun(t)
	if _, err := ref.run(ref.spec(spec), pipeline.Options{}); err != nil {
		t.Fatal(err)
	}
	want, _ := os.ReadFile(filepath.Join(adapterEntry(t, ref.store, ref.spec(spec)), "adapter", "adapter_model.safetensors"))

	r := newTestRun(t)
	path := r.spec(spec)
	dag, err := loadSpec(path, Registry())
	if err != nil {
		t.Fatal(err)
	}
	// Stop the run once it has written two checkpoints, as a kill would.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	pattern := filepath.Join(r.store.Root, "scratch", "*", "checkpoints", "step-*")
	go func() {
		for ctx.Err() == nil {
			if cks, _ := filepath.Glob(pattern); len(cks) >= 2 {
				cancel()
				return
			}
			time.Sleep(2 * time.Millisecond)
		}
	}()
	if _, err := (&pipeline.Engine{Store: r.store}).Run(ctx, dag, pipeline.Options{}); err == nil {
		t.Skip("training finished before it could be interrupted")
	}
	cks, _ := filepath.Glob(pattern)
	if len(cks) == 0 {
		t.Fatal("no checkpoint to damage")
	}
	newest := cks[len(cks)-1]
	weights := filepath.Join(newest, "adapter_model.safetensors")
	b, err := os.ReadFile(weights)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)-8] ^= 1
	os.WriteFile(weights, b, 0o644)

	var log bytes.Buffer
	eng := &pipeline.Engine{Store: r.store, Log: slog.New(slog.NewTextHandler(&log, nil))}
	if _, err := eng.Run(context.Background(), dag, pipeline.Options{}); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(filepath.Join(adapterEntry(t, r.store, path), "adapter", "adapter_model.safetensors"))
	if !bytes.Equal(got, want) {
		t.Error("the committed adapter differs from the uninterrupted run's: the damaged checkpoint was resumed")
	}
	if !strings.Contains(log.String(), "checkpoint set aside") || !strings.Contains(log.String(), filepath.Base(newest)) {
		t.Errorf("the log does not name the checkpoint set aside:\n%s", log.String())
	}
}

// TestQLoRAKeyLeavesOutTheMachine: options that change how a run uses the
// machine (the GPU memory cap, gradient checkpointing) and not the adapter
// it writes stay out of the cache key; one that changes the adapter does
// not.
func TestQLoRAKeyLeavesOutTheMachine(t *testing.T) {
	r := newTestRun(t)
	key := func(spec string) string {
		t.Helper()
		return r.plan(r.spec(spec)).Step("adapter").Key
	}
	base := trainSpec(t, 4)
	machine := strings.Replace(base, "backend: cpu}", "backend: cpu, gpu_memory: 20, gradient_checkpointing: false}", 1)
	result := strings.Replace(base, "backend: cpu}", "backend: cpu, seed: 43}", 1)
	if machine == base || result == base {
		t.Fatal("the spec's qlora options were not found to change")
	}
	if k0, k1, k2 := key(base), key(machine), key(result); k0 != k1 || k0 == k2 {
		t.Errorf("keys: spec %s, machine options changed %s, seed changed %s", k0, k1, k2)
	}
}

// TestHubBaseNamingInTheKey: an adapter of an hf:// base, whose
// adapter_config.json now names it by repository id and commit, has a key
// of its own (the adapters that named it otherwise are trained again);
// other adapters keep theirs, and no spec sets the mark.
func TestHubBaseNamingInTheKey(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "d.jsonl"), []byte(`{"instruction": "a", "output": "b"}`+"\n"), 0o644)
	chain := "name: s\nstages:\n  src: {kind: jsonl, with: {paths: [d.jsonl]}}\n  chat: {kind: chat_template, needs: [src]}\n" +
		"  tokens: {kind: tokenize, needs: [chat], with: {tokenizer: " + testenv.GemmaFile(t, "tokenizer.json") + "}}\n  pack: {kind: pack, needs: [tokens]}\n"
	load := func(model string) *pipeline.DAG {
		t.Helper()
		p := filepath.Join(dir, "s.yaml")
		os.WriteFile(p, []byte(chain+"  adapter: {kind: qlora, needs: [pack], with: {model: "+model+"}}\n"), 0o644)
		dag, err := loadSpec(p, Registry())
		if err != nil {
			t.Fatal(err)
		}
		return dag
	}
	if c := string(load("hf://google/gemma-3-1b-it").Node("adapter").Canon); !strings.Contains(c, `"hub_base_naming"`) {
		t.Errorf("an hf:// base's parameters lack the mark: %s", c)
	}
	c, _ := trainer.Preset("tiny")
	if err := trainer.WriteRandomCheckpoint(filepath.Join(dir, "model"), c, trainer.InitOptions{Seed: 1}); err != nil {
		t.Fatal(err)
	}
	if c := string(load("model").Node("adapter").Canon); strings.Contains(c, "hub_base_naming") {
		t.Errorf("a folder's parameters hold the mark: %s", c)
	}
	p := filepath.Join(dir, "t.yaml")
	os.WriteFile(p, []byte(chain+"  adapter: {kind: qlora, needs: [pack], with: {model: m, hub_base_naming: x}}\n"), 0o644)
	if _, err := loadSpec(p, Registry()); err == nil || !strings.Contains(err.Error(), `unknown parameter "hub_base_naming"`) {
		t.Errorf("a spec set the mark: %v", err)
	}
}

// TestDanglingWeightsLink: a checkpoint whose model.safetensors links to a
// file that is not there (a download into the Hugging Face cache that
// never finished) is named for that, not as a folder without weights.
func TestDanglingWeightsLink(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "model")
	c, _ := trainer.Preset("tiny")
	if err := trainer.WriteRandomCheckpoint(dir, c, trainer.InitOptions{Seed: 1}); err != nil {
		t.Fatal(err)
	}
	weights := filepath.Join(dir, "model.safetensors")
	os.Remove(weights)
	if err := os.Symlink(filepath.Join(dir, "blobs", "abc"), weights); err != nil {
		t.Fatal(err)
	}
	_, err := keyedCheckpointFiles(dir)
	if err == nil || !strings.Contains(err.Error(), "model.safetensors") || strings.Contains(err.Error(), "no model.safetensors or") {
		t.Errorf("dangling link: %v", err)
	}
}

// TestAutoBackendSaysWhich: backend: auto says which backend it chose, and
// why, when the stage runs (the key holds only the choice).
func TestAutoBackendSaysWhich(t *testing.T) {
	r := newTestRun(t)
	var logs bytes.Buffer
	r.log = slog.New(slog.NewTextHandler(&logs, nil))
	if _, err := r.run(r.spec(strings.Replace(trainSpec(t, 1), "backend: cpu", "backend: auto", 1)), pipeline.Options{}); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(logs.String(), "auto: ") || !strings.Contains(logs.String(), "training on the") {
		t.Errorf("the log does not say which backend auto chose:\n%s", logs.String())
	}
}

// TestRowsLongerThanTheContext: training rows longer than the model's
// context train, as transformers trains them, and are warned of with the
// seq_len that fits.
func TestRowsLongerThanTheContext(t *testing.T) {
	r := newTestRun(t)
	var logs bytes.Buffer
	r.log = slog.New(slog.NewTextHandler(&logs, nil))
	model := filepath.Join(r.dir, "short")
	cfg, err := trainer.Preset("tiny")
	if err != nil {
		t.Fatal(err)
	}
	cfg.MaxPositions = 64
	if err := trainer.WriteRandomCheckpoint(model, cfg, trainer.InitOptions{Seed: 1}); err != nil {
		t.Fatal(err)
	}
	if _, err := r.run(r.spec(trainSpecOn(t, 1, model)), pipeline.Options{}); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(logs.String(), "the packed rows are 128 tokens long, more than the model's context of 64 positions") ||
		!strings.Contains(logs.String(), "set the pack stage's seq_len to 64 or less") {
		t.Errorf("no warning:\n%s", logs.String())
	}
}

// A pad_id past the model's vocabulary is named as such before the first
// step, not blamed on the tokenizer when the first padded row is reached.
func TestPadIDOutsideTheVocabulary(t *testing.T) {
	r := newTestRun(t)
	spec := strings.Replace(trainSpec(t, 1), "with: {seq_len: 128}", "with: {seq_len: 128, pad_id: 300000}", 1)
	_, err := r.run(r.spec(spec), pipeline.Options{})
	if err == nil || !strings.Contains(err.Error(), "stage pack pads its rows with id 300000, outside the model's vocabulary [0, 262144)") ||
		!strings.Contains(err.Error(), "set its pad_id") {
		t.Fatalf("err = %v", err)
	}
}
