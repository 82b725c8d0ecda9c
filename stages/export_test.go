package stages

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"gemmaft/gguf"
	"gemmaft/internal/testenv"
	"gemmaft/pipeline"
	"gemmaft/trainer"
)

// exportSpec is trainSpec followed by merge and gguf stages; the sources
// carry a system text, which the Modelfile should then set.
func exportSpec(t *testing.T, extra string) string {
	spec := strings.Replace(trainSpec(t, 2), "limit: 40}", "limit: 40, system: Sen yardımsever bir asistansın.}", 1)
	return spec + `  merged:
    kind: merge
    needs: [adapter, base]
    with: {base_model: google/gemma-3-1b-it, datasets: [malhajar/alpaca-gpt4-tr], language: [tr]}
  gguf:
    kind: gguf
    needs: [merged]
    with: {type: Q4_K_M, name: tr-demo, language: [tr]}
` + extra
}

func stageEntry(t *testing.T, rec *pipeline.RunRecord, name string) string {
	t.Helper()
	for _, s := range rec.Stages {
		if s.Name == name {
			if s.Entry == "" {
				t.Fatalf("stage %s has no entry (%s: %s)", name, s.State, s.Error)
			}
			return s.Entry
		}
	}
	t.Fatalf("no stage %s", name)
	return ""
}

// TestMergeAndGGUFStages: a DAG that trains ends with a Hugging Face
// checkpoint folder and a GGUF file with its Modelfile, each with a model
// card and the Gemma notice; the merged checkpoint loads as the base's
// shape with the training tokenizer.
func TestMergeAndGGUFStages(t *testing.T) {
	r := newTestRun(t)
	spec := r.spec(exportSpec(t, ""))
	rec, err := r.run(spec, pipeline.Options{})
	if err != nil {
		t.Fatal(err)
	}
	merged := filepath.Join(stageEntry(t, rec, "merged"), MergedModelDir)
	ck, err := trainer.OpenCheckpoint(merged)
	if err != nil {
		t.Fatalf("the merged folder does not open as a checkpoint: %v", err)
	}
	base, _ := trainer.LoadConfig(stageEntry(t, rec, "base"))
	if ck.Config.Layers != base.Layers || ck.Config.Hidden != base.Hidden || ck.Config.DType != "bfloat16" {
		t.Errorf("merged config %+v, base %+v", ck.Config, base)
	}
	got, _ := os.ReadFile(filepath.Join(merged, "tokenizer.json"))
	want, _ := os.ReadFile(testenv.GemmaFile(t, "tokenizer.json"))
	if !bytes.Equal(got, want) {
		t.Error("the merged folder's tokenizer.json is not the one training used")
	}
	card, _ := os.ReadFile(filepath.Join(merged, "README.md"))
	for _, w := range []string{"---\nbase_model: google/gemma-3-1b-it\nlicense: gemma\ndatasets:\n- malhajar/alpaca-gpt4-tr\nlanguage:\n- tr\n",
		"- merged\n", "NF4-dequantised", "| r | 4 |", "| steps | 2 |", "source alpaca", "> Sen yardımsever bir asistansın.", "ai.google.dev/gemma/terms"} {
		if !strings.Contains(string(card), w) {
			t.Errorf("merged model card lacks %q:\n%s", w, card)
		}
	}
	if n, _ := os.ReadFile(filepath.Join(merged, "NOTICE")); !strings.Contains(string(n), "Gemma is provided under and subject to the Gemma Terms of Use found at\nai.google.dev/gemma/terms") {
		t.Errorf("NOTICE: %s", n)
	}

	g := stageEntry(t, rec, "gguf")
	if st, err := os.Stat(filepath.Join(g, "tr-demo.q4_k_m.gguf")); err != nil || st.Size() < 1<<20 {
		t.Fatalf("GGUF file: %v", err)
	}
	mf, _ := os.ReadFile(filepath.Join(g, "Modelfile"))
	for _, w := range []string{"FROM ./tr-demo.q4_k_m.gguf\n", "SYSTEM \"\"\"Sen yardımsever bir asistansın.\"\"\"", "PARAMETER stop \"<end_of_turn>\""} {
		if !strings.Contains(string(mf), w) {
			t.Errorf("Modelfile lacks %q:\n%s", w, mf)
		}
	}
	card, _ = os.ReadFile(filepath.Join(g, "README.md"))
	for _, w := range []string{"- gguf\n", "tr-demo.q4_k_m.gguf", "ollama create tr-demo -f Modelfile", "| r | 4 |"} {
		if !strings.Contains(string(card), w) {
			t.Errorf("GGUF model card lacks %q:\n%s", w, card)
		}
	}
	if _, err := os.Stat(filepath.Join(g, "NOTICE")); err != nil {
		t.Error("no NOTICE beside the GGUF file")
	}

	rec, err = r.run(spec, pipeline.Options{})
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range rec.Stages {
		if s.State != "cached" {
			t.Errorf("second run: %s is %s", s.Name, s.State)
		}
	}
}

// TestMergeKeysTheTokenizerFolder: the tokenizer files a merge ships come
// from the folder of the tokenizer training read; one edited there (the
// chat template in tokenizer_config.json) makes a new merge, while the
// adapter stays cached.
func TestMergeKeysTheTokenizerFolder(t *testing.T) {
	r := newTestRun(t)
	tok := filepath.Join(r.dir, "tok")
	os.MkdirAll(tok, 0o755)
	for _, name := range []string{"tokenizer.json", "tokenizer_config.json"} {
		b, err := os.ReadFile(testenv.GemmaFile(t, name))
		if err != nil {
			t.Fatal(err)
		}
		os.WriteFile(filepath.Join(tok, name), b, 0o644)
	}
	spec := r.spec(strings.Replace(exportSpec(t, ""), testenv.GemmaFile(t, "tokenizer.json"), filepath.Join(tok, "tokenizer.json"), 1))
	if _, err := r.run(spec, pipeline.Options{Until: "merged"}); err != nil {
		t.Fatal(err)
	}
	cfg := filepath.Join(tok, "tokenizer_config.json")
	b, _ := os.ReadFile(cfg)
	edited := bytes.Replace(b, []byte("<start_of_turn>"), []byte("<start_of_turn> "), 1)
	if bytes.Equal(edited, b) {
		t.Fatal("no chat template to edit")
	}
	os.WriteFile(cfg, edited, 0o644)
	plan := r.plan(spec)
	if plan.Step("adapter").State != pipeline.Valid || plan.Step("merged").State == pipeline.Valid {
		t.Fatalf("after the template changed: adapter %v, merged %v", plan.Step("adapter").State, plan.Step("merged").State)
	}
	rec, err := r.run(spec, pipeline.Options{Until: "merged"})
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(filepath.Join(stageEntry(t, rec, "merged"), MergedModelDir, "tokenizer_config.json")); !bytes.Equal(got, edited) {
		t.Error("the merged folder ships the tokenizer_config.json of before the edit")
	}
}

// TestShardedBase: a sharded checkpoint is known by its shards' content,
// not only by its index, which every checkpoint of its architecture shares:
// another model's shards copied over the first change the training stage's
// key (the adapter of the first used to be served as cached), and an
// adapter is refused by a merge, an eval or a generate stage on the other.
func TestShardedBase(t *testing.T) {
	r := newTestRun(t)
	c, _ := trainer.Preset("tiny")
	write := func(name string, seed uint64) string {
		dir := filepath.Join(r.dir, name)
		if err := trainer.WriteRandomCheckpoint(dir, c, trainer.InitOptions{Seed: seed, Std: 0.3, MaxShardBytes: 200_000}); err != nil {
			t.Fatal(err)
		}
		return dir
	}
	base, other := write("base", 7), write("other", 8)
	index := func(dir string) string {
		b, err := os.ReadFile(filepath.Join(dir, "model.safetensors.index.json"))
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	if index(base) != index(other) {
		t.Fatal("the two checkpoints' indexes differ; the test needs them alike")
	}
	train := trainSpecOn(t, 1, base)
	spec := r.spec(train)
	key := func() string { return r.plan(spec).Step("adapter").Key }
	if _, err := r.run(spec, pipeline.Options{}); err != nil {
		t.Fatal(err)
	}
	trained := key()

	for name, stage := range map[string]string{
		"merge":    "  merged: {kind: merge, needs: [adapter], with: {model: " + other + "}}\n",
		"eval":     "  held: {kind: jsonl, with: {paths: [" + filepath.Join(testenv.RepoRoot(t), "dataset", "demo", "alpaca-tr-heldout.jsonl") + "]}}\n  eval: {kind: eval, needs: [adapter, held], with: {tasks: [loss], model: " + other + "}}\n",
		"generate": "  answers: {kind: generate, needs: [alpaca, adapter], with: {model: " + other + ", max_new_tokens: 2}}\n",
	} {
		_, err := r.run(r.spec(train+stage), pipeline.Options{})
		if err == nil || !strings.Contains(err.Error(), "an adapter for another base") || !strings.Contains(err.Error(), "model-0000") {
			t.Errorf("%s on another sharded checkpoint: %v", name, err)
		}
	}

	// The other model's shards copied over the first's.
	shards, _ := filepath.Glob(filepath.Join(other, "model-*.safetensors"))
	for _, sh := range shards {
		b, _ := os.ReadFile(sh)
		if err := os.WriteFile(filepath.Join(base, filepath.Base(sh)), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if key() == trained {
		t.Error("other shards under the same index kept the training stage's key")
	}
}

// TestMergeRefusesAnotherBase: merging the adapter into a checkpoint of
// another shape fails, saying so, and leaves no entry behind.
func TestMergeRefusesAnotherBase(t *testing.T) {
	r := newTestRun(t)
	other := filepath.Join(r.dir, "other")
	c, _ := trainer.Preset("tiny")
	c.Hidden, c.Intermediate = 32, 128
	if err := trainer.WriteRandomCheckpoint(other, c, trainer.InitOptions{Seed: 1}); err != nil {
		t.Fatal(err)
	}
	spec := r.spec(strings.Replace(exportSpec(t, ""), "needs: [adapter, base]\n    with: {", "needs: [adapter]\n    with: {model: "+other+", ", 1))
	rec, err := r.run(spec, pipeline.Options{})
	if err == nil {
		t.Fatal("merging into another base succeeded")
	}
	if !strings.Contains(err.Error(), "adapter") {
		t.Errorf("error does not name the adapter: %v", err)
	}
	for _, s := range rec.Stages {
		if (s.Name == "merged" || s.Name == "gguf") && s.Entry != "" {
			t.Errorf("stage %s left entry %s", s.Name, s.Entry)
		}
	}
	if _, err := os.Stat(filepath.Join(r.store.Root, "entries")); err == nil {
		filepath.Walk(filepath.Join(r.store.Root, "entries"), func(p string, info os.FileInfo, err error) error {
			if err == nil && info.Name() == MergedModelDir {
				t.Errorf("a merged folder was left in the cache: %s", p)
			}
			return nil
		})
	}
}

// TestGGUFNeedsTokenizer: converting a checkpoint folder without
// tokenizer.json fails before writing anything, saying why.
func TestGGUFNeedsTokenizer(t *testing.T) {
	r := newTestRun(t)
	dir := filepath.Join(r.dir, "bare")
	c, _ := trainer.Preset("tiny")
	if err := trainer.WriteRandomCheckpoint(dir, c, trainer.InitOptions{Seed: 1}); err != nil {
		t.Fatal(err)
	}
	spec := r.spec("name: g\nstages:\n  gguf: {kind: gguf, with: {model: " + dir + "}}\n")
	_, err := r.run(spec, pipeline.Options{})
	if err == nil || !strings.Contains(err.Error(), "no tokenizer.json") {
		t.Fatalf("want a missing-tokenizer error, got %v", err)
	}
	if n := r.entries(); n != 0 {
		t.Errorf("%d entries after a failed conversion", n)
	}
}

// TestGGUFAfterATokenizerWithoutConfig: training read a tokenizer.json with
// no tokenizer_config.json beside it, so the merged model has none either;
// the gguf stage says where to put it and which stage to force, and doing
// so converts.
func TestGGUFAfterATokenizerWithoutConfig(t *testing.T) {
	r := newTestRun(t)
	tok := testenv.GemmaFile(t, "tokenizer.json")
	bare := filepath.Join(r.dir, "tok")
	if err := os.MkdirAll(bare, 0o755); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(tok)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(bare, "tokenizer.json"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	spec := r.spec(strings.ReplaceAll(exportSpec(t, ""), tok, filepath.Join(bare, "tokenizer.json")))
	_, err = r.run(spec, pipeline.Options{})
	if err == nil || !strings.Contains(err.Error(), "put the model's tokenizer_config.json there, then run again with --force merged") ||
		!strings.Contains(err.Error(), bare) {
		t.Fatalf("want the missing tokenizer_config.json named with its fix, got %v", err)
	}
	cfg, err := os.ReadFile(filepath.Join(filepath.Dir(tok), "tokenizer_config.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(bare, "tokenizer_config.json"), cfg, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := r.run(spec, pipeline.Options{Force: []string{"merged"}}); err != nil {
		t.Fatalf("after the fix the message gives: %v", err)
	}
}

// TestGGUFLoRAStage: a gguf_lora stage writes the qlora stage's adapter as
// the GGUF LoRA file gguf.Gemma3LoRA makes of it for its base; a stage that
// reads no adapter, or asks for a model's type, is a spec error.
func TestGGUFLoRAStage(t *testing.T) {
	r := newTestRun(t)
	spec := trainSpec(t, 2) + `  lora:
    kind: gguf_lora
    needs: [adapter, base]
    with: {type: F16, name: tr-adapter}
`
	rec, err := r.run(r.spec(spec), pipeline.Options{})
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(filepath.Join(stageEntry(t, rec, "lora"), "tr-adapter.f16.gguf"))
	if err != nil {
		t.Fatal(err)
	}
	want := filepath.Join(t.TempDir(), "want.gguf")
	adapter := filepath.Join(stageEntry(t, rec, "adapter"), trainer.AdapterDirName)
	if err := gguf.Gemma3LoRA(context.Background(), stageEntry(t, rec, "base"), adapter, want, gguf.LoRAOptions{Type: gguf.MostlyF16, Name: "tr-adapter"}); err != nil {
		t.Fatal(err)
	}
	if w, _ := os.ReadFile(want); !bytes.Equal(got, w) {
		t.Error("the stage's file is not the adapter's GGUF LoRA file")
	}
	for with, msg := range map[string]string{
		"needs: [pack, base]\n    with: {type: f16}":     `"pack" is a pack stage, but a gguf_lora stage reads the adapter of a qlora stage`,
		"needs: [adapter, base]\n    with: {type: q8_0}": "type: q8_0 is a model's type; a LoRA adapter is written in f32, f16 or bf16",
	} {
		bad := trainSpec(t, 2) + "  lora:\n    kind: gguf_lora\n    " + with + "\n"
		if _, err := loadSpec(r.spec(bad), Registry()); err == nil || !strings.Contains(err.Error(), msg) {
			t.Errorf("%s: %v", with, err)
		}
	}
}

// TestCardTrainingSettings: the card gives rsLoRA's scale and a warmup
// given as a ratio, which the update and the schedule depend on.
func TestCardTrainingSettings(t *testing.T) {
	var d cardData
	d.fill(provenance{qlora: &pipeline.Manifest{Params: []byte(`{"r": 16, "alpha": 32, "rslora": true, "warmup_ratio": 0.03, "warmup_steps": 0, "quantize": "nf4"}`)}})
	rows := map[string]string{}
	for _, r := range d.Training {
		rows[r[0]] = r[1]
	}
	if rows["rslora"] != "true" || rows["warmup_ratio"] != "0.03" || rows["warmup_steps"] != "" {
		t.Errorf("training rows %v", d.Training)
	}
}
