package stages

import (
	"bytes"
	"compress/gzip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"gemmaft/pipeline"
	"gemmaft/trainer"
)

// A DAG with every kind; line 12 is the adapter's first parameter, which
// the cases below replace.
const validationSpec = `name: x
stages:
  alpaca: {kind: jsonl, with: {paths: [a.jsonl]}}
  chat: {kind: chat_template, needs: [alpaca]}
  tokens: {kind: tokenize, needs: [chat], with: {tokenizer: tok.json}}
  pack: {kind: pack, needs: [tokens], with: {seq_len: 64}}
  base: {kind: model, with: {preset: tiny}}
  adapter:
    kind: qlora
    needs: [pack, base]
    with:
      PARAM
      backend: cpu
`

// loadErr writes spec beside a.jsonl and tok.json and returns the error of
// loading it.
func loadErr(t *testing.T, spec string) (path string, err error) {
	t.Helper()
	r := newTestRun(t)
	os.WriteFile(filepath.Join(r.dir, "a.jsonl"), []byte(`{"instruction": "Selam ver", "input": "", "output": "Merhaba."}`+"\n"), 0o644)
	os.WriteFile(filepath.Join(r.dir, "tok.json"), []byte("{}"), 0o644)
	path = r.spec(spec)
	_, err = loadSpec(path, Registry())
	return path, err
}

// TestParameterMistakes: every bad value is a spec error (exit 2) at its
// own line, naming the parameter, with a fix; none is truncated, ignored
// or blamed on another parameter.
func TestParameterMistakes(t *testing.T) {
	cases := []struct {
		param string
		want  string
	}{
		{"max_steps: -1", "max_steps: -1 must not be negative"},
		{"warmup_steps: -2", "warmup_steps: -2 must not be negative"},
		{"weight_decay: -0.1", "weight_decay: -0.1 must not be negative"},
		{"eval_every: -5", "eval_every: -5 must not be negative"},
		{"epochs: -1", "epochs: -1 must be at least 1"},
		// transformers' max_steps overrides the epochs; here the epochs
		// bound it, so 0 is refused rather than read as 1.
		{"epochs: 0\n      max_steps: 7", "epochs: 0 must be at least 1\n\tfix: passes over the data, e.g. epochs: 1; max_steps ends training early but not past the epochs"},
		{`schedule: ""`, "schedule: is empty\n\tfix: use linear (the default: leave schedule out)"},
		{"schedule: cosine_with_restarts", "schedule: "},
		{"max_seq_length: 2048", "unknown parameter \"max_seq_length\" for kind qlora\n\tfix: max_seq_length: the pack stage's seq_len is the length of the packed rows"},
		{"packing: true", "unknown parameter \"packing\" for kind qlora\n\tfix: packing: rows are always packed, by the pack stage"},
		{"bf16: true", "unknown parameter \"bf16\" for kind qlora\n\tfix: bf16: precision is the backend's"},
		{"seed: -1", "seed must not be negative, got -1\n\tfix: write a whole number of 0 or more, e.g. seed: 0"},
		{"seed: -1.0", "seed must not be negative, got -1.0"},
		{"target_modules: {a: b}", "target_modules must be a list\n\tfix: write a list of values, target_modules: [a, b]"},
		{"warmup_steps: 0.03", "warmup_steps must be a whole number, got 0.03\n\tfix: write a whole number, e.g. warmup_steps: 0, or give the share of the run's steps as warmup_ratio: 0.03"},
		{"random_state: 3407", "unknown parameter \"random_state\" for kind qlora\n\tfix: random_state is called seed here"},
		{"checkpoint_every: -1", "checkpoint_every: -1 must not be negative"},
		{"gpu_memory: -4", "gpu_memory: -4 must not be negative"},
		{"lr: .nan", "lr: must be a finite number, got NaN"},
		{"alpha: .inf", "alpha: must be a finite number, got +Inf"},
		{"max_grad_norm: .inf", "max_grad_norm: must be a finite number"},
		{"eval_fraction: .nan", "eval_fraction: must be a finite number"},
		{"dropout: -.inf", "dropout: must be a finite number"},
		{"r: 8.5", "r must be a whole number, got 8.5"},
		{"batch_size: 2.5", "batch_size must be a whole number, got 2.5"},
		{"max_steps: 1e400", "max_steps must be a whole number"},
		{"max_steps: 99999999999999999999", "max_steps: 99999999999999999999 is too large\n\tfix: write a number that fits in 64 bits"},
		{"r: 0", "r: 0 must be in [1, 65536]"},
		{"alpha: 0", "alpha: 0 must be positive"},
		{"dropout: 1", "dropout: 1 must be in [0, 1)"},
		{"target_modules: []", "target_modules: is empty"},
		{"target_modules: [q_proj, q_proj]", "target_modules: q_proj is listed twice"},
		{"grad_accum: 0", "grad_accum: 0 must be at least 1"},
		{"gradient_accumulation_steps: 4", `unknown parameter "gradient_accumulation_steps" for kind qlora
	fix: gradient_accumulation_steps is called grad_accum here`},
		{"warmup_ratio: 1.5", "warmup_ratio: 1.5 must be in [0, 1]"},
		{"warmup_ratio: 0.1\n      warmup_steps: 2", "warmup_ratio: is given with warmup_steps"},
		{"learning_rate: 1.0e-4", "unknown parameter \"learning_rate\" for kind qlora\n\tfix: learning_rate is called lr here"},
		{"early_stopping_patience: 3", "early_stopping_patience: needs evaluations during training"},
		{"early_stopping_threshold: 0.01", "early_stopping_threshold: is given without early_stopping_patience"},
		{"early_stopping_patience: -1", "early_stopping_patience: -1 must not be negative"},
		{"use_rslora: true", "unknown parameter \"use_rslora\" for kind qlora\n\tfix: use_rslora is called rslora here"},
	}
	for _, c := range cases {
		t.Run(c.param, func(t *testing.T) {
			path, err := loadErr(t, strings.Replace(validationSpec, "PARAM", c.param, 1))
			if err == nil {
				t.Fatal("loaded")
			}
			if !pipeline.IsSpecError(err) {
				t.Fatalf("not a spec error: %v", err)
			}
			if !strings.HasPrefix(err.Error(), path+":12:") {
				t.Errorf("want line 12: %v", err)
			}
			if !strings.Contains(err.Error(), `stage "adapter": `+c.want) {
				t.Errorf("message lacks %q: %v", c.want, err)
			}
			if !strings.Contains(err.Error(), "fix: ") {
				t.Errorf("no fix: %v", err)
			}
		})
	}
}

// TestEveryParameterMistake: a spec carried over from another tool gets
// every foreign name and every fraction in one message, in the order
// written, each at its line; nested mappings (multiple_choice: {…}) are
// checked as the stage's own parameters are.
func TestEveryParameterMistake(t *testing.T) {
	spec := strings.Replace(validationSpec, "PARAM", "learning_rate: 1.0e-4\n      r: 8.5\n      lora_alpha: 32\n      num_train_epochs: 2", 1)
	spec += `  eval:
    kind: eval
    needs: [adapter]
    with:
      tasks: [multiple_choice]
      multiple_choice: {paths: [a.jsonl], limit: 0.5, num_fewshot: 2}
`
	for range 3 { // go-yaml's own check named one name, a different one from run to run
		path, err := loadErr(t, spec)
		if err == nil {
			t.Fatal("loaded")
		}
		want := []string{
			path + `:12:7: stage "adapter": unknown parameter "learning_rate" for kind qlora` + "\n\tfix: learning_rate is called lr here",
			path + `:13:10: stage "adapter": r must be a whole number, got 8.5`,
			path + `:14:7: stage "adapter": unknown parameter "lora_alpha" for kind qlora` + "\n\tfix: lora_alpha is called alpha here",
			path + `:15:7: stage "adapter": unknown parameter "num_train_epochs" for kind qlora`,
			path + `:22:50: stage "eval": multiple_choice.limit must be a whole number, got 0.5` + "\n\tfix: write a whole number, e.g. limit: 1",
			path + `:22:55: stage "eval": unknown parameter "multiple_choice.num_fewshot"` + "\n\tfix: num_fewshot is called shots here",
		}
		msg := err.Error()
		at := 0
		for _, w := range want {
			i := strings.Index(msg[at:], w)
			if i < 0 {
				t.Fatalf("message lacks %q after byte %d:\n%s", w, at, msg)
			}
			at += i + len(w)
		}
	}
}

// TestEveryBadSetting: a qlora stage's bad values are reported together,
// each at its line, not one per run.
func TestEveryBadSetting(t *testing.T) {
	spec := strings.Replace(validationSpec, "PARAM", "epochs: 0\n      dropout: 1.0\n      r: 0\n      target_modules: [lm_head]", 1)
	path, err := loadErr(t, spec)
	if err == nil {
		t.Fatal("loaded")
	}
	msg := err.Error()
	at := 0
	for _, w := range []string{
		path + `:12:7: stage "adapter": epochs: 0 must be at least 1`,
		path + `:13:7: stage "adapter": dropout: 1 must be in [0, 1)`,
		path + `:14:7: stage "adapter": r: 0 must be in [1, 65536]`,
		path + `:15:7: stage "adapter": target_modules: unknown target module "lm_head"`,
	} {
		i := strings.Index(msg[at:], w)
		if i < 0 {
			t.Fatalf("message lacks %q after byte %d:\n%s", w, at, msg)
		}
		at += i + len(w)
	}
}

// TestPackSynonyms: TRL's and Axolotl's names for the pack stage's row
// length and for packing itself are pointed at what stands for them.
func TestPackSynonyms(t *testing.T) {
	for param, want := range map[string]string{
		"max_seq_length: 2048": "max_seq_length is called seq_len here",
		"sequence_len: 2048":   "sequence_len is called seq_len here",
		"sample_packing: true": "sample_packing: this stage always packs examples into rows of seq_len tokens",
	} {
		spec := strings.Replace(validationSpec, "with: {seq_len: 64}", "with: {"+param+"}", 1)
		spec = strings.Replace(spec, "PARAM", "r: 32", 1)
		if _, err := loadErr(t, spec); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v, want %q", param, err, want)
		}
	}
}

// adapterCanon returns what the adapter stage of validationSpec keys, its
// first parameter replaced.
func adapterCanon(t *testing.T) func(param string) string {
	r := newTestRun(t)
	os.WriteFile(filepath.Join(r.dir, "a.jsonl"), []byte(`{"instruction": "Selam ver", "input": "", "output": "Merhaba."}`+"\n"), 0o644)
	os.WriteFile(filepath.Join(r.dir, "tok.json"), []byte("{}"), 0o644)
	return func(param string) string {
		dag, err := loadSpec(r.spec(strings.Replace(validationSpec, "PARAM", param, 1)), Registry())
		if err != nil {
			t.Fatalf("%s: %v", param, err)
		}
		return string(dag.Node("adapter").Canon)
	}
}

// TestConstantWithWarmup: transformers' constant_with_warmup is what
// constant is here, and keys as it does.
func TestConstantWithWarmup(t *testing.T) {
	canon := adapterCanon(t)
	if a, b := canon("schedule: constant_with_warmup"), canon("schedule: constant"); a != b {
		t.Errorf("constant_with_warmup keys as %s, constant as %s", a, b)
	}
}

// TestAllLinear: target_modules: [all-linear], PEFT's name, is the seven
// projections, the default, and keys as the default does.
func TestAllLinear(t *testing.T) {
	canon := adapterCanon(t)
	if a, b := canon("target_modules: [all-linear]"), canon("r: 32"); a != b {
		t.Errorf("all-linear keys as %s, the default as %s", a, b)
	}
	// PEFT's string form, target_modules="all-linear", and one module
	// written alone, read as the lists they stand for.
	if a, b := canon("target_modules: all-linear"), canon("r: 32"); a != b {
		t.Errorf("target_modules: all-linear keys as %s, the default as %s", a, b)
	}
	if a, b := canon("target_modules: q_proj"), canon("target_modules: [q_proj]"); a != b {
		t.Errorf("target_modules: q_proj keys as %s, [q_proj] as %s", a, b)
	}
	// warmup_ratio, unset, leaves the keys of adapters trained before it was
	// a parameter as they were.
	if strings.Contains(canon("r: 32"), "warmup_ratio") || !strings.Contains(canon("warmup_ratio: 0.03"), `"warmup_ratio":0.03`) {
		t.Errorf("warmup_ratio in the key: %s", canon("r: 32"))
	}
	// So does rslora.
	if strings.Contains(canon("r: 32"), "rslora") || !strings.Contains(canon("rslora: true"), `"rslora":true`) {
		t.Errorf("rslora in the key: %s", canon("r: 32"))
	}
}

// TestOtherKindsRefuseNonFinite: the check is the loader's, for every kind.
func TestOtherKindsRefuseNonFinite(t *testing.T) {
	path, err := loadErr(t, "name: x\nstages:\n  base:\n    kind: model\n    with: {preset: tiny, std: .inf}\n")
	if err == nil || !strings.HasPrefix(err.Error(), path+":5:") || !strings.Contains(err.Error(), "std: must be a finite number") {
		t.Fatalf("std .inf: %v", err)
	}
	path, err = loadErr(t, "name: x\nstages:\n  a: {kind: jsonl, with: {paths: [a.jsonl], limit: 2.5}}\n")
	if err == nil || !strings.HasPrefix(err.Error(), path+":3:") || !strings.Contains(err.Error(), "limit must be a whole number, got 2.5") {
		t.Fatalf("limit 2.5: %v", err)
	}
}

// TestUnknownNestedParameter: a name a parameter's own mapping does not
// know (multiple_choice: {num_fewshot: 5}) is said with that mapping's
// names, not the stage's.
func TestUnknownNestedParameter(t *testing.T) {
	path, err := loadErr(t, "name: x\nstages:\n  base: {kind: model, with: {preset: tiny}}\n  ev:\n    kind: eval\n    needs: [base]\n    with:\n      tasks: [multiple_choice]\n      multiple_choice: {paths: [a.jsonl], shot: 5}\n")
	if err == nil || !strings.HasPrefix(err.Error(), path+":9:") || !strings.Contains(err.Error(), `unknown parameter "multiple_choice.shot"`) ||
		!strings.Contains(err.Error(), `did you mean "shots"? parameters of multiple_choice: paths, dev, shots, columns, limit, prompt`) {
		t.Fatalf("shot inside multiple_choice: %v", err)
	}
}

// TestCUDAWithoutGPU: backend: cuda where no GPU backend is usable is a
// spec error at that line, before anything runs.
func TestCUDAWithoutGPU(t *testing.T) {
	if _, _, err := trainer.ResolveBackend("cuda"); err == nil {
		t.Skip("a GPU is usable here")
	}
	path, err := loadErr(t, strings.Replace(strings.Replace(validationSpec, "PARAM", "r: 8", 1), "backend: cpu", "backend: cuda", 1))
	if err == nil || !pipeline.IsSpecError(err) || !strings.HasPrefix(err.Error(), path+":13:") || !strings.Contains(err.Error(), "backend:") || !strings.Contains(err.Error(), "fix: use backend: auto") {
		t.Fatalf("backend cuda without a GPU: %v", err)
	}
}

// TestSourcePathMistakes: a path that is not a data file says what it is,
// and a file listed twice (which would double its records) is refused.
func TestSourcePathMistakes(t *testing.T) {
	r := newTestRun(t)
	os.WriteFile(filepath.Join(r.dir, "a.jsonl"), []byte(`{"instruction": "a", "input": "", "output": "b"}`+"\n"), 0o644)
	os.Mkdir(filepath.Join(r.dir, "folder.jsonl"), 0o755)
	os.Symlink(filepath.Join(r.dir, "loop2.jsonl"), filepath.Join(r.dir, "loop1.jsonl"))
	os.Symlink(filepath.Join(r.dir, "loop1.jsonl"), filepath.Join(r.dir, "loop2.jsonl"))
	os.Symlink(filepath.Join(r.dir, "gone.jsonl"), filepath.Join(r.dir, "dangling.jsonl"))
	os.Symlink(filepath.Join(r.dir, "a.jsonl"), filepath.Join(r.dir, "link.jsonl"))
	cases := map[string]string{
		"[folder.jsonl]":         "folder.jsonl is a folder, not a regular file",
		"[loop1.jsonl]":          "loop1.jsonl is a loop of symbolic links",
		"[dangling.jsonl]":       "dangling.jsonl is a symbolic link to " + filepath.Join(r.dir, "gone.jsonl") + ", which does not exist",
		"[a.jsonl, a.jsonl]":     "a.jsonl is listed twice: its records",
		"[a.jsonl, link.jsonl]":  "link.jsonl is listed twice (also as " + filepath.Join(r.dir, "a.jsonl") + ")",
		`[a.jsonl, "a*.jsonl"]`:  "a.jsonl is listed twice",
		"[~nosuchuser12/a.json]": "cannot expand ~nosuchuser12",
	}
	if err := syscall.Mkfifo(filepath.Join(r.dir, "pipe.jsonl"), 0o644); err == nil {
		cases["[pipe.jsonl]"] = "pipe.jsonl is a named pipe (FIFO; reading it would wait for a writer), not a regular file"
	}
	for paths, want := range cases {
		path := r.spec("name: x\nstages:\n  a:\n    kind: jsonl\n    with:\n      paths: " + paths + "\n")
		_, err := loadSpec(path, Registry())
		if err == nil || !pipeline.IsSpecError(err) || !strings.HasPrefix(err.Error(), path+":6:") || !strings.Contains(err.Error(), want) {
			t.Errorf("paths: %s: %v, want a spec error at line 6 saying %q", paths, err, want)
		}
	}
	// ~ is the home folder.
	t.Setenv("HOME", r.dir)
	path := r.spec("name: x\nstages:\n  a: {kind: jsonl, with: {paths: [~/a.jsonl]}}\n  t: {kind: tokenize, needs: [c], with: {tokenizer: ~/a.jsonl}}\n  c: {kind: chat_template, needs: [a]}\n")
	dag, err := loadSpec(path, Registry())
	if err != nil {
		t.Fatalf("~ in paths: %v", err)
	}
	if got := dag.Node("a").Runner.Files(); len(got) != 1 || got[0] != filepath.Join(r.dir, "a.jsonl") {
		t.Errorf("~/a.jsonl read as %v", got)
	}
	// A tokenizer that is a folder says so.
	path = r.spec("name: x\nstages:\n  a: {kind: jsonl, with: {paths: [a.jsonl]}}\n  c: {kind: chat_template, needs: [a]}\n  t: {kind: tokenize, needs: [c], with: {tokenizer: folder.jsonl}}\n")
	if _, err := loadSpec(path, Registry()); err == nil || !strings.HasPrefix(err.Error(), path+":5:") || !strings.Contains(err.Error(), "is a folder") {
		t.Errorf("tokenizer folder: %v", err)
	}
	_ = strconv.Itoa
}

// TestSourceKindAndFileDisagree: a Parquet file in a jsonl stage, JSON
// lines in a parquet stage, or a file of no known type in a text stage, is
// a spec error saying so, not a failure once the run reaches it.
func TestSourceKindAndFileDisagree(t *testing.T) {
	r := newTestRun(t)
	jsonl := filepath.Join(r.dir, "a.jsonl")
	os.WriteFile(jsonl, []byte("\xef\xbb\xbf  "+`{"instruction": "a", "input": "", "output": "b"}`+"\n"), 0o644)
	parquet := filepath.Join(r.dir, "a.parquet")
	writeParquet(t, parquet, stringBatch([]string{"instruction", "input", "output"}, []string{"a", "", "b"}))
	rst := filepath.Join(r.dir, "README.rst")
	os.WriteFile(rst, []byte("Bir metin.\n"), 0o644)
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write([]byte(`{"instruction": "a", "input": "", "output": "b"}` + "\n"))
	zw.Close()
	gzipped := filepath.Join(r.dir, "gz.jsonl")
	os.WriteFile(gzipped, gz.Bytes(), 0o644)
	utf16 := filepath.Join(r.dir, "u16.jsonl")
	os.WriteFile(utf16, []byte("\xff\xfe{\x00}\x00"), 0o644)
	for _, c := range []struct{ kind, path, want string }{
		{"parquet", jsonl, jsonl + " holds JSON, not Parquet\n\tfix: read it with kind: jsonl"},
		{"jsonl", parquet, parquet + " is a Parquet file, not JSON lines\n\tfix: read it with kind: parquet"},
		{"text", rst, rst + ": unknown file type (want .parquet, .jsonl"},
		{"jsonl", `""`, "paths: entry 1 is empty"},
		{"jsonl", gzipped, gzipped + " is gzip-compressed: name it gz.jsonl.gz"},
		{"jsonl", utf16, utf16 + " is UTF-16 text: save it as UTF-8"},
	} {
		path := r.spec("name: x\nstages:\n  a:\n    kind: " + c.kind + "\n    with:\n      paths: [" + c.path + "]\n")
		_, err := loadSpec(path, Registry())
		if err == nil || !pipeline.IsSpecError(err) || !strings.HasPrefix(err.Error(), path+":6:") || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s stage reading %s: %v, want %q", c.kind, filepath.Base(c.path), err, c.want)
		}
	}
	// Each read by its own kind, it loads.
	for kind, p := range map[string]string{"jsonl": jsonl, "parquet": parquet} {
		if _, err := loadSpec(r.spec("name: x\nstages:\n  a: {kind: "+kind+", with: {paths: ["+p+"]}}\n"), Registry()); err != nil {
			t.Errorf("%s: %v", kind, err)
		}
	}
}

// TestRepositoryIDsAsPaths: a model or tokenizer written as a Hub
// repository's id, as transformers takes it, is a missing local path
// whose fix is its hf:// form.
func TestRepositoryIDsAsPaths(t *testing.T) {
	for old, repl := range map[string]string{
		"tokenizer: tok.json": "tokenizer: google/gemma-3-1b-it",
		"      PARAM":         "      model: google/gemma-3-1b-it",
	} {
		spec := strings.Replace(validationSpec, old, repl, 1)
		if strings.Contains(repl, "model") {
			spec = strings.Replace(spec, "needs: [pack, base]", "needs: [pack]", 1)
		}
		spec = strings.Replace(spec, "      PARAM\n", "", 1)
		_, err := loadErr(t, spec)
		want := "relative to the spec's folder; on the Hugging Face Hub it is tokenizer: hf://google/gemma-3-1b-it/tokenizer.json"
		if strings.Contains(repl, "model") {
			want = "on the Hugging Face Hub it is model: hf://google/gemma-3-1b-it"
		}
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v", repl, err)
		}
	}
}
