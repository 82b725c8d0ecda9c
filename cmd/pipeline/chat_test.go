package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"gemmaft/converse"
	"gemmaft/internal/testenv"
	"gemmaft/tokenizer"
	"gemmaft/trainer"
)

// tinyChatModel writes a random tiny Gemma 3 (the real vocabulary) with
// Gemma 3's tokenizer beside it, and returns the folder.
func tinyChatModel(t *testing.T, dir string, layers int) string {
	t.Helper()
	cfg, err := trainer.Preset("tiny")
	if err != nil {
		t.Fatal(err)
	}
	cfg.Layers, cfg.LayerTypes = layers, cfg.LayerTypes[:layers]
	if err := trainer.WriteRandomCheckpoint(dir, cfg, trainer.InitOptions{Seed: 1, DType: "bfloat16", Std: 0.125}); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(testenv.GemmaFile(t, "tokenizer.json"))
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(dir, "tokenizer.json"), string(data))
	return dir
}

// tinyGenerator loads model on the CPU reference, as the chat command does
// without a GPU, with its tokenizer.
func tinyGenerator(t *testing.T, model string) (*tokenizer.Tokenizer, trainer.Decoder, *converse.Generator) {
	t.Helper()
	tok, err := tokenizer.LoadFile(filepath.Join(model, "tokenizer.json"))
	if err != nil {
		t.Fatal(err)
	}
	dec, err := trainer.OpenDecoder(trainer.DecoderConfig{Model: model})
	if err != nil {
		t.Fatal(err)
	}
	gen, err := converse.New(dec, tok)
	if err != nil {
		t.Fatal(err)
	}
	return tok, dec, gen
}

// runCLIStdin is runCLI with stdin.
func runCLIStdin(t *testing.T, dir, stdin string, args ...string) cliResult {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "PIPELINE_CLI=1", "PIPELINE_CACHE="+filepath.Join(dir, "cache"))
	cmd.Stdin = strings.NewReader(stdin)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	res := cliResult{stdout: out.String(), stderr: errb.String()}
	if ee, ok := err.(*exec.ExitError); ok {
		res.code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return res
}

// TestChatCommand: `pipeline chat --prompt` prints what the library
// answers for the same conversation, greedy or sampled with the model
// folder's generation_config.json; --prompt - reads stdin; lines on stdin
// are the turns of one conversation; --help shows the sampling flags; bad
// flags exit 2 and an adapter of another model exits 1.
func TestChatCommand(t *testing.T) {
	dir := t.TempDir()
	model := tinyChatModel(t, filepath.Join(dir, "model"), 6)
	tok, dec, gen := tinyGenerator(t, model)
	answer := func(c converse.Conversation, o trainer.GenerateOptions) string {
		t.Helper()
		r, err := gen.Reply(context.Background(), []converse.Conversation{c}, o, nil)
		if err != nil {
			t.Fatal(err)
		}
		return r[0].Text
	}
	const q = "Türkiye'nin başkenti neresidir?"
	greedy := trainer.GenerateOptions{MaxNewTokens: 12}

	r := runCLI(t, dir, "chat", "--model", model, "--prompt", q, "--max-new-tokens", "12", "--system", "Kısa cevap ver.")
	want := answer(converse.Conversation{System: "Kısa cevap ver.", Turns: []string{q}}, greedy)
	if r.code != 0 || r.stdout != want+"\n" || strings.TrimSpace(want) == "" {
		t.Fatalf("chat --prompt: exit %d, stdout %q, want %q\n%s", r.code, r.stdout, want, r.stderr)
	}
	r = runCLIStdin(t, dir, q+"\n", "chat", "--model", model, "--prompt", "-", "--max-new-tokens", "12", "--system", "Kısa cevap ver.")
	if r.code != 0 || r.stdout != want+"\n" {
		t.Errorf("chat --prompt -: exit %d, stdout %q, want %q\n%s", r.code, r.stdout, want, r.stderr)
	}
	if r := runCLIStdin(t, dir, "\n", "chat", "--model", model, "--prompt", "-"); r.code != 2 || !strings.Contains(r.stderr, "standard input held no text") {
		t.Errorf("chat --prompt - with nothing on stdin: exit %d\n%s", r.code, r.stderr)
	}
	// A script that samples without --seed is told the seed it drew, and
	// that seed draws the same answer again.
	r = runCLI(t, dir, "chat", "--model", model, "--prompt", q, "--max-new-tokens", "6", "--temperature", "1")
	seed := regexp.MustCompile(`sampling with seed (\d+)`).FindStringSubmatch(r.stderr)
	if r.code != 0 || seed == nil {
		t.Fatalf("sampling without --seed: exit %d\n%s", r.code, r.stderr)
	}
	if again := runCLI(t, dir, "chat", "--model", model, "--prompt", q, "--max-new-tokens", "6", "--temperature", "1", "--seed", seed[1]); again.stdout != r.stdout {
		t.Errorf("--seed %s drew %q, the first run %q", seed[1], again.stdout, r.stdout)
	}

	// An answer cut at the limit says so on stderr (stdout stays the
	// answer); one that reached <end_of_turn> does not.
	for _, n := range []int{1, 2, 3, 4, 6, 12, 40} {
		rs, err := gen.Reply(context.Background(), []converse.Conversation{{Turns: []string{q}}}, trainer.GenerateOptions{MaxNewTokens: n}, nil)
		if err != nil {
			t.Fatal(err)
		}
		r := runCLI(t, dir, "chat", "--model", model, "--prompt", q, "--max-new-tokens", strconv.Itoa(n))
		note := fmt.Sprintf("(cut at %d new tokens; --max-new-tokens allows more)", n)
		if r.code != 0 || r.stdout != rs[0].Text+"\n" || strings.Contains(r.stderr, note) == rs[0].Stopped {
			t.Errorf("--max-new-tokens %d: exit %d, stdout %q, stderr %q; the answer ended at a stop token: %v", n, r.code, r.stdout, r.stderr, rs[0].Stopped)
		}
	}
	// generation_config.json's eos_token_id ends an answer too, as in
	// transformers' generate: here the first token of the greedy answer
	// that differs from the ones before it, after at least one.
	cut, err := gen.Reply(context.Background(), []converse.Conversation{{Turns: []string{q}}}, trainer.GenerateOptions{MaxNewTokens: 12}, nil)
	if err != nil {
		t.Fatal(err)
	}
	at := 1
	for at < len(cut[0].Tokens) && slices.Contains(cut[0].Tokens[:at], cut[0].Tokens[at]) {
		at++
	}
	if at == len(cut[0].Tokens) {
		t.Fatalf("the greedy answer repeats one token: %v", cut[0].Tokens)
	}
	stop := cut[0].Tokens[at]
	writeFile(t, filepath.Join(model, "generation_config.json"), fmt.Sprintf(`{"eos_token_id": [1, 106, %d]}`, stop))
	g3, err := converse.New(dec, tok, stop)
	if err != nil {
		t.Fatal(err)
	}
	ended, err := g3.Reply(context.Background(), []converse.Conversation{{Turns: []string{q}}}, trainer.GenerateOptions{MaxNewTokens: 12}, nil)
	if err != nil {
		t.Fatal(err)
	}
	r = runCLI(t, dir, "chat", "--model", model, "--prompt", q, "--max-new-tokens", "12")
	if !ended[0].Stopped || len(ended[0].Tokens) != at+1 || r.code != 0 || r.stdout != ended[0].Text+"\n" || strings.Contains(r.stderr, "cut at") {
		t.Errorf("eos_token_id %d in generation_config.json: exit %d, stdout %q (want %q), stderr %q", stop, r.code, r.stdout, ended[0].Text, r.stderr)
	}
	os.Remove(filepath.Join(model, "generation_config.json"))

	// Without a terminal, each line is the next turn of one conversation.
	r = runCLIStdin(t, dir, q+"\n\nPeki en kalabalık şehri?\n", "chat", "--model", model, "--max-new-tokens", "12")
	first := answer(converse.Conversation{Turns: []string{q}}, greedy)
	second := answer(converse.Conversation{Turns: []string{q, "Peki en kalabalık şehri?"}, Answers: []string{first}}, greedy)
	if r.code != 0 || r.stdout != first+"\n"+second+"\n" {
		t.Errorf("two turns on stdin: exit %d, stdout %q, want %q then %q\n%s", r.code, r.stdout, first, second, r.stderr)
	}

	// The folder's generation_config.json samples; flags override it.
	writeFile(t, filepath.Join(model, "generation_config.json"), `{"do_sample": true, "top_k": 64, "top_p": 0.95, "eos_token_id": [1, 106]}`)
	sampled := trainer.GenerateOptions{MaxNewTokens: 12, Temperature: 1, TopK: 64, TopP: 0.95, Seed: 9}
	r = runCLI(t, dir, "chat", "--model", model, "--prompt", q, "--max-new-tokens", "12", "--seed", "9")
	r2 := runCLI(t, dir, "chat", "--model", model, "--prompt", q, "--max-new-tokens", "12", "--seed", "9")
	if want := answer(converse.Conversation{Turns: []string{q}}, sampled); r.code != 0 || r.stdout != want+"\n" || r2.stdout != r.stdout {
		t.Errorf("sampled with generation_config.json: %q then %q, want %q\n%s", r.stdout, r2.stdout, want, r.stderr)
	}
	// Asked again after /reset, the same question draws anew.
	r = runCLIStdin(t, dir, q+"\n/reset\n"+q+"\n", "chat", "--model", model, "--max-new-tokens", "12", "--seed", "9")
	again := sampled
	again.Seed++
	want1, want2 := answer(converse.Conversation{Turns: []string{q}}, sampled), answer(converse.Conversation{Turns: []string{q}}, again)
	if r.code != 0 || r.stdout != want1+"\n"+want2+"\n" || want1 == want2 {
		t.Errorf("asked again after /reset: %q, want %q then %q\n%s", r.stdout, want1, want2, r.stderr)
	}
	// top_p 0 in the file keeps the most likely token alone, as
	// transformers does; --top-p overrides it.
	writeFile(t, filepath.Join(model, "generation_config.json"), `{"do_sample": true, "top_k": 64, "top_p": 0.0, "eos_token_id": [1, 106]}`)
	if r := runCLI(t, dir, "chat", "--model", model, "--prompt", q, "--max-new-tokens", "12", "--seed", "9"); r.code != 0 || r.stdout != first+"\n" {
		t.Errorf("top_p 0 in generation_config.json: %q, want the greedy %q\n%s", r.stdout, first, r.stderr)
	}
	if r := runCLI(t, dir, "chat", "--model", model, "--prompt", q, "--max-new-tokens", "12", "--seed", "9", "--top-p", "0.95"); r.code != 0 || r.stdout != want1+"\n" {
		t.Errorf("--top-p 0.95 over the file's top_p 0: %q, want %q\n%s", r.stdout, want1, r.stderr)
	}
	writeFile(t, filepath.Join(model, "generation_config.json"), `{"do_sample": true, "top_k": 64, "top_p": 0.95, "eos_token_id": [1, 106]}`)
	r = runCLI(t, dir, "chat", "--model", model, "--prompt", q, "--max-new-tokens", "12", "--temperature", "0")
	if r.code != 0 || r.stdout != first+"\n" {
		t.Errorf("--temperature 0 over a sampling config: %q, want %q", r.stdout, first)
	}

	r = runCLI(t, dir, "chat", "--help")
	for _, flag := range []string{"--temperature", "--top-k", "--top-p", "--seed", "--max-new-tokens", "--system", "--adapter", "--prompt", "--quantize"} {
		if !strings.Contains(r.stdout, flag) {
			t.Errorf("--help lacks %s", flag)
		}
	}

	notok := filepath.Join(dir, "notok")
	cfgJSON, err := os.ReadFile(filepath.Join(model, "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(notok, "config.json"), string(cfgJSON))
	for _, args := range [][]string{
		{"chat", "--prompt", q},
		{"chat", "--model", model, "--quantize", "int8", "--prompt", q},
		{"chat", "--model", model, "--top-p", "2", "--prompt", q},
		{"chat", "--model", model, "--max-new-tokens", "0", "--prompt", q},
		{"chat", "--model", model, "--prompt", "  "},
		{"chat", "--model", notok, "--prompt", q}, // no tokenizer.json there
	} {
		if r := runCLI(t, dir, args...); r.code != 2 {
			t.Errorf("%v: exit %d, want 2\n%s", args, r.code, r.stderr)
		}
	}
	// Paths that are not there, or not what the flag takes, are named before
	// anything loads.
	for _, c := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"chat", "--model", filepath.Join(dir, "missing"), "--prompt", q}, 2, "--model " + filepath.Join(dir, "missing") + ": no such folder"},
		{[]string{"chat", "--model", model, "--adapter", filepath.Join(dir, "missing"), "--prompt", q}, 2, "--adapter " + filepath.Join(dir, "missing") + ": no such folder"},
		{[]string{"chat", "--model", model, "--tokenizer", filepath.Join(dir, "missing.json"), "--prompt", q}, 2, "--tokenizer " + filepath.Join(dir, "missing.json") + ": no such file"},
		{[]string{"chat", "--model", filepath.Join(model, "config.json"), "--prompt", q}, 2, "is a file, not a folder"},
		{[]string{"chat", "--model", dir, "--prompt", q}, 2, dir + " holds no config.json: " + model + " does: the checkpoint is one folder down"},
		{[]string{"chat", "--model", model, "--tokenizer", model, "--prompt", q}, 2, "is a folder, not a tokenizer.json file"},
		{[]string{"chat", "--model", model, "--tokenizer", filepath.Join(model, "config.json"), "--prompt", q}, 2, "--tokenizer: "},
		{[]string{"chat", "--model", model, "Merhaba", "dünya"}, 2, `chat takes no arguments: to ask one question, --prompt "Merhaba dünya"`},
	} {
		if r := runCLI(t, dir, c.args...); r.code != c.code || !strings.Contains(r.stderr, c.want) {
			t.Errorf("%v: exit %d, want %d saying %q\n%s", c.args, r.code, c.code, c.want, r.stderr)
		}
	}

	// An adapter made for a model of four layers, on one of six.
	other := tinyChatModel(t, filepath.Join(dir, "other"), 4)
	ck, err := trainer.OpenCheckpoint(other)
	if err != nil {
		t.Fatal(err)
	}
	a, err := trainer.NewAdapter(ck.Config, trainer.LoRAConfig{R: 2, Alpha: 4, Targets: trainer.AllModules}, 1)
	if err != nil {
		t.Fatal(err)
	}
	if err := ck.SaveAdapter(filepath.Join(dir, "adapter"), a, trainer.BaseModel{NameOrPath: other}); err != nil {
		t.Fatal(err)
	}
	r = runCLI(t, dir, "chat", "--model", model, "--adapter", filepath.Join(dir, "adapter"), "--prompt", q)
	if r.code != 1 || !strings.Contains(r.stderr, "the adapter was not made for this model") {
		t.Errorf("adapter of another model: exit %d\n%s", r.code, r.stderr)
	}
	r = runCLI(t, dir, "chat", "--model", other, "--adapter", filepath.Join(dir, "adapter"), "--prompt", q, "--max-new-tokens", "3", "--quantize", "nf4")
	if r.code != 0 || r.stdout == "" {
		t.Errorf("adapter on its own model: exit %d %q\n%s", r.code, r.stdout, r.stderr)
	}
	// The folder above an adapter (a qlora entry's layout), and a folder
	// that is no adapter, are named for what they are.
	r = runCLI(t, dir, "chat", "--model", other, "--adapter", dir, "--prompt", q)
	if r.code != 2 || !strings.Contains(r.stderr, "holds no adapter_config.json, but "+filepath.Join(dir, "adapter")+" does") {
		t.Errorf("the folder above the adapter: exit %d\n%s", r.code, r.stderr)
	}
	r = runCLI(t, dir, "chat", "--model", other, "--adapter", other, "--prompt", q)
	if r.code != 2 || !strings.Contains(r.stderr, other+" holds no adapter_config.json: a PEFT adapter folder has") {
		t.Errorf("a model as the adapter: exit %d\n%s", r.code, r.stderr)
	}
}

// TestChatWithCachedEntries: an adapter given as a qlora stage's entry
// decodes through NF4 when it trained so, as the generate stage does; its
// base checked where the cache knows it: another model stage's checkpoint,
// or a merge that holds the adapter already, is refused.
func TestChatWithCachedEntries(t *testing.T) {
	tok := testenv.GemmaFile(t, "tokenizer.json")
	demo := filepath.Join(testenv.RepoRoot(t), "dataset", "demo", "alpaca-tr-demo.jsonl")
	dir := t.TempDir()
	spec := filepath.Join(dir, "s.yaml")
	writeFile(t, spec, fmt.Sprintf(`name: s
stages:
  alpaca: {kind: jsonl, with: {paths: [%s], limit: 8}}
  chat: {kind: chat_template, needs: [alpaca]}
  tokens: {kind: tokenize, needs: [chat], with: {tokenizer: %s}}
  pack: {kind: pack, needs: [tokens], with: {seq_len: 128}}
  base: {kind: model, with: {preset: tiny, seed: 1}}
  other: {kind: model, with: {preset: tiny, seed: 2}}
  adapter: {kind: qlora, needs: [pack, base], with: {r: 2, alpha: 4, batch_size: 1, grad_accum: 1, max_steps: 1, backend: cpu}}
  merged: {kind: merge, needs: [adapter, base]}
  lora: {kind: gguf_lora, needs: [adapter, base], with: {name: tr-lora}}
  onfolder: {kind: qlora, needs: [pack], with: {model: ckpt, r: 2, alpha: 4, batch_size: 1, grad_accum: 1, max_steps: 1, backend: cpu}}
  plain: {kind: qlora, needs: [pack, base], with: {r: 2, alpha: 4, batch_size: 1, grad_accum: 1, max_steps: 1, backend: cpu, quantize: none}}
`, demo, tok))
	// The folder onfolder trains on: base's checkpoint, written apart.
	cfg, _ := trainer.Preset("tiny")
	if err := trainer.WriteRandomCheckpoint(filepath.Join(dir, "ckpt"), cfg, trainer.InitOptions{Seed: 1}); err != nil {
		t.Fatal(err)
	}
	if r := runCLI(t, dir, "run", spec, "--progress", "none"); r.code != 0 {
		t.Fatalf("run: %d\n%s", r.code, r.stderr)
	}
	root := filepath.Join(dir, "cache")
	adapter := filepath.Join(entryOf(t, root, "adapter"), "adapter")
	chatWith := func(model string, extra ...string) cliResult {
		return runCLI(t, dir, append([]string{"chat", "--model", model, "--adapter", adapter, "--tokenizer", tok, "--backend", "cpu", "--prompt", "Merhaba", "--max-new-tokens", "2"}, extra...)...)
	}
	r := chatWith(entryOf(t, root, "base"))
	if r.code != 0 || !strings.Contains(r.stderr, "decoding through NF4") {
		t.Errorf("on its base: exit %d\n%s", r.code, r.stderr)
	}
	// As a shell completes the folder.
	if r := runCLI(t, dir, "chat", "--model", entryOf(t, root, "base")+"/", "--adapter", adapter+"/", "--tokenizer", tok, "--backend", "cpu", "--prompt", "Merhaba", "--max-new-tokens", "2"); r.code != 0 || !strings.Contains(r.stderr, "decoding through NF4") {
		t.Errorf("folders ending in /: exit %d\n%s", r.code, r.stderr)
	}
	// An adapter trained on a folder: known by the checkpoint's digests.
	onFolder := filepath.Join(entryOf(t, root, "onfolder"), "adapter")
	for model, ok := range map[string]bool{entryOf(t, root, "base"): true, entryOf(t, root, "other"): false} {
		r := runCLI(t, dir, "chat", "--model", model, "--adapter", onFolder, "--tokenizer", tok, "--backend", "cpu", "--prompt", "Merhaba", "--max-new-tokens", "2")
		if ok != (r.code == 0) || !ok && !strings.Contains(r.stderr, "an adapter for another base") {
			t.Errorf("a folder's adapter on %s: exit %d\n%s", model, r.code, r.stderr)
		}
	}
	if r := chatWith(entryOf(t, root, "base"), "--quantize", "none"); r.code != 0 || strings.Contains(r.stderr, "NF4") {
		t.Errorf("--quantize none: exit %d\n%s", r.code, r.stderr)
	}
	if r := chatWith(entryOf(t, root, "other")); r.code != 2 || !strings.Contains(r.stderr, "an adapter for another base") {
		t.Errorf("on another model stage's checkpoint: exit %d\n%s", r.code, r.stderr)
	}
	if r := chatWith(filepath.Join(entryOf(t, root, "merged"), "model")); r.code != 2 || !strings.Contains(r.stderr, "its weights hold the adapter already") {
		t.Errorf("on its own merge: exit %d\n%s", r.code, r.stderr)
	}
	// Copies of the checkpoints outside the cache: known by their digests
	// too, unless --other-base asks for the base given.
	for _, stage := range []string{"base", "other"} {
		copyCheckpoint(t, entryOf(t, root, stage), filepath.Join(dir, stage+"-copy"))
	}
	for _, c := range []struct {
		model, adapter string
		extra          []string
		ok             bool
	}{
		{"base-copy", adapter, nil, true},
		{"other-copy", adapter, nil, false},
		{"other-copy", adapter, []string{"--other-base"}, true},
		{"ckpt", onFolder, nil, true},
		{"other-copy", onFolder, nil, false},
	} {
		r := runCLI(t, dir, append([]string{"chat", "--model", c.model, "--adapter", c.adapter, "--tokenizer", tok, "--backend", "cpu", "--prompt", "Merhaba", "--max-new-tokens", "2"}, c.extra...)...)
		if c.ok != (r.code == 0) || !c.ok && (r.code != 2 || !strings.Contains(r.stderr, "is another checkpoint (its model.safetensors differs): an adapter for another base; --other-base")) {
			t.Errorf("%s's adapter on %s %v: exit %d\n%s", filepath.Base(filepath.Dir(c.adapter)), c.model, c.extra, r.code, r.stderr)
		}
	}
	// merge and loss check the base as chat does.
	rows := filepath.Join(dir, "rows.jsonl")
	if r := runCLI(t, dir, "export", spec, "pack", "--out", rows); r.code != 0 {
		t.Fatalf("export pack: %d\n%s", r.code, r.stderr)
	}
	for _, c := range []struct {
		args []string
		ok   bool
	}{
		{[]string{"merge", "--model", "other-copy", "--adapter", adapter, "--tokenizer", filepath.Dir(tok), "--out", "m1"}, false},
		{[]string{"merge", "--model", "other-copy", "--adapter", adapter, "--tokenizer", filepath.Dir(tok), "--out", "m2", "--other-base"}, true},
		{[]string{"merge", "--model", "base-copy", "--adapter", adapter, "--tokenizer", filepath.Dir(tok), "--out", "m3"}, true},
		{[]string{"loss", "--model", "other-copy", "--adapter", adapter, "--data", rows, "--backend", "cpu"}, false},
		{[]string{"loss", "--model", "other-copy", "--adapter", adapter, "--data", rows, "--backend", "cpu", "--other-base"}, true},
	} {
		r := runCLI(t, dir, c.args...)
		if c.ok != (r.code == 0) || !c.ok && (r.code != 2 || !strings.Contains(r.stderr, "an adapter for another base; --other-base")) {
			t.Errorf("%v: exit %d\n%s", c.args, r.code, r.stderr)
		}
	}
	// loss scores an adapter trained on NF4 through NF4, as the eval stage
	// does, unless told otherwise.
	lossOf := func(extra ...string) (string, cliResult) {
		r := runCLI(t, dir, append([]string{"loss", "--model", "base-copy", "--adapter", adapter, "--data", rows, "--backend", "cpu"}, extra...)...)
		if r.code != 0 {
			t.Fatalf("loss %v: exit %d\n%s", extra, r.code, r.stderr)
		}
		return r.stdout, r
	}
	byDefault, r := lossOf()
	if nf4, _ := lossOf("--quantize", "nf4"); byDefault != nf4 || !strings.Contains(r.stderr, "scoring through NF4") {
		t.Errorf("loss of an adapter trained on NF4: %s by default, %s with --quantize nf4\n%s", byDefault, nf4, r.stderr)
	}
	if none, _ := lossOf("--quantize", "none"); none == byDefault {
		t.Errorf("loss --quantize none: %s, the same as through NF4", none)
	}
	if r := runCLI(t, dir, "merge", "--model", "base-copy", "--adapter", filepath.Dir(adapter), "--tokenizer", filepath.Dir(tok), "--out", "m4"); r.code != 2 || !strings.Contains(r.stderr, "holds no adapter_config.json, but "+adapter+" does") {
		t.Errorf("merge --adapter of the entry above the adapter: exit %d\n%s", r.code, r.stderr)
	}
	// An adapter trained on the stored weights merges into them, and
	// --base dequantized is warned of.
	plain := filepath.Join(entryOf(t, root, "plain"), "adapter")
	if r := runCLI(t, dir, "merge", "--model", "base-copy", "--adapter", plain, "--out", "m7"); r.code != 0 || !strings.Contains(r.stderr, "merging into the original weights") {
		t.Errorf("merge of a quantize: none adapter: exit %d\n%s", r.code, r.stderr)
	}
	if r := runCLI(t, dir, "merge", "--model", "base-copy", "--adapter", plain, "--out", "m8", "--base", "dequantized"); r.code != 0 || !strings.Contains(r.stderr, "--base dequantized merges it into the NF4 round trip") {
		t.Errorf("merge --base dequantized of a quantize: none adapter: exit %d\n%s", r.code, r.stderr)
	}
	// The tokenizer the adapter's data was tokenized with, found in the
	// cache as the merge stage finds it.
	if r := runCLI(t, dir, "merge", "--model", "base-copy", "--adapter", adapter, "--out", "m6"); r.code != 0 || !strings.Contains(r.stderr, "the tokenizer the adapter's training data was tokenized with: "+tok) {
		t.Errorf("merge without --tokenizer: exit %d\n%s", r.code, r.stderr)
	} else if a, b := readAll(t, filepath.Join(dir, "m6", "tokenizer.json")), readAll(t, tok); !bytes.Equal(a, b) {
		t.Error("merge without --tokenizer: another tokenizer.json in the merged folder")
	}
	if r := runCLI(t, dir, "merge", "--model", "base-copy", "--adapter", adapter, "--tokenizer", filepath.Dir(tok), "--out", "m5", "--base", "original"); r.code != 0 || !strings.Contains(r.stderr, "--base original merges it into the original weights") {
		t.Errorf("merge --base original of an adapter trained on NF4: exit %d\n%s", r.code, r.stderr)
	}
	if r := runCLI(t, dir, "merge", "--model", "base-copy", "--adapter", adapter, "--tokenizer", filepath.Dir(tok), "--out", filepath.Join(filepath.Dir(adapter), "merged")); r.code != 2 || !strings.Contains(r.stderr, "is inside the cache entry "+filepath.Dir(adapter)) {
		t.Errorf("merge --out inside the adapter's entry: exit %d\n%s", r.code, r.stderr)
	}

	// The adapter exports as its PEFT folder, file for file; not as GGUF.
	out := filepath.Join(dir, "tr-adapter")
	if r := runCLI(t, dir, "export", spec, "adapter", "--out", out); r.code != 0 {
		t.Fatalf("export adapter: %d\n%s", r.code, r.stderr)
	}
	for _, name := range []string{trainer.AdapterConfigFile, trainer.AdapterWeightsFile} {
		got, _ := os.ReadFile(filepath.Join(out, name))
		want, _ := os.ReadFile(filepath.Join(adapter, name))
		if len(want) == 0 || !bytes.Equal(got, want) {
			t.Errorf("exported %s differs from the entry's", name)
		}
	}
	if r := runCLI(t, dir, "export", spec, "adapter", "--out", "a.gguf"); r.code != 2 || !strings.Contains(r.stderr, "holds a PEFT adapter, which exports with --format hf") {
		t.Errorf("export adapter as GGUF: %d\n%s", r.code, r.stderr)
	}
	// A gguf_lora stage's file exports as it is, by a .gguf name or none.
	for _, name := range []string{"lora.gguf", "lora-copy"} {
		if r := runCLI(t, dir, "export", spec, "lora", "--out", name); r.code != 0 {
			t.Fatalf("export lora --out %s: %d\n%s", name, r.code, r.stderr)
		}
		got, _ := os.ReadFile(filepath.Join(dir, name))
		want, _ := os.ReadFile(filepath.Join(entryOf(t, root, "lora"), "tr-lora.f32.gguf"))
		if len(want) == 0 || !bytes.Equal(got, want) {
			t.Errorf("export lora --out %s: not the stage's file", name)
		}
	}
}

// TestChatFromTheHub: --model and --tokenizer may name repositories on the
// Hub; the answer is the one of the same files on disk.
func TestChatFromTheHub(t *testing.T) {
	srv, dir := testHub(t)
	model := tinyChatModel(t, filepath.Join(dir, "model"), 6)
	files := map[string][]byte{}
	ents, _ := os.ReadDir(model)
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(model, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		files[e.Name()] = b
	}
	srv.AddRepo("model", "acme/gemma-3-tiny-tr").Commit("main", files)
	const q = "Merhaba!"
	local := runCLI(t, dir, "chat", "--model", model, "--prompt", q, "--max-new-tokens", "6")
	remote := runCLI(t, dir, "chat", "--model", "hf://acme/gemma-3-tiny-tr", "--tokenizer", "hf://acme/gemma-3-tiny-tr/tokenizer.json",
		"--prompt", q, "--max-new-tokens", "6")
	if local.code != 0 || remote.code != 0 || local.stdout != remote.stdout {
		t.Errorf("from the Hub: %d %q %s; local %q", remote.code, remote.stdout, remote.stderr, local.stdout)
	}
}

// firstBytes is a child's stdout that says when something came. (Not a
// bytes.Buffer by embedding: io.Copy would use its ReadFrom, not Write.)
type firstBytes struct {
	buf   bytes.Buffer
	once  sync.Once
	begun chan struct{}
}

func (f *firstBytes) Write(p []byte) (int, error) {
	f.once.Do(func() { close(f.begun) })
	return f.buf.Write(p)
}

func (f *firstBytes) String() string { return f.buf.String() }

// TestChatEnds: for a script, SIGINT ends the command (status 130) once the
// answer so far is printed, piped or with --prompt; an answer that the
// model's context cuts says so, and a conversation past it is refused
// without a terminal's /reset hint; an answer that cannot be written fails.
func TestChatEnds(t *testing.T) {
	dir := t.TempDir()
	model := tinyChatModel(t, filepath.Join(dir, "model"), 6)
	_, _, gen := tinyGenerator(t, model)
	const q = "Türkiye'nin başkenti neresidir?"
	long, err := gen.Reply(context.Background(), []converse.Conversation{{Turns: []string{q}}}, trainer.GenerateOptions{MaxNewTokens: 300}, nil)
	if err != nil || long[0].Stopped {
		t.Fatalf("the greedy answer should run past 300 tokens: %v %+v", err, long)
	}
	for name, c := range map[string]struct {
		stdin string
		args  []string
	}{
		"--prompt": {"", []string{"--prompt", q}},
		"piped":    {q + "\n" + q + "\n", nil},
	} {
		args := append([]string{"chat", "--model", model, "--max-new-tokens", "100000"}, c.args...)
		cmd := exec.Command(os.Args[0], args...)
		cmd.Env = append(os.Environ(), "PIPELINE_CLI=1")
		out, errb := &firstBytes{begun: make(chan struct{})}, &bytes.Buffer{}
		cmd.Stdin, cmd.Stdout, cmd.Stderr = strings.NewReader(c.stdin), out, errb
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		select { // the answer has begun
		case <-out.begun:
		case <-time.After(time.Minute):
			t.Errorf("%s: no answer after a minute", name)
		}
		cmd.Process.Signal(os.Interrupt)
		code := exitCode(t, cmd, time.Minute)
		if code != 130 || strings.Count(out.String(), "\n") != 1 || !strings.HasSuffix(out.String(), "\n") ||
			!strings.HasPrefix(long[0].Text, strings.TrimSpace(out.String())[:1]) {
			t.Errorf("%s, SIGINT during the answer: exit %d, stdout %q, stderr %s", name, code, out.String(), errb.String())
		}
	}

	// The context: 48 positions.
	small := filepath.Join(dir, "small")
	if err := os.CopyFS(small, os.DirFS(model)); err != nil {
		t.Fatal(err)
	}
	cfg, err := os.ReadFile(filepath.Join(model, "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(small, "config.json"), strings.Replace(string(cfg), `"max_position_embeddings": 131072`, `"max_position_embeddings": 48`, 1))
	text, err := converse.Conversation{Turns: []string{q}}.Prompt()
	if err != nil {
		t.Fatal(err)
	}
	ids, err := gen.Encode(text)
	if err != nil {
		t.Fatal(err)
	}
	want, err := gen.Reply(context.Background(), []converse.Conversation{{Turns: []string{q}}}, trainer.GenerateOptions{MaxNewTokens: 48 - len(ids)}, nil)
	if err != nil {
		t.Fatal(err)
	}
	r := runCLI(t, dir, "chat", "--model", small, "--prompt", q, "--max-new-tokens", "100")
	if r.code != 0 || r.stdout != want[0].Text+"\n" || !strings.Contains(r.stderr, "(cut at the end of the model's context, 48 positions)") {
		t.Errorf("an answer the context cuts: exit %d, stdout %q (want %q), stderr %s", r.code, r.stdout, want[0].Text, r.stderr)
	}
	r = runCLI(t, dir, "chat", "--model", small, "--prompt", strings.Repeat(q+" ", 8))
	if r.code != 1 || !strings.Contains(r.stderr, "beyond the model's context of 48 positions") || strings.Contains(r.stderr, "/reset") {
		t.Errorf("a prompt past the context: exit %d, %s", r.code, r.stderr)
	}
	// A script's conversation that fills the context is told of the
	// /reset line, which starts the next one afresh.
	piped := func(stdin string) cliResult {
		return runCLIStdin(t, dir, stdin, "chat", "--model", small, "--max-new-tokens", "100")
	}
	if r := piped(q + "\n" + q + "\n"); r.code != 1 || !strings.Contains(r.stderr, "beyond the model's context of 48 positions; a line /reset in the input starts a new conversation") {
		t.Errorf("a script's second turn past the context: exit %d, %s", r.code, r.stderr)
	}
	if r := piped(q + "\n/reset\n" + q + "\n"); r.code != 0 || r.stdout != want[0].Text+"\n"+want[0].Text+"\n" {
		t.Errorf("a script's /reset: exit %d, stdout %q, %s", r.code, r.stdout, r.stderr)
	}

	if _, err := os.Stat("/dev/full"); err == nil {
		full, err := os.OpenFile("/dev/full", os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer full.Close()
		cmd := exec.Command(os.Args[0], "chat", "--model", model, "--prompt", q, "--max-new-tokens", "3")
		cmd.Env = append(os.Environ(), "PIPELINE_CLI=1")
		cmd.Stdout = full
		var errb bytes.Buffer
		cmd.Stderr = &errb
		err = cmd.Run()
		if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 || !strings.Contains(errb.String(), "writing the answer") {
			t.Errorf("stdout on a full disk: %v, %s", err, errb.String())
		}
	}
}

// TestChatChecksFirst: flags, generation_config.json's values and the
// tokenizer are checked by name before the model loads; without --seed
// each run samples anew.
func TestChatChecksFirst(t *testing.T) {
	dir := t.TempDir()
	model := tinyChatModel(t, filepath.Join(dir, "model"), 2)
	const q = "Merhaba!"
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--top-p", "0"}, "--top-p 0 would keep only the most likely token"},
		{[]string{"--top-p", "1.5"}, "--top-p 1.5: must be in (0, 1]"},
		{[]string{"--temperature", "-1"}, "--temperature -1: must be 0 (greedy) or a positive finite number"},
		{[]string{"--top-k", "-2"}, "--top-k -2: must not be negative"},
		{[]string{"--backend", "gpu"}, `--backend "gpu": want auto, cpu or cuda`},
		{[]string{"--temperature", "0", "--top-k", "5"}, "--top-k applies only when sampling, and --temperature 0 decodes greedily"},
		{[]string{"--temperature", "inf"}, "--temperature +Inf: must be 0 (greedy) or a positive finite number"},
		{[]string{"--seed", "-1"}, `invalid argument "-1" for "--seed" flag: want a whole number, 0 or more`},
		{[]string{"--max-new-tokens", "many"}, `invalid argument "many" for "--max-new-tokens" flag: want a whole number`},
	} {
		r := runCLI(t, dir, append([]string{"chat", "--model", model, "--prompt", q}, c.args...)...)
		if r.code != 2 || !strings.Contains(r.stderr, c.want) {
			t.Errorf("%v: exit %d, want 2 saying %q: %s", c.args, r.code, c.want, r.stderr)
		}
	}

	gcPath := filepath.Join(model, "generation_config.json")
	writeFile(t, gcPath, `{"do_sample": true, "top_p": 2}`)
	r := runCLI(t, dir, "chat", "--model", model, "--prompt", q, "--max-new-tokens", "2")
	if r.code != 1 || !strings.Contains(r.stderr, gcPath+": top_p 2") {
		t.Errorf("top_p 2 in generation_config.json: exit %d, %s", r.code, r.stderr)
	}
	if r := runCLI(t, dir, "chat", "--model", model, "--prompt", q, "--max-new-tokens", "2", "--top-p", "0.9"); r.code != 0 {
		t.Errorf("--top-p over the file's: exit %d, %s", r.code, r.stderr)
	}
	if r := runCLI(t, dir, "chat", "--model", model, "--prompt", q, "--max-new-tokens", "2", "--temperature", "0"); r.code != 0 {
		t.Errorf("--temperature 0 (greedy reads no top_p): exit %d, %s", r.code, r.stderr)
	}
	writeFile(t, gcPath, `{"do_sample": true, "top_k": 64, "top_p": 0.95}`)
	a := runCLI(t, dir, "chat", "--model", model, "--prompt", q, "--max-new-tokens", "12")
	b := runCLI(t, dir, "chat", "--model", model, "--prompt", q, "--max-new-tokens", "12")
	if a.code != 0 || b.code != 0 || a.stdout == b.stdout {
		t.Errorf("two sampled runs without --seed: %q and %q (%s %s)", a.stdout, b.stdout, a.stderr, b.stderr)
	}
	os.Remove(gcPath)

	// A tokenizer without Gemma 3's turn tokens, and one whose vocabulary
	// the model's embedding lacks.
	data, err := os.ReadFile(filepath.Join(model, "tokenizer.json"))
	if err != nil {
		t.Fatal(err)
	}
	other := filepath.Join(dir, "other.json")
	writeFile(t, other, strings.ReplaceAll(string(data), "<end_of_turn>", "<end_of_talk>"))
	r = runCLI(t, dir, "chat", "--model", model, "--tokenizer", other, "--prompt", q)
	if r.code != 2 || !strings.Contains(r.stderr, "the tokenizer has no <end_of_turn> token") {
		t.Errorf("a tokenizer without <end_of_turn>: exit %d, %s", r.code, r.stderr)
	}
	cfg, err := os.ReadFile(filepath.Join(model, "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(model, "config.json"), strings.Replace(string(cfg), `"vocab_size": 262144`, `"vocab_size": 200000`, 1))
	r = runCLI(t, dir, "chat", "--model", model, "--prompt", q)
	if r.code != 1 || !strings.Contains(r.stderr, "the tokenizer's vocabulary has 262144 tokens, the model's 200000") {
		t.Errorf("a model of a smaller vocabulary: exit %d, %s", r.code, r.stderr)
	}
}

// copyCheckpoint copies the checkpoint files of a model stage's entry into
// a new folder, as a user copies a model out of the cache.
func copyCheckpoint(t *testing.T, entry, dst string) {
	t.Helper()
	names, _ := filepath.Glob(filepath.Join(entry, "*.json"))
	weights, _ := filepath.Glob(filepath.Join(entry, "*.safetensors"))
	os.MkdirAll(dst, 0o755)
	for _, src := range append(names, weights...) {
		if filepath.Base(src) == "manifest.json" {
			continue
		}
		b, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		writeFile(t, filepath.Join(dst, filepath.Base(src)), string(b))
	}
}
