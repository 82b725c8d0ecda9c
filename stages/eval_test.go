package stages

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"gemmaft/internal/tfevents/tfeventstest"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"

	"gemmaft/dataset"
	"gemmaft/eval"
	"gemmaft/internal/testenv"
	"gemmaft/pipeline"
	"gemmaft/tokenizer"
	"gemmaft/trainer"
)

func demoFile(t *testing.T, name string) string {
	return filepath.Join(testenv.RepoRoot(t), "dataset", "demo", name)
}

// evalSpec is trainSpec followed by held-out records, their chat and
// tokens (for the test to compute the loss as training does), an eval
// stage with both tasks (1-shot) and a 0-shot multiple-choice one.
func evalSpec(t *testing.T) string {
	tok := testenv.GemmaFile(t, "tokenizer.json")
	return trainSpec(t, 2) + fmt.Sprintf(`  heldout: {kind: jsonl, with: {paths: [%s], limit: 5, system: Sen yardımsever bir asistansın.}}
  heldchat: {kind: chat_template, needs: [heldout]}
  heldtokens: {kind: tokenize, needs: [heldchat], with: {tokenizer: %s}}
  eval:
    kind: eval
    needs: [adapter, base, heldout]
    with:
      tasks: [multiple_choice, loss]
      multiple_choice: {paths: [%s], dev: [%s], shots: 1, limit: 10}
  eval0:
    kind: eval
    needs: [adapter, base]
    with:
      tasks: [multiple_choice]
      multiple_choice: {paths: [%s], limit: 2}
`, demoFile(t, "alpaca-tr-heldout.jsonl"), tok, demoFile(t, "mc-tr-test.jsonl"), demoFile(t, "mc-tr-dev.jsonl"), demoFile(t, "mc-tr-test.jsonl"))
}

type evalResultsFile struct {
	Models map[string]string `json:"models"`
	Loss   struct {
		Records int `json:"records"`
		Tokens  int `json:"tokens"`
		Scores  map[string]struct {
			Loss, Perplexity float64
		} `json:"scores"`
	} `json:"loss"`
	MultipleChoice struct {
		Questions int `json:"questions"`
		Shots     int `json:"shots"`
		Scores    map[string]struct {
			Questions     int     `json:"questions"`
			Acc           float64 `json:"acc"`
			AccStderr     float64 `json:"acc_stderr"`
			AccNorm       float64 `json:"acc_norm"`
			AccNormStderr float64 `json:"acc_norm_stderr"`
		} `json:"scores"`
		Subjects map[string]map[string]struct {
			Questions int     `json:"questions"`
			Acc       float64 `json:"acc"`
		} `json:"subjects"`
	} `json:"multiple_choice"`
	Table struct {
		Columns []string `json:"columns"`
		Rows    [][]any  `json:"rows"`
	} `json:"table"`
}

type evalItem struct {
	Index       int      `json:"index"`
	Subject     string   `json:"subject"`
	Question    string   `json:"question"`
	Choices     []string `json:"choices"`
	Answer      string   `json:"answer"`
	ChoiceBytes []int    `json:"choice_bytes"`
	Models      map[string]struct {
		LetterLogLik []float64 `json:"letter_loglik"`
		ChoiceLogLik []float64 `json:"choice_loglik"`
		Pred         string    `json:"pred"`
		PredNorm     string    `json:"pred_norm"`
	} `json:"models"`
}

func readEval(t *testing.T, entry string) (evalResultsFile, []evalItem) {
	t.Helper()
	var res evalResultsFile
	data, err := os.ReadFile(filepath.Join(entry, EvalResultsFile))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(data, &res); err != nil {
		t.Fatal(err)
	}
	var items []evalItem
	f, err := os.Open(filepath.Join(entry, EvalItemsFile))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var it evalItem
		if err := json.Unmarshal(sc.Bytes(), &it); err != nil {
			t.Fatal(err)
		}
		items = append(items, it)
	}
	return res, items
}

// models loads the base of the run as the eval stage scores it, and the
// adapter on the NF4 round trip of it, as the adapter was trained.
func evalModels(t *testing.T, rec *pipeline.RunRecord) (base, quantized *trainer.Model, a *trainer.Adapter) {
	t.Helper()
	dir := stageEntry(t, rec, "base")
	base, err := trainer.LoadModel(dir)
	if err != nil {
		t.Fatal(err)
	}
	quantized, err = trainer.LoadModel(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := quantized.QuantizeBase(); err != nil {
		t.Fatal(err)
	}
	a, err = quantized.LoadAdapter(filepath.Join(stageEntry(t, rec, "adapter"), trainer.AdapterDirName))
	if err != nil {
		t.Fatal(err)
	}
	return base, quantized, a
}

// TestEvalStage: the eval stage scores the base model and the adapter side
// by side. Its held-out loss is the training loss (Model.Loss) of the
// tokenize stage's rows of the same records; its letter log-likelihoods
// are the log-softmax of Model.Logits after the harness's prompt, written
// out here; acc and acc_norm follow from the log-likelihoods it reports;
// a second run is cached.
func TestEvalStage(t *testing.T) {
	r := newTestRun(t)
	spec := r.spec(evalSpec(t))
	rec, err := r.run(spec, pipeline.Options{})
	if err != nil {
		t.Fatal(err)
	}
	entry := stageEntry(t, rec, "eval")
	res, items := readEval(t, entry)
	base, quantized, adapter := evalModels(t, rec)

	// The loss, as training computes it on the tokenize stage's rows.
	var rows []trainer.PackedRow
	forEach(t, r.table(rec, "heldtokens"), func(b arrow.RecordBatch) {
		ids, labels := b.Column(0).(*array.List), b.Column(1).(*array.List)
		for i := 0; i < int(b.NumRows()); i++ {
			in, lab := dataset.Int32Row(ids, i), dataset.Int32Row(labels, i)
			rows = append(rows, trainer.PackedRow{InputIDs: in, Labels: lab, SeqLengths: []int32{int32(len(in))}})
		}
	})
	batch, err := trainer.NewBatch(rows)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		which string
		m     *trainer.Model
		a     *trainer.Adapter
	}{{"base", base, nil}, {"adapter", quantized, adapter}} {
		sum, n, err := c.m.Loss(c.a, batch)
		if err != nil {
			t.Fatal(err)
		}
		got := res.Loss.Scores[c.which]
		if res.Loss.Records != 5 || res.Loss.Tokens != n || math.Abs(got.Loss-sum/float64(n)) > 1e-6*sum/float64(n) {
			t.Errorf("%s: loss %.8f over %d records, %d tokens; training's loss of the tokenized records %.8f over %d tokens",
				c.which, got.Loss, res.Loss.Records, res.Loss.Tokens, sum/float64(n), n)
		}
		if math.Abs(got.Perplexity-math.Exp(got.Loss)) > 1e-9*got.Perplexity {
			t.Errorf("%s: perplexity %v is not exp(loss %v)", c.which, got.Perplexity, got.Loss)
		}
	}
	if res.Loss.Scores["base"].Loss == res.Loss.Scores["adapter"].Loss {
		t.Error("the base and the adapter have the same loss")
	}

	// Each item holds its question and choices, the lengths its acc_norm
	// divided by theirs.
	for _, it := range items {
		if it.Question == "" || len(it.Choices) != len(it.ChoiceBytes) {
			t.Fatalf("item %d: question %q, %d choices for %d lengths", it.Index, it.Question, len(it.Choices), len(it.ChoiceBytes))
		}
		for j, c := range it.Choices {
			if len(c) != it.ChoiceBytes[j] {
				t.Errorf("item %d choice %d: %q is %d bytes, not %d", it.Index, j, c, len(c), it.ChoiceBytes[j])
			}
		}
	}

	// acc and acc_norm from the reported log-likelihoods.
	if len(items) != 10 || res.MultipleChoice.Questions != 10 || res.MultipleChoice.Shots != 1 {
		t.Fatalf("%d items, %d questions, %d shots; want 10, 10, 1", len(items), res.MultipleChoice.Questions, res.MultipleChoice.Shots)
	}
	for _, which := range []string{"base", "adapter"} {
		right, rightNorm := 0, 0
		for _, it := range items {
			m := it.Models[which]
			best, bestNorm := 0, 0
			for j := range m.LetterLogLik {
				if m.LetterLogLik[j] > m.LetterLogLik[best] {
					best = j
				}
				if m.ChoiceLogLik[j]/float64(it.ChoiceBytes[j]) > m.ChoiceLogLik[bestNorm]/float64(it.ChoiceBytes[bestNorm]) {
					bestNorm = j
				}
			}
			if m.Pred != string(rune('A'+best)) || m.PredNorm != string(rune('A'+bestNorm)) {
				t.Errorf("%s question %d: pred %s, pred_norm %s; the log-likelihoods pick %c, %c", which, it.Index, m.Pred, m.PredNorm, 'A'+best, 'A'+bestNorm)
			}
			if m.Pred == it.Answer {
				right++
			}
			if m.PredNorm == it.Answer {
				rightNorm++
			}
		}
		sc := res.MultipleChoice.Scores[which]
		if sc.Acc != float64(right)/10 || sc.AccNorm != float64(rightNorm)/10 {
			t.Errorf("%s: acc %v, acc_norm %v; the items say %v, %v", which, sc.Acc, sc.AccNorm, float64(right)/10, float64(rightNorm)/10)
		}
		if sub := res.MultipleChoice.Subjects["Türkiye coğrafyası"][which]; sub.Questions != 10 {
			t.Errorf("%s: subject has %d questions, want 10", which, sub.Questions)
		}
	}

	// The scores as TensorBoard reads them, at the adapter's last step.
	events, _, err := tfeventstest.ReadDir(filepath.Join(entry, EventsDir))
	if err != nil {
		t.Fatal(err)
	}
	steps := stageStats(t, rec, "adapter")["steps"]
	sc := tfeventstest.Scalars(events)
	for tag, want := range map[string]float64{
		"eval/loss_base": res.Loss.Scores["base"].Loss, "eval/loss_adapter": res.Loss.Scores["adapter"].Loss,
		"eval/acc_adapter": res.MultipleChoice.Scores["adapter"].Acc, "eval/acc_norm_base": res.MultipleChoice.Scores["base"].AccNorm,
	} {
		if p := sc[tag]; len(p) != 1 || p[0].Value != float32(want) || float64(p[0].Step) != steps {
			t.Errorf("%s: %v, want %v at step %v", tag, p, want, steps)
		}
	}
	if texts := tfeventstest.Texts(events)[trainer.TagSettings]; len(texts) != 1 || !strings.Contains(texts[0], "| adapter | stage ") {
		t.Errorf("settings text %q: want the parameters and the models scored", texts)
	}

	// The letters of 0-shot question 0, from the logits.
	_, items0 := readEval(t, stageEntry(t, rec, "eval0"))
	var q struct {
		Subject, Question string
		Choices           []string
	}
	line, _, _ := strings.Cut(string(must(os.ReadFile(demoFile(t, "mc-tr-test.jsonl")))), "\n")
	if err := json.Unmarshal([]byte(line), &q); err != nil {
		t.Fatal(err)
	}
	prompt := "The following are multiple choice questions (with answers) about " + q.Subject + ".\n\n" + q.Question
	for j, c := range q.Choices {
		prompt += fmt.Sprintf("\n%c. %s", 'A'+j, c)
	}
	prompt += "\nAnswer:"
	tok, err := tokenizer.LoadFile(testenv.GemmaFile(t, "tokenizer.json"))
	if err != nil {
		t.Fatal(err)
	}
	ctx := tok.EncodeIDs(prompt, true)
	for _, c := range []struct {
		which string
		m     *trainer.Model
		a     *trainer.Adapter
	}{{"base", base, nil}, {"adapter", quantized, adapter}} {
		b, err := trainer.NewBatch([]trainer.PackedRow{{InputIDs: ctx, Labels: ctx, SeqLengths: []int32{int32(len(ctx))}}})
		if err != nil {
			t.Fatal(err)
		}
		logits, err := c.m.Logits(c.a, b)
		if err != nil {
			t.Fatal(err)
		}
		V := c.m.Config.VocabSize
		row := logits[(len(ctx)-1)*V : len(ctx)*V]
		mx := math.Inf(-1)
		for _, v := range row {
			mx = math.Max(mx, float64(v))
		}
		var s float64
		for _, v := range row {
			s += math.Exp(float64(v) - mx)
		}
		for j := range q.Choices {
			id, ok := tok.ID("▁" + string(rune('A'+j)))
			if !ok {
				t.Fatalf("no token for \" %c\"", 'A'+j)
			}
			want := float64(row[id]) - mx - math.Log(s)
			got := items0[0].Models[c.which].LetterLogLik[j]
			if math.Abs(got-want) > 1e-5*math.Abs(want) {
				t.Errorf("%s: log-likelihood of \" %c\" %.8f, from the logits %.8f", c.which, 'A'+j, got, want)
			}
		}
	}

	// Side by side in the statistics and the table.
	var stats map[string]any
	for _, s := range rec.Stages {
		if s.Name == "eval" {
			stats = s.Stats
		}
	}
	for _, k := range []string{"loss_base", "loss_adapter", "perplexity_base", "perplexity_adapter", "acc_base", "acc_adapter", "acc_norm_base", "acc_norm_adapter", "subjects", "counts"} {
		if _, ok := stats[k]; !ok {
			t.Errorf("no statistic %s: %v", k, stats)
		}
	}
	if fmt.Sprint(res.Table.Columns) != "[score base adapter change]" || len(res.Table.Rows) != 8 || res.Table.Rows[0][0] != "loss" {
		t.Errorf("table %v %v", res.Table.Columns, res.Table.Rows)
	}
	// Standard errors as lm-evaluation-harness computes them: the sample
	// standard deviation of the 0/1 scores over the square root of n.
	for _, which := range []string{"base", "adapter"} {
		sc := res.MultipleChoice.Scores[which]
		for _, c := range [][2]float64{{sc.Acc, sc.AccStderr}, {sc.AccNorm, sc.AccNormStderr}} {
			n := float64(sc.Questions)
			if want := math.Sqrt(n/(n-1)*c[0]*(1-c[0])) / math.Sqrt(n); math.Abs(c[1]-want) > 1e-12 {
				t.Errorf("%s: stderr %v of mean %v over %v, want %v", which, c[1], c[0], n, want)
			}
		}
	}
	if !strings.Contains(res.Models["adapter"], "NF4") {
		t.Errorf("models %v: the adapter should be said to run on the NF4 base", res.Models)
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

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

// evalEntries counts the committed entries of eval stages.
func (r *testRun) evalEntries() int {
	keys, err := r.store.Keys()
	if err != nil {
		r.t.Fatal(err)
	}
	n := 0
	for _, k := range keys {
		if m, err := pipeline.ReadManifest(r.store.EntryDir(k)); err == nil && m.Kind == evalKindName {
			n++
		}
	}
	return n
}

// TestEvalBadInput: a set without an answer column, answers outside the
// choices, prompts longer than the model's context, an adapter for another
// base, missing or wrong inputs and parameters: each fails saying what is
// wrong, and no eval entry is written. The adapter is trained once, on a
// model whose context is 160 tokens.
func TestEvalBadInput(t *testing.T) {
	r := newTestRun(t)
	short := filepath.Join(r.dir, "short")
	c, _ := trainer.Preset("tiny")
	c.MaxPositions = 160
	if err := trainer.WriteRandomCheckpoint(short, c, trainer.InitOptions{Seed: 7, Std: 0.3}); err != nil {
		t.Fatal(err)
	}
	other := filepath.Join(r.dir, "other")
	if err := trainer.WriteRandomCheckpoint(other, c, trainer.InitOptions{Seed: 8, Std: 0.3}); err != nil {
		t.Fatal(err)
	}
	smaller := filepath.Join(r.dir, "smaller")
	c2, _ := trainer.Preset("tiny")
	c2.Hidden, c2.Intermediate = 32, 128
	if err := trainer.WriteRandomCheckpoint(smaller, c2, trainer.InitOptions{Seed: 7}); err != nil {
		t.Fatal(err)
	}
	train := trainSpecOn(t, 1, short)
	write := func(name, content string) string {
		p := filepath.Join(r.dir, name)
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	held := write("held.jsonl", `{"instruction": "Selam ver.", "input": "", "output": "Merhaba!"}`+"\n")
	good := write("good.jsonl", `{"question": "Hangisi meyvedir?", "choices": ["elma", "taş"], "answer": "A"}`+"\n")
	noAnswer := write("noanswer.jsonl", `{"question": "Hangisi meyvedir?", "choices": ["elma", "taş"]}`+"\n")
	outside := write("outside.jsonl", `{"question": "Hangisi meyvedir?", "choices": ["elma", "taş", "demir", "cam"], "answer": "E"}`+"\n")
	long := write("long.jsonl", `{"question": "`+strings.Repeat("Bu soru çok uzun bir sorudur. ", 40)+`Hangisi meyvedir?", "choices": ["elma", "taş"], "answer": "A"}`+"\n")
	longHeld := write("longheld.jsonl", `{"instruction": "Selam ver.", "input": "", "output": "Merhaba!"}`+"\n"+
		`{"instruction": "`+strings.Repeat("Bu soru çok uzun bir sorudur. ", 40)+`", "input": "", "output": "Evet."}`+"\n")
	noDev := write("nodev.jsonl", `{"subject": "tarih", "question": "Soru?", "choices": ["a", "b"], "answer": 0}`+"\n")
	oneDev := write("onedev.jsonl", `{"subject": "tarih", "question": "Başka soru?", "choices": ["a", "b"], "answer": 1}`+"\n")

	if _, err := r.run(r.spec(train), pipeline.Options{}); err != nil {
		t.Fatal(err)
	}
	evalStage := func(needs, with string) string {
		extra := ""
		if strings.Contains(needs, "adapter2") {
			extra = "  adapter2: {kind: qlora, needs: [pack], with: {model: " + short + ", r: 2, max_steps: 1, backend: cpu}}\n"
		}
		return train + extra + fmt.Sprintf("  held: {kind: jsonl, with: {paths: [%s]}}\n  eval:\n    kind: eval\n    needs: [%s]\n    with: %s\n", held, needs, with)
	}
	for _, c := range []struct {
		name, spec string
		want       []string
	}{
		{"no answer column", evalStage("adapter", "{tasks: [multiple_choice], multiple_choice: {paths: ["+noAnswer+"]}}"),
			[]string{"noanswer.jsonl:1", `no answer (column "answer")`, "multiple_choice"}},
		{"answer outside the choices", evalStage("adapter", "{tasks: [multiple_choice], multiple_choice: {paths: ["+outside+"]}}"),
			[]string{"outside.jsonl:1", `answer "E" is outside the 4 choices (A to D)`, `fix: write the answer as the letter of one of the 4 choices ("A" to "D") or its index (0 to 3)`}},
		{"longer than the context", evalStage("adapter", "{tasks: [multiple_choice], multiple_choice: {paths: ["+long+"]}}"),
			[]string{"long.jsonl:1", "more than the model's context of 160 tokens"}},
		{"a held-out record longer than the context", strings.Replace(evalStage("adapter, held", "{tasks: [loss]}"), held, longHeld, 1),
			[]string{"the held-out row 2 of stage held is", "more than the model's context of 160 tokens"}},
		{"another base (another shape)", evalStage("adapter", "{tasks: [multiple_choice], model: "+smaller+", multiple_choice: {paths: ["+good+"]}}"),
			[]string{"an adapter for another base", "config.json differs"}},
		{"another base (other weights)", evalStage("adapter", "{tasks: [multiple_choice], model: "+other+", multiple_choice: {paths: ["+good+"]}}"),
			[]string{"an adapter for another base", "model.safetensors differs", "other_base: true applies the adapter to it"}},
		{"another shape, with other_base", evalStage("adapter", "{tasks: [multiple_choice], model: "+smaller+", other_base: true, multiple_choice: {paths: ["+good+"]}}"),
			[]string{"has shape [4 64], this model needs [4 32]"}},
		{"other_base naming no base", evalStage("adapter", "{tasks: [multiple_choice], other_base: true, multiple_choice: {paths: ["+good+"]}}"),
			[]string{"other_base: names no base itself"}},
		{"no held-out records", evalStage("adapter", "{tasks: [loss]}"),
			[]string{"needs: the loss task has no held-out records"}},
		{"records without the loss task", evalStage("adapter, held", "{tasks: [multiple_choice], multiple_choice: {paths: ["+good+"]}}"),
			[]string{`needs: stage "held" gives held-out records, but the loss task is not listed`}},
		{"no adapter", evalStage("held", "{tasks: [loss], model: "+short+"}"),
			[]string{"needs: no qlora stage"}},
		{"a pack stage", evalStage("adapter, pack", "{tasks: [multiple_choice], multiple_choice: {paths: ["+good+"]}}"),
			[]string{`needs: "pack" is a pack stage, but an eval stage reads`}},
		{"two adapters", evalStage("adapter, adapter2", "{tasks: [multiple_choice], multiple_choice: {paths: ["+good+"]}}"),
			[]string{"two qlora stages (adapter, adapter2)"}},
		{"no tasks", evalStage("adapter", "{tasks: []}"), []string{"tasks: no tasks"}},
		{"unknown prompt", evalStage("adapter", "{tasks: [multiple_choice], multiple_choice: {paths: ["+good+"], prompt: mmlu_pro}}"),
			[]string{`unknown prompt format "mmlu_pro"`}},
		{"unknown task", evalStage("adapter", "{tasks: [bleu]}"), []string{`unknown task "bleu"`}},
		{"set without the task", evalStage("adapter, held", "{tasks: [loss], multiple_choice: {paths: ["+good+"]}}"),
			[]string{"multiple_choice: is given but the task is not listed"}},
		{"task without a set", evalStage("adapter", "{tasks: [multiple_choice]}"), []string{"multiple_choice needs its question set"}},
		{"shots without dev", evalStage("adapter", "{tasks: [multiple_choice], multiple_choice: {paths: ["+good+"], shots: 2}}"),
			[]string{"2-shot needs a dev split"}},
		{"too few dev questions", evalStage("adapter", "{tasks: [multiple_choice], multiple_choice: {paths: ["+noDev+"], dev: ["+oneDev+"], shots: 2}}"),
			[]string{`2-shot needs 2 dev questions of subject "tarih", the dev split has 1`}},
		{"a file twice", evalStage("adapter", "{tasks: [multiple_choice], multiple_choice: {paths: ["+good+", "+good+"]}}"),
			[]string{"multiple_choice: paths: " + good + " is listed twice"}},
		{"a dev file twice", evalStage("adapter", "{tasks: [multiple_choice], multiple_choice: {paths: ["+noDev+"], dev: ["+oneDev+", "+oneDev+"], shots: 2}}"),
			[]string{"multiple_choice: dev: " + oneDev + " is listed twice"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			rec, err := r.run(r.spec(c.spec), pipeline.Options{})
			if err == nil {
				t.Fatal("the eval stage ran")
			}
			t.Log(err)
			for _, w := range c.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error lacks %q: %v", w, err)
				}
			}
			if rec != nil {
				for _, s := range rec.Stages {
					if s.Name == "eval" && s.Entry != "" {
						t.Errorf("eval left entry %s", s.Entry)
					}
				}
			}
			if n := r.evalEntries(); n != 0 {
				t.Errorf("%d eval entries after a failure", n)
			}
		})
	}
	// And the same stage with a good set runs.
	if _, err := r.run(r.spec(evalStage("adapter", "{tasks: [multiple_choice], multiple_choice: {paths: ["+good+"], prompt: turkishmmlu}}")), pipeline.Options{}); err != nil {
		t.Fatalf("a good set: %v", err)
	}
	if n := r.evalEntries(); n != 1 {
		t.Errorf("%d eval entries after a good run", n)
	}
	// other_base: true scores the adapter on the other checkpoint, saying so.
	var logs bytes.Buffer
	r.log = slog.New(slog.NewTextHandler(&logs, nil))
	if _, err := r.run(r.spec(evalStage("adapter", "{tasks: [multiple_choice], model: "+other+", other_base: true, multiple_choice: {paths: ["+good+"]}}")), pipeline.Options{}); err != nil {
		t.Fatalf("other_base: %v", err)
	}
	if n := r.evalEntries(); n != 2 || !strings.Contains(logs.String(), "applying the adapter to another base") {
		t.Errorf("other_base: %d eval entries, log:\n%s", n, logs.String())
	}
}

// TestEvalWarnsOfTrainingRecords: a loss task whose held-out source is
// the adapter's own training source warns that its score is a training
// loss; a source the training did not read does not. Empty answers are
// warned of too.
func TestEvalWarnsOfTrainingRecords(t *testing.T) {
	r := newTestRun(t)
	var logs bytes.Buffer
	r.log = slog.New(slog.NewTextHandler(&logs, nil))
	held := filepath.Join(r.dir, "held.jsonl")
	if err := os.WriteFile(held, []byte(`{"instruction": "Selam ver.", "input": "", "output": "Merhaba!"}`+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	train := trainSpec(t, 1) + "  held: {kind: jsonl, with: {paths: [" + held + "]}}\n"
	const warning = "the held-out records are records the adapter was trained on"
	for _, c := range []struct {
		source string
		warned bool
	}{{"held", false}, {"alpaca", true}} {
		logs.Reset()
		spec := train + "  eval: {kind: eval, needs: [adapter, base, " + c.source + "], with: {tasks: [loss]}}\n"
		if _, err := r.run(r.spec(spec), pipeline.Options{}); err != nil {
			t.Fatal(err)
		}
		if got := strings.Contains(logs.String(), warning); got != c.warned {
			t.Errorf("held-out stage %s: warned %v, want %v\n%s", c.source, got, c.warned, logs.String())
		}
	}
	// A held-out record without an answer is scored, and warned of.
	logs.Reset()
	os.WriteFile(held, []byte(`{"instruction": "Selam ver.", "input": "", "output": "Merhaba!"}`+"\n"+`{"instruction": "Bir şey söyle.", "input": "", "output": " "}`+"\n"), 0o644)
	if _, err := r.run(r.spec(train+"  eval: {kind: eval, needs: [adapter, base, held], with: {tasks: [loss]}}\n"), pipeline.Options{}); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(logs.String(), "1 record has an empty (or white space) answer, scored on <end_of_turn> alone; the first is the held-out row 2 of stage held") {
		t.Errorf("an empty held-out answer: %s", logs.String())
	}
}

// TestEvalScoresMustBeNumbers: a NaN loss or an infinite perplexity is the
// stage's error, naming the score, rather than a results.json that cannot
// be written after all the scoring.
func TestEvalScoresMustBeNumbers(t *testing.T) {
	for _, c := range []struct {
		adapter eval.LossResult
		want    string
	}{
		{eval.LossResult{Loss: math.NaN(), Perplexity: math.NaN()}, "loss_adapter is NaN"},
		{eval.LossResult{Loss: 720, Perplexity: math.Exp(720)}, "perplexity_adapter is +Inf"},
	} {
		r := &evalResults{Loss: &lossResults{Scores: map[string]eval.LossResult{"base": {Loss: 12, Perplexity: math.Exp(12)}, "adapter": c.adapter}}}
		if err := r.checkFinite(); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v: %v, want %q", c.adapter, err, c.want)
		}
	}
	r := &evalResults{Loss: &lossResults{Scores: map[string]eval.LossResult{"base": {Loss: 12, Perplexity: math.Exp(12)}, "adapter": {Loss: 11, Perplexity: math.Exp(11)}}}}
	if err := r.checkFinite(); err != nil {
		t.Error(err)
	}
}

// TestScoresRounded: the table keeps six significant digits and at most
// six decimals.
func TestScoresRounded(t *testing.T) {
	for _, c := range []struct{ in, want float64 }{
		{484442.0830312, 484442},
		{1234567.89, 1234568},
		{13.09873412, 13.0987},
		{0.531254321, 0.531254},
		{-0.0000004, 0},
		{-2.51234567, -2.51235},
	} {
		if got := round6(c.in); got != c.want || math.Signbit(got) != math.Signbit(c.want) {
			t.Errorf("round6(%v) = %v, want %v", c.in, got, c.want)
		}
	}
}
