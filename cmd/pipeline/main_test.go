package main

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"gemmaft/dataset"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"gemmaft/cuda"
	"gemmaft/gguf"
	"gemmaft/internal/dirsum"
	"gemmaft/internal/testenv"
	"gemmaft/pipeline"
	"gemmaft/trainer"
)

// The tests run the CLI as a child process (this test binary with
// PIPELINE_CLI set), the way users and cron run it.

func TestMain(m *testing.M) {
	if os.Getenv("PIPELINE_CLI") != "" {
		os.Exit(execute(os.Args[1:]))
	}
	if out := os.Getenv("PIPELINE_TEST_FILL_FOREVER"); out != "" {
		os.Exit(fillForever(out))
	}
	os.Exit(m.Run())
}

type cliResult struct {
	stdout, stderr string
	code           int
}

func runCLI(t *testing.T, dir string, args ...string) cliResult {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "PIPELINE_CLI=1", "PIPELINE_CACHE="+filepath.Join(dir, "cache"))
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

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

const sampleJSONL = `{"instruction": "Türkiye'nin başkenti neresidir?", "input": "", "output": "Ankara."}
{"instruction": "Topla", "input": "2 ve 3", "output": "5"}
{"instruction": "Bir renk söyle", "input": "", "output": "Mavi."}
`

// TestPreprocessWithoutModel: `run --until` the data stages of a DAG whose
// training stage names a model this machine does not have runs them; the
// whole DAG is refused, naming the model.
func TestPreprocessWithoutModel(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "data.jsonl"), sampleJSONL)
	spec := filepath.Join(dir, "d.yaml")
	writeFile(t, spec, `name: x
stages:
  alpaca: {kind: jsonl, with: {paths: [data.jsonl]}}
  chat: {kind: chat_template, needs: [alpaca], with: {template: gemma3}}
  tokens: {kind: tokenize, needs: [chat], with: {tokenizer: `+testenv.GemmaFile(t, "tokenizer.json")+`}}
  pack: {kind: pack, needs: [tokens], with: {seq_len: 64}}
  adapter: {kind: qlora, needs: [pack], with: {model: ../models/gemma-3-12b-it}}
`)
	if r := runCLI(t, dir, "run", spec, "--until", "pack"); r.code != 0 {
		t.Fatalf("run --until pack: exit %d\n%s", r.code, r.stderr)
	}
	if r := runCLI(t, dir, "status", spec); r.code != 0 || !strings.Contains(r.stdout, "adapter is unavailable") || !strings.Contains(r.stdout, "gemma-3-12b-it does not exist") {
		t.Errorf("status: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	if r := runCLI(t, dir, "run", spec); r.code != 2 || !strings.Contains(r.stderr, "gemma-3-12b-it does not exist") {
		t.Errorf("run: exit %d\n%s", r.code, r.stderr)
	}
}

// tokensSpec writes sampleJSONL and a spec that reads it through the chat
// template and the Gemma 3 tokenizer (stage tokens), then stages, into dir,
// and returns the spec's path.
func tokensSpec(t *testing.T, dir, stages string) string {
	t.Helper()
	writeFile(t, filepath.Join(dir, "data.jsonl"), sampleJSONL)
	spec := filepath.Join(dir, "s.yaml")
	writeFile(t, spec, `name: x
stages:
  alpaca: {kind: jsonl, with: {paths: [data.jsonl]}}
  chat: {kind: chat_template, needs: [alpaca]}
  tokens: {kind: tokenize, needs: [chat], with: {tokenizer: `+testenv.GemmaFile(t, "tokenizer.json")+`}}
`+stages)
	return spec
}

// TestInspectDecode: inspect --decode shows token and packed rows as the
// text the chat template made, the trained tokens (the answers and their
// <end_of_turn>) between the marks and nothing else, a packed row's
// examples one by one; stages without token rows are refused.
func TestInspectDecode(t *testing.T) {
	dir := t.TempDir()
	spec := tokensSpec(t, dir, `  pack: {kind: pack, needs: [tokens], with: {seq_len: 128}}
  mix: {kind: mix, needs: [tokens], with: {heldout: 0.5, seed: 1}}
`)
	if r := runCLI(t, dir, "run", spec); r.code != 0 {
		t.Fatalf("run: exit %d\n%s", r.code, r.stderr)
	}
	// A mix's rows say their source, and which are held out of training.
	if r := runCLI(t, dir, "inspect", spec, "mix", "--decode", "--rows", "3"); r.code != 0 || strings.Count(r.stdout, "trained, from tokens") != 3 || !strings.Contains(r.stdout, "from tokens, held out of training\n") {
		t.Errorf("inspect mix --decode: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	r := runCLI(t, dir, "inspect", spec, "tokens", "--decode", "--rows", "1")
	want := "<bos><start_of_turn>user\nTürkiye'nin başkenti neresidir?<end_of_turn>\n<start_of_turn>model\n⟦Ankara.<end_of_turn>⟧\n"
	if r.code != 0 || !strings.Contains(r.stdout, want) || strings.Count(r.stdout, "⟦") != 1 {
		t.Errorf("inspect tokens --decode: exit %d\n%s%s\nwant %q", r.code, r.stdout, r.stderr, want)
	}
	r = runCLI(t, dir, "inspect", spec, "pack", "--decode")
	if r.code != 0 || !strings.Contains(r.stdout, "3 examples") || !strings.Contains(r.stdout, "─── example 3") || !strings.Contains(r.stdout, "⟦Mavi.<end_of_turn>⟧") {
		t.Errorf("inspect pack --decode: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	if r := runCLI(t, dir, "inspect", spec, "chat", "--decode"); r.code != 2 || !strings.Contains(r.stderr, "stage chat is a chat_template stage: inspect it without --decode") {
		t.Errorf("inspect chat --decode: exit %d\n%s", r.code, r.stderr)
	}
	if r := runCLI(t, dir, "inspect", spec, "pack", "--tokenizer", "x.json"); r.code != 2 || !strings.Contains(r.stderr, "give --decode too") {
		t.Errorf("--tokenizer without --decode: exit %d\n%s", r.code, r.stderr)
	}
}

// TestUnstartedRunIsRecorded: a nightly run that a missing data file stops
// before it begins says so where nights are watched: --report, status and
// the run history (the record of the night before used to stand), and gc
// still keeps what the last good run made. A spec never run leaves its
// report and no cache.
func TestUnstartedRunIsRecorded(t *testing.T) {
	dir := t.TempDir()
	data := filepath.Join(dir, "data.jsonl")
	writeFile(t, data, sampleJSONL)
	spec := filepath.Join(dir, "s.yaml")
	writeFile(t, spec, "name: s\nstages:\n  src: {kind: jsonl, with: {paths: [data.jsonl]}}\n  chat: {kind: chat_template, needs: [src]}\n")
	report := filepath.Join(dir, "last.json")
	readReport := func() pipeline.RunRecord {
		t.Helper()
		var rec pipeline.RunRecord
		b, err := os.ReadFile(report)
		if err := errors.Join(err, json.Unmarshal(b, &rec)); err != nil {
			t.Fatal(err)
		}
		return rec
	}
	// Never run, no cache: the report only.
	other := t.TempDir()
	if r := runCLI(t, other, "run", spec, "--report", report, "--cache", filepath.Join(other, "c")); r.code != 0 {
		t.Fatalf("first run: exit %d\n%s", r.code, r.stderr)
	}
	os.Remove(data)
	if r := runCLI(t, dir, "run", spec, "--report", report); r.code != 2 || !strings.Contains(r.stderr, `no file matches "data.jsonl"`) {
		t.Fatalf("run without its data: exit %d\n%s", r.code, r.stderr)
	}
	if rec := readReport(); rec.OK || !strings.Contains(rec.Error, `no file matches "data.jsonl"`) {
		t.Errorf("report of a run without a cache: %+v", rec)
	}
	if _, err := os.Stat(filepath.Join(dir, "cache")); err == nil {
		t.Error("a run that did not begin made a cache")
	}

	writeFile(t, data, sampleJSONL)
	if r := runCLI(t, dir, "run", spec, "--report", report); r.code != 0 || !readReport().OK {
		t.Fatalf("run: exit %d\n%s", r.code, r.stderr)
	}
	// status says why an entry is missing, as plan does.
	writeFile(t, data, sampleJSONL+`{"instruction": "Yeni", "input": "", "output": "Evet."}`+"\n")
	if r := runCLI(t, dir, "status", spec); !strings.Contains(r.stdout, "src is missing: file content changed: "+data) || !strings.Contains(r.stdout, "chat is missing: input src changed") {
		t.Errorf("status after the data changed:\n%s", r.stdout)
	}
	os.Remove(data)
	if r := runCLI(t, dir, "run", spec, "--report", report); r.code != 2 {
		t.Fatalf("run without its data: exit %d\n%s", r.code, r.stderr)
	}
	rec := readReport()
	if rec.OK || !strings.Contains(rec.Error, `no file matches "data.jsonl"`) || len(rec.Stages) != 2 || rec.Stages[0].State != "failed" || rec.Stages[1].State != "canceled" {
		t.Errorf("report: %+v", rec)
	}
	if r := runCLI(t, dir, "status", spec); !strings.Contains(r.stdout, "last run: ") || !strings.Contains(r.stdout, `FAILED: `+spec) {
		t.Errorf("status after the night without data:\n%s", r.stdout)
	}
	if r := runCLI(t, dir, "report", spec, "--out", "-"); !strings.Contains(r.stdout, `no file matches &#34;data.jsonl&#34;`) {
		t.Errorf("the HTML report does not show the failure:\n%.2000s", r.stdout)
	}
	if r := runCLI(t, dir, "gc", "--keep-last", "1"); r.code != 0 || !strings.Contains(r.stdout, "removed 0 entries") {
		t.Errorf("gc --keep-last 1 after the failed night: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	// A spec that does not load replaces the report too.
	writeFile(t, data, sampleJSONL)
	if r := runCLI(t, dir, "run", spec, "--report", report); r.code != 0 || !readReport().OK {
		t.Fatalf("run: exit %d\n%s", r.code, r.stderr)
	}
	writeFile(t, spec, "name: s\nstages:\n  src: {kind: jsonl, with: {pathz: [data.jsonl]}}\n")
	if r := runCLI(t, dir, "run", spec, "--report", report); r.code != 2 {
		t.Fatalf("run of a broken spec: exit %d\n%s", r.code, r.stderr)
	}
	if rec := readReport(); rec.OK || rec.Spec != spec || !strings.Contains(rec.Error, `unknown parameter "pathz"`) {
		t.Errorf("report of a broken spec: %+v", rec)
	}
}

// TestCacheFlagWhereUsed: --cache shows in the help of the commands that
// use the cache and not in the others', where giving it is said to do
// nothing.
func TestCacheFlagWhereUsed(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []string{"run", "plan", "status", "report", "verify", "gc", "inspect", "export"} {
		if r := runCLI(t, dir, c, "--help"); !strings.Contains(r.stdout, "--cache") {
			t.Errorf("%s --help does not show --cache", c)
		}
	}
	for _, c := range [][]string{{"tokenize"}, {"chat"}, {"loss"}, {"merge"}, {"doctor"}, {"bench", "train"}} {
		if r := runCLI(t, dir, append(c, "--help")...); strings.Contains(r.stdout, "--cache") || !strings.Contains(r.stdout, "--log-level") {
			t.Errorf("%v --help:\n%s", c, r.stdout)
		}
	}
	if r := runCLI(t, dir, "--cache", filepath.Join(dir, "c"), "doctor"); !strings.Contains(r.stderr, "pipeline doctor uses no cache: --cache does nothing here") {
		t.Errorf("doctor --cache:\n%s", r.stderr)
	}
	if r := runCLI(t, dir, "--cache", filepath.Join(dir, "c"), "gc"); strings.Contains(r.stderr, "does nothing") {
		t.Errorf("gc --cache:\n%s", r.stderr)
	}
	// A bad --log-format or --log-level is refused by every command, not
	// only by those that log.
	for _, args := range [][]string{{"--log-format", "xml", "doctor"}, {"--log-level", "verbose", "doctor"}, {"--log-format", "xml", "status", "x.yaml"}} {
		if r := runCLI(t, dir, args...); r.code != 2 || !strings.Contains(r.stderr, args[1]) {
			t.Errorf("%v: exit %d\n%s", args, r.code, r.stderr)
		}
	}
}

// TestLookingMakesNoCache: plan, status and report of a spec never run,
// or through a mistyped --cache, show an empty cache and say it does not
// exist, without creating it.
func TestLookingMakesNoCache(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "data.jsonl"), sampleJSONL)
	spec := filepath.Join(dir, "s.yaml")
	writeFile(t, spec, "name: s\nstages:\n  src: {kind: jsonl, with: {paths: [data.jsonl]}}\n")
	for _, args := range [][]string{{"plan", spec}, {"status", spec}, {"report", spec, "--out", "-"}, {"plan", spec, "--cache", filepath.Join(dir, "typo")}} {
		r := runCLI(t, dir, args...)
		if r.code != 0 || !strings.Contains(r.stderr, "does not exist yet: nothing has run with it") {
			t.Errorf("%v: exit %d\n%s", args, r.code, r.stderr)
		}
		for _, c := range []string{"cache", "typo"} {
			if _, err := os.Stat(filepath.Join(dir, c)); err == nil {
				t.Fatalf("%v made %s", args, c)
			}
		}
	}
	if r := runCLI(t, dir, "status", spec); !strings.Contains(r.stdout, "missing") {
		t.Errorf("status of a cache never made:\n%s", r.stdout)
	}
	// A folder made for the cache (a volume mounted for it) is an empty
	// cache too, not "no cache".
	empty := filepath.Join(dir, "volume")
	os.Mkdir(empty, 0o755)
	for _, cmd := range []string{"plan", "status"} {
		if r := runCLI(t, dir, cmd, spec, "--cache", empty); r.code != 0 || !strings.Contains(r.stderr, "is an empty folder: nothing has run with it") {
			t.Errorf("%s of an empty folder: exit %d\n%s", cmd, r.code, r.stderr)
		}
	}
	if des, _ := os.ReadDir(empty); len(des) != 0 {
		t.Errorf("looking wrote into the empty cache folder: %v", des)
	}
}

// TestPlanOnlyAsRun: plan --only refuses, as run --only does, a stage
// whose input is not cached.
func TestPlanOnlyAsRun(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "data.jsonl"), sampleJSONL)
	spec := filepath.Join(dir, "s.yaml")
	writeFile(t, spec, "name: s\nstages:\n  src: {kind: jsonl, with: {paths: [data.jsonl]}}\n  chat: {kind: chat_template, needs: [src]}\n")
	for _, cmd := range []string{"plan", "run"} {
		if r := runCLI(t, dir, cmd, spec, "--only", "chat"); r.code != 2 || !strings.Contains(r.stderr, `stage "chat" needs "src", which is not cached`) {
			t.Errorf("%s --only chat: exit %d\n%s", cmd, r.code, r.stderr)
		}
		// A --force the selection leaves out is said to do nothing.
		if r := runCLI(t, dir, cmd, spec, "--until", "src", "--force", "chat"); r.code != 0 || !strings.Contains(r.stderr, "--force chat does nothing: stage chat is not part of this run") {
			t.Errorf("%s --until src --force chat: exit %d\n%s", cmd, r.code, r.stderr)
		}
	}
	if r := runCLI(t, dir, "gc", "--older-than", "1m", "--dry-run"); r.code != 0 || !strings.Contains(r.stderr, "(minutes); a month is 30d") {
		t.Errorf("gc --older-than 1m: exit %d\n%s", r.code, r.stderr)
	}
}

func TestSpecErrorsExit2(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "data.jsonl"), sampleJSONL)
	cases := map[string]struct {
		spec string
		want string
	}{
		"unknown kind":  {"name: x\nstages:\n  a: {kind: parquett, with: {paths: [data.jsonl]}}\n", `:3:`},
		"unknown key":   {"name: x\nstages:\n  a: {kind: jsonl, with: {paths: [data.jsonl], limt: 3}}\n", `unknown parameter "limt"`},
		"missing file":  {"name: x\nstages:\n  a: {kind: jsonl, with: {paths: [nope.jsonl]}}\n", `no file matches "nope.jsonl"`},
		"cycle":         {"name: x\nstages:\n  a: {kind: jsonl, needs: [a], with: {paths: [data.jsonl]}}\n", "needs itself"},
		"bad value":     {"name: x\nstages:\n  a: {kind: jsonl, with: {paths: [data.jsonl], limit: -1}}\n", "limit: must not be negative"},
		"missing needs": {"name: x\nstages:\n  a: {kind: jsonl, needs: [b], with: {paths: [data.jsonl]}}\n", `needs "b", which is not defined`},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			spec := filepath.Join(dir, strings.ReplaceAll(name, " ", "_")+".yaml")
			writeFile(t, spec, c.spec)
			for _, cmd := range []string{"run", "plan", "status"} {
				r := runCLI(t, dir, cmd, spec)
				if _, err := os.Stat(filepath.Join(dir, "cache")); err == nil {
					t.Fatalf("%s made the cache", cmd)
				}
				if cmd == "status" && name == "missing file" {
					// Status shows what it can: the stage, unavailable, and why.
					if r.code != 0 || !strings.Contains(r.stdout, "unavailable") || !strings.Contains(r.stdout, c.want) {
						t.Errorf("status: exit %d\n%s%s", r.code, r.stdout, r.stderr)
					}
					continue
				}
				if r.code != 2 {
					t.Errorf("%s: exit %d, want 2\n%s", cmd, r.code, r.stderr)
				}
				if !strings.Contains(r.stderr, spec) || !strings.Contains(r.stderr, c.want) {
					t.Errorf("%s: message lacks the file or %q:\n%s", cmd, c.want, r.stderr)
				}
			}
		})
	}
	// The plan's own errors name the spec as it was given, as the loader's do.
	writeFile(t, filepath.Join(dir, "ok.yaml"), "name: x\nstages:\n  a: {kind: jsonl, with: {paths: [data.jsonl]}}\n")
	if r := runCLI(t, dir, "plan", "ok.yaml", "--until", "b"); r.code != 2 || !strings.Contains(r.stderr, "\npipeline: ok.yaml: no stage called \"b\"") {
		t.Errorf("--until b: exit %d\n%s", r.code, r.stderr)
	}
	if r := runCLI(t, dir, "run"); r.code != 2 {
		t.Errorf("run without a spec: exit %d", r.code)
	}
	if r := runCLI(t, dir, "run", "x.yaml", "--jobz", "3"); r.code != 2 {
		t.Errorf("unknown flag: exit %d", r.code)
	}
	// Bad flag values are refused before the cache is touched.
	for _, flag := range [][]string{{"--jobs", "-3"}, {"--log-every", "0s"}, {"--log-every", "-5s"}, {"--progress", "bogus"}, {"--report", "-"}} {
		r := runCLI(t, dir, append([]string{"run", "x.yaml"}, flag...)...)
		if r.code != 2 || !strings.Contains(r.stderr, flag[0]) {
			t.Errorf("%v: exit %d\n%s", flag, r.code, r.stderr)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "cache")); err == nil {
		t.Error("a refused run made the cache")
	}
	if r := runCLI(t, dir, "--version"); r.code != 0 || !strings.HasPrefix(r.stdout, "pipeline version ") || r.stdout != "pipeline version "+pipeline.Version()+"\n" {
		t.Errorf("--version: exit %d %q", r.code, r.stdout)
	}
	if r := runCLI(t, dir, "frobnicate"); r.code != 2 {
		t.Errorf("unknown command: exit %d", r.code)
	}
}

func TestRunPlanInspectExport(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "data", "a.jsonl"), sampleJSONL)
	spec := filepath.Join(dir, "dags", "src.yaml")
	writeFile(t, spec, "name: src\nstages:\n  alpaca: {kind: jsonl, with: {paths: [../data/*.jsonl], system: \"Kısa cevap ver.\"}}\n")

	r := runCLI(t, dir, "plan", spec)
	if r.code != 0 || !strings.Contains(r.stdout, "compute") || !strings.Contains(r.stdout, "no earlier entry") {
		t.Fatalf("plan before run: %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	report := filepath.Join(dir, "report.json")
	r = runCLI(t, dir, "run", spec, "--report", report)
	if r.code != 0 || !strings.Contains(r.stdout, "computed") {
		t.Fatalf("run: %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	var rec struct {
		OK     bool
		Stages []struct {
			Name, State string
			Rows        int64
		}
	}
	data, _ := os.ReadFile(report)
	if err := json.Unmarshal(data, &rec); err != nil || !rec.OK || rec.Stages[0].Rows != 3 {
		t.Fatalf("report: %s (%v)", data, err)
	}
	r = runCLI(t, dir, "run", spec)
	if r.code != 0 || !strings.Contains(r.stdout, "cached") {
		t.Fatalf("second run: %d\n%s", r.code, r.stdout)
	}
	r = runCLI(t, dir, "inspect", spec, "alpaca")
	if r.code != 0 || !strings.Contains(r.stdout, `"system": "Kısa cevap ver."`) || !strings.Contains(r.stdout, "rows      3") {
		t.Fatalf("inspect: %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	// The manifest as JSON: a source has no inputs, an empty list.
	if r := runCLI(t, dir, "inspect", spec, "alpaca", "--json"); r.code != 0 || !strings.Contains(r.stdout, `"inputs": []`) {
		t.Errorf("inspect --json: %d\n%s", r.code, r.stdout)
	}
	if r := runCLI(t, dir, "inspect", spec, "alpaca", "--rows", "-1"); r.code != 2 || !strings.Contains(r.stderr, "--rows -1") {
		t.Errorf("inspect --rows -1: %d\n%s", r.code, r.stderr)
	}
	out := filepath.Join(dir, "out.jsonl")
	r = runCLI(t, dir, "export", spec, "alpaca", "--format", "jsonl", "--out", out)
	got, _ := os.ReadFile(out)
	if r.code != 0 || strings.Count(string(got), "\n") != 3 || !strings.Contains(string(got), `"output":"Ankara."`) {
		t.Fatalf("export jsonl: %d %s\n%s", r.code, r.stderr, got)
	}
	for _, f := range []string{"parquet", "arrow"} {
		out := filepath.Join(dir, "out."+f)
		r = runCLI(t, dir, "export", spec, "alpaca", "--format", f, "--out", out)
		fi, err := os.Stat(out)
		if r.code != 0 || err != nil || fi.Size() < 100 {
			t.Fatalf("export %s: %d %s", f, r.code, r.stderr)
		}
	}
	// The exported Parquet reads back through a parquet stage.
	writeFile(t, filepath.Join(dir, "dags", "back.yaml"), "name: back\nstages:\n  again: {kind: parquet, with: {paths: [../out.parquet], system_column: system}}\n")
	r = runCLI(t, dir, "run", filepath.Join(dir, "dags", "back.yaml"))
	if r.code != 0 || !strings.Contains(strings.Join(strings.Fields(r.stdout), " "), "again computed 3") {
		t.Fatalf("reading the exported parquet: %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	r = runCLI(t, dir, "export", spec, "alpaca", "--format", "xml", "--out", out)
	if r.code != 2 {
		t.Errorf("bad --format: exit %d", r.code)
	}
	// Without --format the name says it; a --format it contradicts, a
	// --type for a table or a folder for a file are usage errors.
	named := filepath.Join(dir, "named.parquet")
	r = runCLI(t, dir, "export", spec, "alpaca", "--out", named)
	if got, _ := os.ReadFile(named); r.code != 0 || !bytes.HasPrefix(got, []byte("PAR1")) {
		t.Errorf("--out named.parquet: exit %d, %.20q\n%s", r.code, got, r.stderr)
	}
	r = runCLI(t, dir, "export", spec, "alpaca", "--format", "parquet", "--out", "-")
	if r.code != 0 || !strings.HasPrefix(r.stdout, "PAR1") {
		t.Errorf("parquet to standard output: exit %d\n%s", r.code, r.stderr)
	}
	for _, args := range [][]string{
		{"--format", "jsonl", "--out", filepath.Join(dir, "x.parquet")},
		{"--type", "q4_0", "--out", filepath.Join(dir, "x.jsonl")},
		{"--format", "arrow", "--out", filepath.Join(dir, "dags")},
	} {
		r = runCLI(t, dir, append([]string{"export", spec, "alpaca"}, args...)...)
		if r.code != 2 {
			t.Errorf("export %v: exit %d\n%s", args, r.code, r.stderr)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "x.parquet")); err == nil {
		t.Error("a refused export wrote its --out")
	}
}

// TestExportModelFolder: a model stage exports to a folder of the
// checkpoint's files (not the cache's manifest), by --format hf or by the
// stage's kind, to "out/" as a shell completes it, leaving a folder the
// user called out.tmp alone.
func TestExportModelFolder(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "s.yaml"), "name: s\nstages:\n  base: {kind: model, with: {preset: tiny}}\n")
	if r := runCLI(t, dir, "run", "s.yaml"); r.code != 0 {
		t.Fatalf("run: %d %s", r.code, r.stderr)
	}
	writeFile(t, filepath.Join(dir, "b.tmp", "notes.txt"), "mine")
	for _, args := range [][]string{{"--out", "a"}, {"--format", "hf", "--out", "b/"}} {
		r := runCLI(t, dir, append([]string{"export", "s.yaml", "base"}, args...)...)
		out := filepath.Join(dir, strings.TrimSuffix(args[len(args)-1], "/"))
		var names []string
		ents, _ := os.ReadDir(out)
		for _, e := range ents {
			names = append(names, e.Name())
		}
		if r.code != 0 || fmt.Sprint(names) != "[config.json model.safetensors]" {
			t.Errorf("export %v: exit %d, %v\n%s", args, r.code, names, r.stderr)
		}
	}
	if b, err := os.ReadFile(filepath.Join(dir, "b.tmp", "notes.txt")); err != nil || string(b) != "mine" {
		t.Errorf("b.tmp/notes.txt: %q %v", b, err)
	}
	// A random checkpoint has no tokenizer for a GGUF file: said before
	// anything is written.
	if r := runCLI(t, dir, "export", "s.yaml", "base", "--out", "b.gguf"); r.code != 2 || !strings.Contains(r.stderr, "random checkpoint has no tokenizer") {
		t.Errorf("a model stage as GGUF: exit %d\n%s", r.code, r.stderr)
	}
	// --type asks for a GGUF file whatever --out is called (it used to
	// write the folder, ignoring --type), and a NAME.TYPE.gguf must agree.
	for _, args := range [][]string{{"--type", "q4_0", "--out", "c"}, {"--type", "Q8_0", "--out", "c.q8_0.gguf"}, {"--out", "c.Q4_0.gguf"}} {
		if r := runCLI(t, dir, append([]string{"export", "s.yaml", "base"}, args...)...); r.code != 2 || !strings.Contains(r.stderr, "random checkpoint has no tokenizer") {
			t.Errorf("export %v: exit %d\n%s", args, r.code, r.stderr)
		}
	}
	if r := runCLI(t, dir, "export", "s.yaml", "base", "--type", "q8_0", "--out", "c.q4_0.gguf"); r.code != 2 || !strings.Contains(r.stderr, "is named for type q4_0, not --type q8_0") {
		t.Errorf("a name for another type: exit %d\n%s", r.code, r.stderr)
	}
	if l := leftovers(t, dir); len(l) != 0 {
		t.Errorf("left %v", l)
	}
	if _, err := os.Stat(filepath.Join(dir, "c")); err == nil {
		t.Error("export --type wrote a folder")
	}
}

// TestExportHeldOut: a pack stage after a mix stage with heldout exports
// its held-out rows with --heldout; a stage without any refuses.
func TestExportHeldOut(t *testing.T) {
	dir := t.TempDir()
	spec := tokensSpec(t, dir, `  mix: {kind: mix, needs: [tokens], with: {heldout: 0.5, seed: 1}}
  pack: {kind: pack, needs: [mix], with: {seq_len: 128}}
`)
	if r := runCLI(t, dir, "run", spec); r.code != 0 {
		t.Fatalf("run: exit %d\n%s", r.code, r.stderr)
	}
	held, train := filepath.Join(dir, "held.jsonl"), filepath.Join(dir, "train.jsonl")
	r1, r2 := runCLI(t, dir, "export", spec, "pack", "--heldout", "--out", held), runCLI(t, dir, "export", spec, "pack", "--out", train)
	h, _ := os.ReadFile(held)
	tr, _ := os.ReadFile(train)
	if r1.code != 0 || r2.code != 0 || len(h) == 0 || bytes.Equal(h, tr) || !strings.Contains(string(h), `"input_ids":[`) {
		t.Errorf("export pack --heldout: exit %d %d\n%s%s", r1.code, r2.code, r1.stderr, h)
	}
	for _, args := range [][]string{{"tokens", "--heldout", "--out", "x.jsonl"}, {"pack", "--heldout", "--format", "gguf", "--out", "x.gguf"}} {
		if r := runCLI(t, dir, append([]string{"export", spec}, args...)...); r.code != 2 || !strings.Contains(r.stderr, "--heldout") {
			t.Errorf("export %v: exit %d\n%s", args, r.code, r.stderr)
		}
	}
	// The mix stage's rows: training rows by default, held-out ones with
	// --heldout, as JSON lines and as Arrow alike.
	for _, held := range []bool{false, true} {
		var lines [2][]byte
		for i, ext := range []string{"jsonl", "arrow"} {
			out := filepath.Join(dir, fmt.Sprintf("mix-%v.%s", held, ext))
			args := []string{"export", spec, "mix", "--out", out}
			if held {
				args = append(args, "--heldout")
			}
			r := runCLI(t, dir, args...)
			if r.code != 0 || held == strings.Contains(r.stderr, "left out the") {
				t.Fatalf("%v: exit %d\n%s", args, r.code, r.stderr)
			}
			lines[i], _ = os.ReadFile(out)
			if ext == "arrow" {
				rd, err := dataset.OpenIPC(out)
				if err != nil {
					t.Fatal(err)
				}
				var b bytes.Buffer
				_, err = dataset.ExportJSONL(&b, rd)
				rd.Close()
				if err != nil {
					t.Fatal(err)
				}
				lines[i] = b.Bytes()
			}
		}
		if !bytes.Equal(lines[0], lines[1]) {
			t.Errorf("heldout %v: the Arrow export's rows differ from the JSON lines'", held)
		}
		rows := strings.Split(strings.TrimSpace(string(lines[0])), "\n")
		for _, line := range rows {
			var r struct{ HeldOut bool }
			if err := json.Unmarshal([]byte(line), &r); err != nil || r.HeldOut != held {
				t.Fatalf("export mix, --heldout %v: a row with heldout %v (%v)", held, r.HeldOut, err)
			}
		}
		if len(rows) == 0 || rows[0] == "" {
			t.Errorf("export mix, --heldout %v: no rows", held)
		}
	}
}

// TestExportForOtherTrainers: token rows export as TRL and Axolotl read
// them, in every table format: an attention_mask (1 on the examples'
// tokens, 0 on a packed row's padding), and a packed row's seq_lengths
// summing to its length, so that the position_ids TRL's collator rebuilds
// from them are the row's own. NAME.jsonl.gz is gzipped; a name of no
// format export writes is refused.
func TestExportForOtherTrainers(t *testing.T) {
	dir := t.TempDir()
	spec := tokensSpec(t, dir, "  pack: {kind: pack, needs: [tokens], with: {seq_len: 128}}\n")
	if r := runCLI(t, dir, "run", spec); r.code != 0 {
		t.Fatalf("run: exit %d\n%s", r.code, r.stderr)
	}
	export := func(stage, out string) []byte {
		t.Helper()
		path := filepath.Join(dir, out)
		if r := runCLI(t, dir, "export", spec, stage, "--out", path); r.code != 0 {
			t.Fatalf("export %s --out %s: exit %d\n%s", stage, out, r.code, r.stderr)
		}
		b, _ := os.ReadFile(path)
		return b
	}
	type row struct {
		InputIDs      []int32 `json:"input_ids"`
		Labels        []int32 `json:"labels"`
		AttentionMask []int8  `json:"attention_mask"`
		PositionIDs   []int32 `json:"position_ids"`
		SeqLengths    []int32 `json:"seq_lengths"`
	}
	rows := func(jsonl []byte) []row {
		var out []row
		for _, line := range strings.Split(strings.TrimSpace(string(jsonl)), "\n") {
			var r row
			if err := json.Unmarshal([]byte(line), &r); err != nil {
				t.Fatalf("%v: %s", err, line)
			}
			out = append(out, r)
		}
		return out
	}

	packed := export("pack", "pack.jsonl")
	padded := 0
	for i, r := range rows(packed) {
		n := len(r.InputIDs)
		sum := int32(0)
		for _, l := range r.SeqLengths {
			sum += l
		}
		// TRL's get_position_ids_from_packed_seq_lengths: 0, 1, … within
		// each length, restarting at each boundary.
		var rebuilt []int32
		for _, l := range r.SeqLengths {
			for j := range l {
				rebuilt = append(rebuilt, j)
			}
		}
		if int(sum) != n || !slices.Equal(rebuilt, r.PositionIDs) {
			t.Errorf("row %d: seq_lengths %v sum to %d of %d tokens; positions rebuilt from them differ from position_ids", i, r.SeqLengths, sum, n)
		}
		zeros := n - slices.Index(r.AttentionMask, 0)
		if !slices.Contains(r.AttentionMask, 0) {
			zeros = 0
		}
		if zeros > 0 {
			padded++
			if last := r.SeqLengths[len(r.SeqLengths)-1]; int(last) != zeros || slices.Contains(r.AttentionMask[n-zeros:], 1) {
				t.Errorf("row %d: attention_mask %v, the padding (last seq_lengths entry) %d long", i, r.AttentionMask, last)
			}
			for j := n - zeros; j < n; j++ {
				if r.Labels[j] != -100 {
					t.Errorf("row %d: token %d is padding to the mask but trained", i, j)
				}
			}
		}
		if len(r.AttentionMask) != n {
			t.Errorf("row %d: %d mask entries for %d tokens", i, len(r.AttentionMask), n)
		}
	}
	if padded == 0 {
		t.Fatalf("no packed row has padding; the check saw nothing:\n%s", packed)
	}
	// Axolotl's pre-tokenized columns, in that order; every token attended.
	tokens := export("tokens", "tokens.jsonl")
	if !bytes.HasPrefix(tokens, []byte(`{"input_ids":[`)) || !bytes.Contains(tokens, []byte(`],"labels":[`)) || !bytes.Contains(tokens, []byte(`],"attention_mask":[`)) {
		t.Errorf("tokens export: %.200s", tokens)
	}
	for i, r := range rows(tokens) {
		if len(r.AttentionMask) != len(r.InputIDs) || slices.Contains(r.AttentionMask, 0) {
			t.Errorf("token row %d: attention_mask %v", i, r.AttentionMask)
		}
	}
	// The Arrow file holds the same rows.
	export("pack", "pack.arrow")
	rd, err := dataset.OpenIPC(filepath.Join(dir, "pack.arrow"))
	if err != nil {
		t.Fatal(err)
	}
	var fromArrow bytes.Buffer
	_, err = dataset.ExportJSONL(&fromArrow, rd)
	rd.Close()
	if err != nil || !bytes.Equal(fromArrow.Bytes(), packed) {
		t.Errorf("the Arrow export's rows differ from the JSON lines' (%v)", err)
	}
	// Gzipped JSON lines, read back by a jsonl source as it reads .gz.
	zr, err := gzip.NewReader(bytes.NewReader(export("pack", "pack.jsonl.gz")))
	if err != nil {
		t.Fatalf("pack.jsonl.gz: %v", err)
	}
	unzipped, _ := io.ReadAll(zr)
	if !bytes.Equal(unzipped, packed) {
		t.Error("pack.jsonl.gz does not hold the JSON lines export")
	}
	// A misspelt format is named as such, whatever --out says.
	if r := runCLI(t, dir, "export", spec, "pack", "--format", "jsnl", "--out", filepath.Join(dir, "x.jsonl")); r.code != 2 || !strings.Contains(r.stderr, `--format "jsnl": want jsonl, parquet, arrow, mt-bench, gguf or hf (did you mean jsonl?)`) {
		t.Errorf("export --format jsnl: exit %d\n%s", r.code, r.stderr)
	}
	if r := runCLI(t, dir, "export", spec, "pack", "--format", "JSONL", "--out", filepath.Join(dir, "upper.jsonl")); r.code != 0 {
		t.Errorf("export --format JSONL: exit %d\n%s", r.code, r.stderr)
	}
	for _, out := range []string{"pack.csv", "pack.parquet.gz", "pack.csv.gz"} {
		if r := runCLI(t, dir, "export", spec, "pack", "--out", filepath.Join(dir, out)); r.code != 2 || !strings.Contains(r.stderr, out) {
			t.Errorf("export --out %s: exit %d\n%s", out, r.code, r.stderr)
		}
	}
	if r := runCLI(t, dir, "export", spec, "pack", "--format", "jsonl", "--out", filepath.Join(dir, "pack.csv")); r.code != 0 {
		t.Errorf("--format jsonl --out pack.csv: exit %d\n%s", r.code, r.stderr)
	}
}

// TestTypeOfName: NAME.TYPE.gguf (or NAME-TYPE.gguf) names its type; other names name none,
// and the name of a type not written here is refused (the file would hold
// another type).
func TestTypeOfName(t *testing.T) {
	for name, want := range map[string]string{"tr.q4_0.gguf": "q4_0", "out/tr-12b.Q8_0.GGUF": "q8_0", "tr.bf16.gguf": "bf16",
		"tr.Q4_K_M.gguf": "q4_k_m", "tr.gguf": "", "tr.q4_0": "", "v1.2.gguf": "", "tr.q3_k_m.gguf": "error", "tr.IQ2_XS.gguf": "error",
		"gemma-3-1b-tr-Q4_K_M.gguf": "q4_k_m", "tr-f16.gguf": "f16", "gemma-3-12b.gguf": "", "tr-Q3_K_M.gguf": "error"} {
		typ, ok, err := typeOfName(name)
		got := map[bool]string{true: typ.String()}[ok]
		if err != nil {
			got = "error"
		}
		if got != want {
			t.Errorf("%s: %q (%v), want %q", name, got, err, want)
		}
	}
	// general.name is the name less its type.
	for out, want := range map[string]string{"x/tr.q4_0.gguf": "tr", "gemma-3-1b-tr-Q4_K_M.gguf": "gemma-3-1b-tr", "gemma-3-12b.gguf": "gemma-3-12b", "v1.2.gguf": "v1.2"} {
		if got := ggufName(out); got != want {
			t.Errorf("ggufName(%s) = %q, want %q", out, got, want)
		}
	}
}

// TestExportAnswerFile: a generate stage's answers export as FastChat's
// answer file, byte for byte the one its entry holds; other stages and
// other file types are refused.
func TestExportAnswerFile(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "q.jsonl"), `{"question_id": 81, "category": "writing", "turns": ["Bir şiir yaz.", "Kısalt."]}`+"\n")
	writeFile(t, filepath.Join(dir, "s.yaml"), fmt.Sprintf(`name: s
stages:
  base: {kind: model, with: {preset: tiny}}
  questions: {kind: mt_bench, with: {paths: [q.jsonl]}}
  answers: {kind: generate, needs: [questions, base], with: {tokenizer: %s, max_new_tokens: 2, model_id: tr-tiny}}
`, testenv.GemmaFile(t, "tokenizer.json")))
	if r := runCLI(t, dir, "run", "s.yaml"); r.code != 0 {
		t.Fatalf("run: %d %s", r.code, r.stderr)
	}
	// model_answer/ is made, as FastChat's layout wants it.
	if r := runCLI(t, dir, "export", "s.yaml", "answers", "--format", "mt-bench", "--out", "model_answer/tr-tiny.jsonl"); r.code != 0 {
		t.Fatalf("export: %d %s", r.code, r.stderr)
	}
	got, _ := os.ReadFile(filepath.Join(dir, "model_answer", "tr-tiny.jsonl"))
	entries, _ := filepath.Glob(filepath.Join(dir, "cache", "entries", "*", "*", "model_answer", "tr-tiny.jsonl"))
	if len(entries) != 1 {
		t.Fatalf("answer files in the cache: %v", entries)
	}
	want, _ := os.ReadFile(entries[0])
	if len(want) == 0 || !bytes.Equal(got, want) || !strings.Contains(string(got), `"question_id":81`) {
		t.Errorf("exported %q, the entry holds %q", got, want)
	}
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"questions", "--format", "mt-bench", "--out", "x.jsonl"}, "stage questions (mt_bench) holds no answers"},
		{[]string{"answers", "--format", "mt-bench", "--out", "x.parquet"}, "named for --format parquet"},
		{[]string{"answers", "--format", "mt-bench", "--out", "model_answer"}, "model_answer/tr-tiny.jsonl"},
	} {
		if r := runCLI(t, dir, append([]string{"export", "s.yaml"}, c.args...)...); r.code != 2 || !strings.Contains(r.stderr, c.want) {
			t.Errorf("export %v: exit %d, want 2 saying %q\n%s", c.args, r.code, c.want, r.stderr)
		}
	}
}

func TestBadDataFailsWithExit1(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "bad.jsonl"), "{\"instruction\": \"a\", \"output\": \"b\"}\n{not json\n")
	spec := filepath.Join(dir, "bad.yaml")
	writeFile(t, spec, "name: bad\nstages:\n  src: {kind: jsonl, with: {paths: [bad.jsonl]}}\n")
	r := runCLI(t, dir, "run", spec)
	if r.code != 1 || !strings.Contains(r.stderr, "stage src (jsonl)") || !strings.Contains(r.stderr, "bad.jsonl") {
		t.Fatalf("exit %d, stderr:\n%s", r.code, r.stderr)
	}
	entries, _ := filepath.Glob(filepath.Join(dir, "cache", "entries", "*", "*"))
	if len(entries) != 0 {
		t.Errorf("failed run left entries %v", entries)
	}
	r = runCLI(t, dir, "status", spec)
	if r.code != 0 || !strings.Contains(r.stdout, "FAILED") || !strings.Contains(r.stdout, "missing") {
		t.Errorf("status after failure:\n%s", r.stdout)
	}
}

func TestVerifyReportsDamage(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "a.jsonl"), sampleJSONL)
	spec := filepath.Join(dir, "s.yaml")
	writeFile(t, spec, "name: s\nstages:\n  src: {kind: jsonl, with: {paths: [a.jsonl]}}\n")
	if r := runCLI(t, dir, "run", spec); r.code != 0 {
		t.Fatal(r.stderr)
	}
	if r := runCLI(t, dir, "verify", spec); r.code != 0 || !strings.Contains(r.stdout, "verified 1 entries, 0 damaged") {
		t.Fatalf("verify: %d %s", r.code, r.stdout)
	}
	tables, _ := filepath.Glob(filepath.Join(dir, "cache", "entries", "*", "*", pipeline.TableFile))
	if len(tables) != 1 {
		t.Fatalf("tables: %v", tables)
	}
	b, _ := os.ReadFile(tables[0])
	b[len(b)/2] ^= 1
	os.WriteFile(tables[0], b, 0o644)
	r := runCLI(t, dir, "verify")
	if r.code != 1 || !strings.Contains(r.stdout, "damaged") {
		t.Fatalf("verify of a damaged entry: %d %s", r.code, r.stdout)
	}
	if r := runCLI(t, dir, "plan", spec); !strings.Contains(r.stdout, "damaged") {
		t.Errorf("plan does not say why: %s", r.stdout)
	}
	// Status says damaged, and gives no size: the files are not what the
	// manifest lists.
	r = runCLI(t, dir, "status", spec)
	if line := regexp.MustCompile(`(?m)^src .*$`).FindString(r.stdout); !strings.Contains(line, "damaged") || strings.Contains(line, "B ") {
		t.Errorf("status of a damaged entry: %q\n%s", line, r.stdout)
	}
	if r := runCLI(t, dir, "run", spec); r.code != 0 || !strings.Contains(r.stdout, "computed") {
		t.Fatalf("run after damage: %d %s", r.code, r.stdout)
	}
	// Each entry gc would remove is named by the stage that made it.
	if r := runCLI(t, dir, "gc", "--keep-last", "0", "--dry-run"); r.code != 0 || !strings.Contains(r.stdout, "would remove 1 entry") ||
		!regexp.MustCompile(`would remove [0-9a-f]{12}: stage src \(jsonl\), computed \d{4}-\d\d-\d\d \d\d:\d\d`).MatchString(r.stdout) {
		t.Fatalf("gc dry run: %d %s %s", r.code, r.stdout, r.stderr)
	}
	// Not for real: 0 reads as "no limit" to many, and would empty the cache.
	if r := runCLI(t, dir, "gc", "--keep-last", "0"); r.code != 2 || !strings.Contains(r.stderr, "--keep-last 0 keeps the entries of no run") {
		t.Errorf("gc --keep-last 0: %d %s", r.code, r.stderr)
	}
	if r := runCLI(t, dir, "status", spec); !strings.Contains(r.stdout, "cached") {
		t.Errorf("the entry after a refused gc --keep-last 0: %s", r.stdout)
	}
}

// TestBenchTrainUsage: bench train refuses a missing or doubled model and
// bad sizes with exit 2, and without a GPU fails with exit 1 saying why.
func TestBenchTrainUsage(t *testing.T) {
	dir := t.TempDir()
	for _, args := range [][]string{
		{"bench", "train"},
		{"bench", "train", "--preset", "1b", "--model", dir},
		{"bench", "train", "--preset", "1b", "--steps", "0"},
		{"bench", "train", "--preset", "1b", "--optimizer", "sgd"},
		{"bench", "train", "--preset", "1b", "--gpu-memory", "-1"},
		{"bench", "train", "--preset", "1b", "--lr", "-1"},
		{"bench", "train", "--preset", "2b"},
		{"bench", "train", "--preset", "1b", "--gpus", "0"},
	} {
		if r := runCLI(t, dir, args...); r.code != 2 {
			t.Errorf("%v: exit %d, want 2 (%s)", args, r.code, r.stderr)
		}
	}
	// Checked once, before ranks start: the message comes once.
	if r := runCLI(t, dir, "bench", "train", "--preset", "1b", "--gpus", "2"); r.code != 2 || strings.Count(r.stderr, "--grad-accum 1 is not a multiple of --gpus 2") != 1 || strings.Contains(r.stderr, "rank") {
		t.Errorf("--gpus 2 with --grad-accum 1: exit %d\n%s", r.code, r.stderr)
	}
	rows := filepath.Join(dir, "rows.jsonl")
	writeFile(t, rows, `{"input_ids": [1, 2, 3, 4], "labels": [-100, 2, 3, 4], "seq_lengths": [4]}`+"\n")
	r := runCLI(t, dir, "bench", "train", "--preset", "tiny", "--seq-len", "4", "--data", rows, "--steps", "1", "--warmup-steps", "0")
	if cuda.Discover().Err != nil && (r.code != 1 || !strings.Contains(r.stderr, "CUDA")) {
		t.Errorf("without a GPU: exit %d, %s", r.code, r.stderr)
	}
}

// TestBenchGenerate: bench generate refuses a missing or doubled model and
// bad sizes, sampling options or adapter ranks with exit 2; on the CPU reference it
// decodes exactly --new-tokens for every prompt, greedily or sampled, and
// reports them as a JSON line; a preset without a GPU fails with exit 1
// saying why.
func TestBenchGenerate(t *testing.T) {
	dir := t.TempDir()
	model, _ := filepath.Abs("../../trainer/testdata/reference/t5_gqa/model")
	for _, args := range [][]string{
		{"bench", "generate"},
		{"bench", "generate", "--preset", "1b", "--model", model},
		{"bench", "generate", "--preset", "1b", "--new-tokens", "0"},
		{"bench", "generate", "--preset", "1b", "--adapter", dir},
		{"bench", "generate", "--preset", "1b", "--temperature", "-1"},
		{"bench", "generate", "--preset", "1b", "--temperature", "1", "--top-p", "2"},
		{"bench", "generate", "--model", model, "--lora-rank", "8"},
		{"bench", "generate", "--preset", "1b", "--lora-rank", "-1"},
		{"bench", "generate", "--preset", "1b", "--quantize", "q4"},
		{"bench", "generate", "--preset", "1b", "--backend", "cpu"},
		{"bench", "generate", "--model", model, "--backend", "gpu"},
		{"bench", "generate", "--model", model, "--backend", "cpu", "--profile"},
		{"bench", "generate", "--model", model, "--warmup", "-1"},
		{"bench", "generate", "--model", model, "--top-k", "5"},
	} {
		if r := runCLI(t, dir, args...); r.code != 2 {
			t.Errorf("%v: exit %d, want 2 (%s)", args, r.code, r.stderr)
		}
	}
	// A misspelt subcommand is an error, not bench's help.
	if r := runCLI(t, dir, "bench", "genrate", "--preset", "1b"); r.code != 2 || !strings.Contains(r.stderr, `did you mean "generate"?`) {
		t.Errorf("bench genrate: exit %d, %s", r.code, r.stderr)
	}
	if r := runCLI(t, dir, "bench"); r.code != 0 || !strings.Contains(r.stdout, "generate") {
		t.Errorf("bench alone: exit %d, %s", r.code, r.stdout)
	}
	r := runCLI(t, dir, "bench", "generate", "--model", model, "--backend", "cpu", "--batch-size", "3",
		"--prompt-len", "20", "--new-tokens", "7", "--runs", "2", "--json")
	if r.code != 0 {
		t.Fatalf("on the CPU: exit %d, %s", r.code, r.stderr)
	}
	var res benchGenResult
	if err := json.Unmarshal([]byte(strings.TrimSpace(r.stdout)), &res); err != nil {
		t.Fatalf("%v: %s", err, r.stdout)
	}
	if res.BatchSize != 3 || res.PromptLen != 20 || res.NewTokens != 7 || res.TokensPerSec <= 0 || res.RunSec <= 0 ||
		res.FirstSec <= 0 || res.FirstSec > res.RunSec || res.FirstRunTokensPerSec <= 0 || res.Temperature != 0 {
		t.Errorf("report %+v", res)
	}
	r = runCLI(t, dir, "bench", "generate", "--model", model, "--backend", "cpu", "--new-tokens", "5", "--runs", "1",
		"--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--json")
	res = benchGenResult{}
	if err := json.Unmarshal([]byte(strings.TrimSpace(r.stdout)), &res); r.code != 0 || err != nil {
		t.Fatalf("sampled on the CPU: exit %d, %v, %s", r.code, err, r.stderr)
	}
	if res.NewTokens != 5 || res.Temperature != 0.8 || res.TopK != 20 || res.TopP != 0.9 {
		t.Errorf("sampled report %+v", res)
	}
	r = runCLI(t, dir, "bench", "generate", "--preset", "tiny")
	if cuda.Discover().Err != nil && (r.code != 1 || !strings.Contains(r.stderr, "CUDA")) {
		t.Errorf("a preset without a GPU: exit %d, %s", r.code, r.stderr)
	}
}

// TestMergeAndExportRefuseExistingTargets: merge and a model export never
// write over what is there, and say so.
func TestMergeAndExportRefuseExistingTargets(t *testing.T) {
	dir := t.TempDir()
	if r := runCLI(t, dir, "merge", "--model", "m"); r.code != 2 || !strings.Contains(r.stderr, "--adapter and --out are required") {
		t.Errorf("merge without --adapter: %d %s", r.code, r.stderr)
	}
	for _, d := range []string{"m", "a", "out"} {
		os.MkdirAll(filepath.Join(dir, d), 0o755)
	}
	if r := runCLI(t, dir, "merge", "--model", "m", "--adapter", "a", "--out", "out"); r.code != 1 || !strings.Contains(r.stderr, "out already exists") {
		t.Errorf("merge onto an existing folder: %d %s", r.code, r.stderr)
	}
	os.Mkdir(filepath.Join(dir, ".new.tmp123"), 0o755) // a merge killed outright
	if r := runCLI(t, dir, "merge", "--model", "m", "--adapter", "a", "--out", "new"); r.code != 2 || !strings.Contains(r.stderr, "m holds no config.json") ||
		!strings.Contains(r.stderr, ".new.tmp123 is left from an interrupted write to new") {
		t.Errorf("merge from a folder that is no checkpoint: %d %s", r.code, r.stderr)
	}
	os.Remove(filepath.Join(dir, ".new.tmp123"))
	cfg, _ := trainer.Preset("tiny")
	if err := trainer.WriteRandomCheckpoint(filepath.Join(dir, "m"), cfg, trainer.InitOptions{Seed: 1}); err != nil {
		t.Fatal(err)
	}
	if r := runCLI(t, dir, "merge", "--model", "m", "--adapter", "a", "--out", "new"); r.code != 2 || !strings.Contains(r.stderr, "give --tokenizer DIR") {
		t.Errorf("merge from a base without a tokenizer: %d %s", r.code, r.stderr)
	}
	writeFile(t, filepath.Join(dir, "s.yaml"), "name: s\nstages:\n  base: {kind: model, with: {preset: tiny}}\n")
	writeFile(t, filepath.Join(dir, "m.gguf"), "keep")
	if r := runCLI(t, dir, "export", "s.yaml", "base", "--format", "gguf", "--out", "m.gguf"); r.code != 1 || !strings.Contains(r.stderr, "m.gguf already exists") {
		t.Errorf("export onto an existing file: %d %s", r.code, r.stderr)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "m.gguf")); string(b) != "keep" {
		t.Error("the existing file was changed")
	}
	if r := runCLI(t, dir, "export", "s.yaml", "base", "--format", "gguf", "--type", "q3_k", "--out", "n.gguf"); r.code != 2 || !strings.Contains(r.stderr, "q3_k") {
		t.Errorf("an unknown type: %d %s", r.code, r.stderr)
	}
}

// TestNoSilentSuccess: specs that used to run (dropping a stage, truncating
// a value, failing only after upstream stages computed) exit 2 with the
// file and line before anything runs.
func TestNoSilentSuccess(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "data.jsonl"), sampleJSONL)
	writeFile(t, filepath.Join(dir, "tok.json"), "{}")
	cases := map[string]struct {
		spec string
		line int
		want string
	}{
		"kind null":   {"name: x\nstages:\n  a: {kind: jsonl, with: {paths: [data.jsonl]}}\n  b: {kind: null, needs: [a]}\n", 4, `stage "b": kind is empty`},
		"kind empty":  {"name: x\nstages:\n  a: {kind: jsonl, with: {paths: [data.jsonl]}}\n  b: {kind: \"\", needs: [a]}\n", 4, `stage "b": kind is empty`},
		"fractional":  {"name: x\nstages:\n  a: {kind: jsonl, with: {paths: [data.jsonl], limit: 1.5}}\n", 3, `stage "a": limit must be a whole number, got 1.5`},
		"wrong kind":  {"name: x\nstages:\n  a: {kind: jsonl, with: {paths: [data.jsonl]}}\n  c: {kind: chat_template, needs: [a]}\n  p: {kind: pack, needs: [c]}\n", 5, `stage "p": needs: "c" is a chat_template stage`},
		"twice":       {"name: x\nstages:\n  a: {kind: jsonl, with: {paths: [data.jsonl, data.jsonl]}}\n", 3, `stage "a": paths: `},
		"non-finite":  {"name: x\nstages:\n  m: {kind: model, with: {std: .nan}}\n", 3, `stage "m": std: must be a finite number`},
		"negative":    {qloraSpec("max_steps: -3"), 9, `stage "q": max_steps: -3 must not be negative`},
		"lora param":  {qloraSpec("alpha: -1"), 9, `stage "q": alpha: -1 must be positive`},
		"wrong model": {qloraSpec("model: data.jsonl"), 9, `stage "q": model: names data.jsonl, and model stage "m" is in needs`},
	}
	if _, _, err := trainer.ResolveBackend("cuda"); err != nil {
		cases["cuda without gpu"] = struct {
			spec string
			line int
			want string
		}{qloraSpec("backend: cuda"), 9, `stage "q": backend: `}
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			spec := filepath.Join(dir, strings.ReplaceAll(name, " ", "_")+".yaml")
			writeFile(t, spec, c.spec)
			for _, cmd := range []string{"run", "plan"} {
				r := runCLI(t, dir, cmd, spec)
				if r.code != 2 {
					t.Errorf("%s: exit %d, want 2\n%s", cmd, r.code, r.stderr)
				}
				at := regexp.QuoteMeta(spec) + `:\d+(:\d+)?: `
				if c.line > 0 {
					at = regexp.QuoteMeta(spec) + ":" + strconv.Itoa(c.line) + `(:\d+)?: `
				}
				if !regexp.MustCompile(at+regexp.QuoteMeta(c.want)).MatchString(r.stderr) || !strings.Contains(r.stderr, "fix: ") {
					t.Errorf("%s: message lacks line %d, %q or a fix:\n%s", cmd, c.line, c.want, r.stderr)
				}
			}
			if entries, _ := filepath.Glob(filepath.Join(dir, "cache", "entries", "*", "*")); len(entries) != 0 {
				t.Errorf("something ran: %v", entries)
			}
		})
	}
}

// qloraSpec is a DAG whose qlora stage's parameter on line 9 is param.
func qloraSpec(param string) string {
	return `name: x
stages:
  a: {kind: jsonl, with: {paths: [data.jsonl]}}
  c: {kind: chat_template, needs: [a]}
  t: {kind: tokenize, needs: [c], with: {tokenizer: tok.json}}
  p: {kind: pack, needs: [t], with: {seq_len: 64}}
  m: {kind: model}
  q: {kind: qlora, needs: [p, m], with: {
    ` + param + `}}
`
}

// TestVerifyChecksCheckpoints: verify re-hashes the checkpoints of
// unfinished stages too, and exits 1 on a damaged one.
func TestVerifyChecksCheckpoints(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "a.jsonl"), sampleJSONL)
	spec := filepath.Join(dir, "s.yaml")
	writeFile(t, spec, "name: s\nstages:\n  src: {kind: jsonl, with: {paths: [a.jsonl]}}\n")
	if r := runCLI(t, dir, "run", spec); r.code != 0 {
		t.Fatal(r.stderr)
	}
	ck := filepath.Join(dir, "cache", "scratch", strings.Repeat("ab", 32), "checkpoints", "step-00000002")
	writeFile(t, filepath.Join(ck, "state.json"), `{"step": 2}`)
	if err := dirsum.Write(ck); err != nil {
		t.Fatal(err)
	}
	if r := runCLI(t, dir, "verify"); r.code != 0 || !strings.Contains(r.stdout, "verified 1 checkpoints of unfinished stages, 0 damaged") {
		t.Fatalf("verify: %d %s %s", r.code, r.stdout, r.stderr)
	}
	writeFile(t, filepath.Join(ck, "state.json"), `{"step": 3}`)
	r := runCLI(t, dir, "verify")
	if r.code != 1 || !strings.Contains(r.stdout, "damaged checkpoint "+ck+": state.json does not match its digest") {
		t.Fatalf("verify of a damaged checkpoint: %d %s", r.code, r.stdout)
	}
	if r := runCLI(t, dir, "verify", "--remove"); r.code != 1 || !strings.Contains(r.stdout, "removed "+ck) {
		t.Fatalf("verify --remove: %d %s", r.code, r.stdout)
	}
	if _, err := os.Stat(ck); !os.IsNotExist(err) {
		t.Errorf("damaged checkpoint still there: %v", err)
	}
}

// TestStoppedErr: work a signal stopped names the signal, not the
// context's "context canceled"; other errors, and errors without a
// signal, are left as they are.
func TestStoppedErr(t *testing.T) {
	for _, c := range []struct {
		err  error
		code int
		want string
	}{
		{context.Canceled, 130, "stopped by SIGINT"},
		{fmt.Errorf("waiting for the runs using cache /c: %w", context.Canceled), 143, "waiting for the runs using cache /c: stopped by SIGTERM"},
		{context.Canceled, 0, "context canceled"},
		{errors.Join(fmt.Errorf("stage a: %w", context.Canceled), errors.New("stage b: bad row")), 130, "stage a: stopped by SIGINT\nstage b: bad row"},
		{errors.New("no such file"), 130, "no such file"},
	} {
		if got := stoppedErr(c.err, c.code).Error(); got != c.want {
			t.Errorf("%v, exit %d: %q, want %q", c.err, c.code, got, c.want)
		}
	}
}

// TestCompletion: the shell completes a spec's stage names, for the
// commands' stage argument and the flags that name stages, and the values
// of flags that take a fixed set.
func TestCompletion(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "data.jsonl"), sampleJSONL)
	spec := filepath.Join(dir, "s.yaml")
	writeFile(t, spec, "name: s\nstages:\n  src: {kind: jsonl, with: {paths: [data.jsonl]}}\n  chat: {kind: chat_template, needs: [src]}\n")
	for _, args := range [][]string{{"inspect", spec, ""}, {"export", spec, ""}, {"run", spec, "--until", ""}, {"plan", spec, "--force", ""}} {
		r := runCLI(t, dir, append([]string{"__complete"}, args...)...)
		if r.code != 0 || !strings.HasPrefix(r.stdout, "src\tjsonl\nchat\tchat_template\n") {
			t.Errorf("%v: exit %d\n%s", args, r.code, r.stdout)
		}
	}
	if r := runCLI(t, dir, "__complete", "run", spec, "--force", ""); !strings.Contains(r.stdout, "all\tevery stage\n") {
		t.Errorf("--force: %s", r.stdout)
	}
	if r := runCLI(t, dir, "__complete", "run", spec, "--progress", ""); !strings.HasPrefix(r.stdout, "auto\ntty\nlog\nnone\n") {
		t.Errorf("--progress: %s", r.stdout)
	}
}

// TestShellQuote: a suggested command pastes into a shell as it is.
func TestShellQuote(t *testing.T) {
	for in, want := range map[string]string{
		"dags/gemma12b.yaml":          "dags/gemma12b.yaml",
		"Çalışma/öğrenme_şeması.yaml": "Çalışma/öğrenme_şeması.yaml",
		"Çalışma Dizini/ş2.yaml":      "'Çalışma Dizini/ş2.yaml'",
		"it's.yaml":                   `'it'\''s.yaml'`,
		"a;rm -rf x":                  "'a;rm -rf x'",
		"":                            "''",
	} {
		if got := shellQuote(in); got != want {
			t.Errorf("%q: %s, want %s", in, got, want)
		}
		if in == "" {
			continue
		}
		out, err := exec.Command("sh", "-c", "printf %s "+shellQuote(in)).Output()
		if err != nil || string(out) != in {
			t.Errorf("sh reads %s as %q (%v)", shellQuote(in), out, err)
		}
	}
}

// TestGGUFCommand: pipeline gguf converts a checkpoint folder as the gguf
// package does, the type and general.name taken from NAME.TYPE.gguf; bad
// arguments are refused before anything is written, and merge refuses a
// .gguf --out, naming the command that makes one.
func TestGGUFCommand(t *testing.T) {
	dir := t.TempDir()
	model := filepath.Join(dir, "m")
	cfg, _ := trainer.Preset("tiny")
	if err := trainer.WriteRandomCheckpoint(model, cfg, trainer.InitOptions{Seed: 1}); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"tokenizer.json", "tokenizer_config.json"} {
		b, err := os.ReadFile(testenv.GemmaFile(t, f))
		if err != nil {
			t.Fatal(err)
		}
		writeFile(t, filepath.Join(model, f), string(b))
	}
	if r := runCLI(t, dir, "gguf", "--model", "m", "--out", "tr-demo.Q4_0.gguf"); r.code != 0 {
		t.Fatalf("gguf: exit %d\n%s", r.code, r.stderr)
	}
	want := filepath.Join(t.TempDir(), "x.gguf")
	if err := gguf.Gemma3(context.Background(), model, want, gguf.Options{Type: gguf.MostlyQ4_0, Name: "tr-demo"}); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(filepath.Join(dir, "tr-demo.Q4_0.gguf"))
	if w, _ := os.ReadFile(want); !bytes.Equal(got, w) {
		t.Error("pipeline gguf wrote another file than a q4_0 conversion named tr-demo")
	}
	// A k-quant mix by its name, as llama-quantize users write it, into a
	// folder made for it (as export makes its --out's).
	if r := runCLI(t, dir, "gguf", "--model", "m", "--out", "k/tr.Q4_K_M.gguf"); r.code != 0 || !strings.Contains(r.stderr, "(q4_k_m)") {
		t.Fatalf("gguf: exit %d\n%s", r.code, r.stderr)
	}
	want = filepath.Join(t.TempDir(), "k.gguf")
	if err := gguf.Gemma3(context.Background(), model, want, gguf.Options{Type: gguf.MostlyQ4_K_M, Name: "tr"}); err != nil {
		t.Fatal(err)
	}
	got, _ = os.ReadFile(filepath.Join(dir, "k", "tr.Q4_K_M.gguf"))
	if w, _ := os.ReadFile(want); !bytes.Equal(got, w) {
		t.Error("pipeline gguf wrote another file than a q4_k_m conversion named tr")
	}
	for args, msg := range map[string]string{
		"--model m --out a.gguf --type q3_k_m":    "llama-quantize",
		"--model m --out a.q8_0.gguf --type q4_0": "is named for type q8_0, not --type q4_0",
		"--model m --out a.bin":                   "name the file NAME.gguf",
		"--model m --out tr-demo.Q4_0.gguf":       "already exists",
		"--out a.gguf":                            "--model and --out are required",
		"--model m --out a.q3_k_m.gguf":           "llama-quantize turns that file into q3_k_m",
	} {
		if r := runCLI(t, dir, append([]string{"gguf"}, strings.Fields(args)...)...); r.code == 0 || !strings.Contains(r.stderr, msg) {
			t.Errorf("gguf %s: exit %d\n%s", args, r.code, r.stderr)
		}
	}
	if r := runCLI(t, dir, "merge", "--model", "m", "--adapter", "a", "--out", "m.q4_0.gguf"); r.code != 2 || !strings.Contains(r.stderr, "pipeline gguf --model FOLDER") {
		t.Errorf("merge --out a .gguf: exit %d\n%s", r.code, r.stderr)
	}

	// --adapter: the PEFT adapter as a GGUF LoRA file, f32 unless the name
	// or --type says f16 or bf16; other types refused.
	saveAdapter(t, model, filepath.Join(dir, "ad"), model)

	// A merge whose --tokenizer holds tokenizer.json alone says what the
	// folder lacks; gguf, refusing it, says what to copy there.
	bare, tok := filepath.Join(dir, "bare"), filepath.Join(dir, "tok")
	os.MkdirAll(tok, 0o755)
	os.Rename(filepath.Join(model, "tokenizer_config.json"), filepath.Join(dir, "tokenizer_config.json"))
	os.Rename(filepath.Join(model, "tokenizer.json"), filepath.Join(tok, "tokenizer.json"))
	r := runCLI(t, dir, "merge", "--model", "m", "--adapter", "ad", "--tokenizer", "tok", "--out", "bare")
	os.Rename(filepath.Join(dir, "tokenizer_config.json"), filepath.Join(model, "tokenizer_config.json"))
	os.Rename(filepath.Join(tok, "tokenizer.json"), filepath.Join(model, "tokenizer.json"))
	if r.code != 0 || !strings.Contains(r.stderr, "bare has no tokenizer_config.json") {
		t.Errorf("merge with a tokenizer folder of tokenizer.json alone: exit %d\n%s", r.code, r.stderr)
	}
	if r := runCLI(t, dir, "gguf", "--model", bare, "--out", "bare.gguf"); r.code == 0 || !strings.Contains(r.stderr, "has no tokenizer_config.json, whose special tokens and chat template a GGUF carries") {
		t.Errorf("gguf of a folder without tokenizer_config.json: exit %d\n%s", r.code, r.stderr)
	}
	for out, typ := range map[string]gguf.FileType{"tr-lora.gguf": gguf.AllF32, "tr-lora.F16.gguf": gguf.MostlyF16} {
		if r := runCLI(t, dir, "gguf", "--model", "m", "--adapter", "ad", "--out", out); r.code != 0 || !strings.Contains(r.stderr, "--lora "+out) {
			t.Fatalf("gguf --adapter: exit %d\n%s", r.code, r.stderr)
		}
		want := filepath.Join(t.TempDir(), "lora.gguf")
		if err := gguf.Gemma3LoRA(context.Background(), model, filepath.Join(dir, "ad"), want, gguf.LoRAOptions{Type: typ, Name: "tr-lora"}); err != nil {
			t.Fatal(err)
		}
		got, _ := os.ReadFile(filepath.Join(dir, out))
		if w, _ := os.ReadFile(want); !bytes.Equal(got, w) {
			t.Errorf("pipeline gguf --adapter --out %s wrote another file than a %s LoRA named tr-lora", out, typ)
		}
	}
	if r := runCLI(t, dir, "gguf", "--model", "m", "--adapter", "ad", "--out", "x.q4_k_m.gguf"); r.code != 2 || !strings.Contains(r.stderr, "--out x.q4_k_m.gguf is named for type q4_k_m, but a LoRA adapter is written in f32") {
		t.Errorf("an adapter to a name of a quantised type: %d %s", r.code, r.stderr)
	}
	if r := runCLI(t, dir, "gguf", "--model", "m", "--adapter", "ad", "--out", "x.gguf", "--type", "q8_0"); r.code != 2 || !strings.Contains(r.stderr, "a LoRA adapter is written in f32, f16 or bf16") {
		t.Errorf("gguf --adapter --type q8_0: exit %d\n%s", r.code, r.stderr)
	}
	if l := leftovers(t, dir); len(l) != 0 {
		t.Errorf("left %v", l)
	}
}

// saveAdapter writes a rank-2 PEFT adapter of every projection for the
// checkpoint in model into dir, naming base as its base.
func saveAdapter(t *testing.T, model, dir, base string) {
	t.Helper()
	ck, err := trainer.OpenCheckpoint(model)
	if err != nil {
		t.Fatal(err)
	}
	a, err := trainer.NewAdapter(ck.Config, trainer.LoRAConfig{R: 2, Alpha: 4, Targets: trainer.AllModules}, 1)
	if err != nil {
		t.Fatal(err)
	}
	if err := ck.SaveAdapter(dir, a, trainer.BaseModel{NameOrPath: base}); err != nil {
		t.Fatal(err)
	}
}

// TestStdoutWriteFails: a command whose output cannot be written (a full
// disk) exits 1 saying so, rather than 0 having printed nothing.
func TestStdoutWriteFails(t *testing.T) {
	full, err := os.OpenFile("/dev/full", os.O_WRONLY, 0)
	if err != nil {
		t.Skip("no /dev/full here")
	}
	defer full.Close()
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "s.yaml"), "name: s\nstages:\n  m: {kind: model, with: {preset: tiny}}\n")
	for _, args := range [][]string{{"--help"}, {"plan", "s.yaml"}, {"run", "s.yaml"}, {"inspect", "s.yaml", "m"}, {"verify"}} {
		cmd := exec.Command(os.Args[0], args...)
		cmd.Dir = dir
		cmd.Env = append(os.Environ(), "PIPELINE_CLI=1", "PIPELINE_CACHE="+filepath.Join(dir, "cache"))
		var errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = full, &errb
		err := cmd.Run()
		if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 || !strings.Contains(errb.String(), "no space left on device") {
			t.Errorf("%v with stdout on a full disk: %v\n%s", args, err, errb.String())
		}
	}
}

// TestCacheIsAFile: a --cache naming a file is a usage error (exit 2),
// not a failure of the run.
func TestCacheIsAFile(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "s.yaml"), "name: s\nstages:\n  m: {kind: model, with: {preset: tiny}}\n")
	r := runCLI(t, dir, "run", "s.yaml", "--cache", "s.yaml")
	if r.code != 2 || !strings.Contains(r.stderr, "s.yaml is a file, not a folder: check --cache") {
		t.Errorf("--cache a file: exit %d\n%s", r.code, r.stderr)
	}
}

// TestEscapeControls: the decoded view writes the data's control
// characters as escapes, so that they neither act on the terminal nor
// hide the text around them; line breaks and tabs stay.
func TestEscapeControls(t *testing.T) {
	got := escapeControls("a\x1b[31mb\x1b]0;x\x07c\r\rd\n\te\u0085f\x7fİ")
	if want := `a\u001b[31mb\u001b]0;x\u0007c\r\rd` + "\n\t" + `e\u0085f\u007fİ`; got != want {
		t.Errorf("got %q, want %q", got, want)
	}
}
