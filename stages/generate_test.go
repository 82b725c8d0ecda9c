package stages

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"

	"gemmaft/converse"
	"gemmaft/dataset"
	"gemmaft/internal/testenv"
	"gemmaft/pipeline"
	"gemmaft/tokenizer"
	"gemmaft/trainer"
)

// mtQuestions are three MT-Bench-style questions of one, two and three
// turns.
const mtQuestions = `{"question_id": 81, "category": "writing", "turns": ["Kapadokya'yı anlatan kısa bir gezi yazısı yaz.", "Şimdi aynı yazıyı bir çocuğa anlatır gibi yeniden yaz."]}
{"question_id": 82, "category": "math", "turns": ["12 ile 18'in en büyük ortak böleni kaçtır?"]}
{"question_id": 83, "category": "reasoning", "turns": ["Bir sepette 5 elma var, 2'sini aldın. Kaç elman var?", "Sepette kaç elma kaldı?", "İkisini birden tek cümleyle söyle."]}
`

const generateSystem = "Kısa ve öz cevap ver."

// generateSpec is trainSpec's two-step adapter, with questions and a
// generate stage over them; extra goes into the generate stage's with.
func generateSpec(t *testing.T, dir, extra string) string {
	q := filepath.Join(dir, "questions.jsonl")
	if err := os.WriteFile(q, []byte(mtQuestions), 0o644); err != nil {
		t.Fatal(err)
	}
	return trainSpec(t, 2) + fmt.Sprintf(`  questions: {kind: mt_bench, with: {paths: [%s]}}
  answers:
    kind: generate
    needs: [questions, adapter, base]
    with: {max_new_tokens: 6, model_id: tiny-tr, system: %q%s}
`, q, generateSystem, extra)
}

type answerRow struct {
	id                 int64
	category           string
	turns, answers     []string
	tokens             []int32
	truncated          []bool
	answerFileQuestion map[string]any
}

// readAnswers reads a generate stage's table.
func readAnswers(t *testing.T, r *testRun, rec *pipeline.RunRecord) []answerRow {
	t.Helper()
	var rows []answerRow
	forEach(t, r.table(rec, "answers"), func(b arrow.RecordBatch) {
		strs := func(c, i int) []string {
			l := b.Column(c).(*array.List)
			lo, hi := l.ValueOffsets(i)
			var out []string
			for j := lo; j < hi; j++ {
				out = append(out, l.ListValues().(*array.String).Value(int(j)))
			}
			return out
		}
		for i := 0; i < int(b.NumRows()); i++ {
			row := answerRow{id: b.Column(0).(*array.Int64).Value(i), category: b.Column(1).(*array.String).Value(i),
				turns: strs(2, i), answers: strs(3, i)}
			l := b.Column(4).(*array.List)
			lo, hi := l.ValueOffsets(i)
			row.tokens = l.ListValues().(*array.Int32).Int32Values()[lo:hi]
			l = b.Column(5).(*array.List)
			lo, hi = l.ValueOffsets(i)
			for j := lo; j < hi; j++ {
				row.truncated = append(row.truncated, l.ListValues().(*array.Boolean).Value(int(j)))
			}
			rows = append(rows, row)
		}
	})
	return rows
}

// TestGenerateStageAnswersMTBench runs the stage through the engine on a
// short QLoRA run's adapter and checks the table, the answer file field by
// field against FastChat's layout, that every turn is the model's answer
// to the conversation holding its own earlier answers, that greedy answers
// do not depend on the batch size, and that a second run is cached.
func TestGenerateStageAnswersMTBench(t *testing.T) {
	r := newTestRun(t)
	var logs bytes.Buffer
	r.log = slog.New(slog.NewTextHandler(&logs, nil))
	spec := r.spec(generateSpec(t, r.dir, ", batch_size: 2"))
	started := time.Now()
	rec, err := r.run(spec, pipeline.Options{})
	if err != nil {
		t.Fatal(err)
	}
	st := stageRecord(t, rec, "answers")
	rows := readAnswers(t, r, rec)
	if len(rows) != 3 || rows[0].id != 81 || rows[1].id != 82 || rows[2].id != 83 || rows[1].category != "math" {
		t.Fatalf("table: %+v", rows)
	}
	if strings.Contains(logs.String(), "without a category") {
		t.Errorf("every question has a category, yet: %s", logs.String())
	}
	for _, row := range rows {
		if len(row.answers) != len(row.turns) || len(row.tokens) != len(row.turns) || len(row.truncated) != len(row.turns) {
			t.Errorf("question %d: %d turns, %d answers, %d token counts, %d truncated flags", row.id, len(row.turns), len(row.answers), len(row.tokens), len(row.truncated))
		}
		for k, n := range row.tokens {
			if n < 1 || n > 6 || row.truncated[k] && n != 6 {
				t.Errorf("question %d turn %d: %d tokens, truncated %v", row.id, k+1, n, row.truncated[k])
			}
		}
	}
	if fmt.Sprintf("%v %v %v %v", st.Stats["questions"], st.Stats["turns"], st.Stats["quantize"], st.Stats["adapter"]) != "3 6 nf4 true" {
		t.Errorf("stats: %v", st.Stats)
	}

	// The answer file, field by field, as FastChat's gen_model_answer.py
	// writes it and gen_judgment.py reads it.
	entry := r.store.EntryDir(st.Key)
	data, err := os.ReadFile(filepath.Join(entry, AnswersDir, "tiny-tr.jsonl"))
	if err != nil {
		t.Fatal(err)
	}
	lines := bytes.Split(bytes.TrimSuffix(data, []byte("\n")), []byte("\n"))
	if len(lines) != 3 {
		t.Fatalf("%d answer lines", len(lines))
	}
	for i, line := range lines {
		var a map[string]any
		if err := json.Unmarshal(line, &a); err != nil {
			t.Fatalf("line %d: %v", i+1, err)
		}
		var keys []string
		for k := range a {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		if fmt.Sprint(keys) != "[answer_id choices model_id question_id tstamp]" {
			t.Errorf("line %d has keys %v", i+1, keys)
		}
		if a["question_id"] != float64(rows[i].id) || !bytes.Contains(line, []byte(fmt.Sprintf(`"question_id":%d,`, rows[i].id))) {
			t.Errorf("line %d: question_id %v (an integer, as the question file has it)", i+1, a["question_id"])
		}
		if a["model_id"] != "tiny-tr" {
			t.Errorf("line %d: model_id %v", i+1, a["model_id"])
		}
		aid, _ := a["answer_id"].(string)
		if len(aid) != 22 || strings.Trim(aid, shortUUIDAlphabet) != "" {
			t.Errorf("line %d: answer_id %q is not shortuuid-shaped", i+1, aid)
		}
		ts, _ := a["tstamp"].(float64)
		if ts < float64(started.Unix())-1 || ts > float64(time.Now().Unix())+1 {
			t.Errorf("line %d: tstamp %v", i+1, a["tstamp"])
		}
		choices, _ := a["choices"].([]any)
		if len(choices) != 1 {
			t.Fatalf("line %d: choices %v", i+1, a["choices"])
		}
		c, _ := choices[0].(map[string]any)
		turns, _ := c["turns"].([]any)
		if len(c) != 2 || c["index"] != 0.0 || len(turns) != len(rows[i].answers) {
			t.Errorf("line %d: choice %v", i+1, c)
		}
		for k, tv := range turns {
			if tv != rows[i].answers[k] {
				t.Errorf("line %d turn %d: %q in the file, %q in the table", i+1, k+1, tv, rows[i].answers[k])
			}
		}
	}

	// Each turn is the model's answer to the conversation so far, its own
	// earlier answers included: decoding each prompt anew gives the same.
	base := r.store.EntryDir(stageRecord(t, rec, "base").Key)
	adapter := filepath.Join(r.store.EntryDir(stageRecord(t, rec, "adapter").Key), trainer.AdapterDirName)
	dec, err := trainer.OpenDecoder(trainer.DecoderConfig{Model: base, Adapter: adapter, Quantize: "nf4"})
	if err != nil {
		t.Fatal(err)
	}
	tok, err := tokenizer.LoadFile(testenv.GemmaFile(t, "tokenizer.json"))
	if err != nil {
		t.Fatal(err)
	}
	gen, err := converse.New(dec, tok)
	if err != nil {
		t.Fatal(err)
	}
	for _, row := range rows {
		for k := range row.turns {
			c := converse.Conversation{System: generateSystem, Turns: row.turns[:k+1], Answers: row.answers[:k]}
			got, err := gen.Reply(context.Background(), []converse.Conversation{c}, trainer.GenerateOptions{MaxNewTokens: 6}, nil)
			if err != nil {
				t.Fatal(err)
			}
			if got[0].Text != row.answers[k] || int32(len(got[0].Tokens)) != row.tokens[k] {
				t.Errorf("question %d turn %d: the stage answered %q (%d tokens), the conversation alone gives %q (%d)",
					row.id, k+1, row.answers[k], row.tokens[k], got[0].Text, len(got[0].Tokens))
			}
		}
	}

	// Greedy answers do not depend on how many questions decode together
	// (batch_size stays out of the key; forcing recomputes the same key).
	again, err := r.run(r.spec(generateSpec(t, r.dir, ", batch_size: 1")), pipeline.Options{Force: []string{"answers"}})
	if err != nil {
		t.Fatal(err)
	}
	if stageRecord(t, again, "answers").Key != st.Key || stageRecord(t, again, "answers").State != "computed" {
		t.Fatalf("batch_size changed the key or was not recomputed")
	}
	rows2 := readAnswers(t, r, again)
	for i := range rows {
		if fmt.Sprint(rows2[i].answers, rows2[i].tokens) != fmt.Sprint(rows[i].answers, rows[i].tokens) {
			t.Errorf("question %d: batch 2 %q, batch 1 %q", rows[i].id, rows[i].answers, rows2[i].answers)
		}
	}
	data2, _ := os.ReadFile(filepath.Join(entry, AnswersDir, "tiny-tr.jsonl"))
	var a1, a2 Answer
	json.Unmarshal(lines[0], &a1)
	json.Unmarshal(bytes.SplitN(data2, []byte("\n"), 2)[0], &a2)
	if a1.AnswerID != a2.AnswerID {
		t.Errorf("equal answers, answer ids %s and %s", a1.AnswerID, a2.AnswerID)
	}
	third, err := r.run(spec, pipeline.Options{})
	if err != nil || stageRecord(t, third, "answers").State != "cached" {
		t.Fatalf("third run: %v", err)
	}

	// `model:` naming the very checkpoint the adapter was trained on (a
	// model stage's entry) is that base.
	same, err := r.run(r.spec(generateSpec(t, r.dir, "")+fmt.Sprintf(`  same: {kind: generate, needs: [questions, adapter], with: {model: %s, max_new_tokens: 2}}
`, base)), pipeline.Options{})
	if err != nil || stageRecord(t, same, "same").State != "computed" {
		t.Fatalf("model: the adapter's own base: %v", err)
	}

	// Bad inputs on the same adapter: clear errors, and no entry.
	for name, c := range map[string]struct{ stages, want string }{
		"another base": {`  other: {kind: model, with: {preset: tiny, seed: 8, std: 0.3}}
  bad: {kind: generate, needs: [questions, adapter, other]}
`, "and stage other's checkpoint is another checkpoint (its model.safetensors differs): an adapter for another base; if that base is meant, other_base: true"},
		"other_base with no adapter": {`  bad: {kind: generate, needs: [questions], with: {model: ` + base + `, other_base: true}}
`, "other_base: applies a qlora stage's adapter to another base, and no qlora stage is in needs"},
	} {
		t.Run(name, func(t *testing.T) {
			s := r.spec(generateSpec(t, r.dir, "") + c.stages)
			_, err := r.run(s, pipeline.Options{})
			named := err != nil && (strings.Contains(err.Error(), "stage bad (generate)") || strings.Contains(err.Error(), `stage "bad"`))
			if !named || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %v, want %q", err, c.want)
			}
			if !pipeline.IsSpecError(err) { // a spec refused is never planned
				assertNoEntry(t, r, s, "bad")
			}
		})
	}
	// other_base: true answers with the adapter on that other checkpoint.
	other, err := r.run(r.spec(generateSpec(t, r.dir, "")+`  other: {kind: model, with: {preset: tiny, seed: 8, std: 0.3}}
  good: {kind: generate, needs: [questions, adapter, other], with: {other_base: true, max_new_tokens: 2}}
`), pipeline.Options{})
	if err != nil || stageRecord(t, other, "good").State != "computed" {
		t.Fatalf("other_base: %v", err)
	}
}

// assertNoEntry checks that a stage of spec has no cache entry.
func assertNoEntry(t *testing.T, r *testRun, spec, stage string) {
	t.Helper()
	if s := r.plan(spec).Step(stage); s.State == pipeline.Valid {
		t.Errorf("stage %s has an entry after failing", stage)
	}
}

// TestTurnConversation: the prompt of a later turn holds the earlier turns
// and the model's own answers to them, as model turns, and not the turns
// still to come.
func TestTurnConversation(t *testing.T) {
	q := prompt{ID: int64(1), System: "Sistem metni.", Turns: []string{"Birinci soru?", "İkinci soru?", "Üçüncü soru?"}}
	first, err := turnConversation(q, nil).Prompt()
	if err != nil {
		t.Fatal(err)
	}
	if first != "<bos><start_of_turn>user\nSistem metni.\n\nBirinci soru?<end_of_turn>\n<start_of_turn>model\n" {
		t.Errorf("turn 1: %q", first)
	}
	second, err := turnConversation(q, []string{"Birinci cevap."}).Prompt()
	if err != nil {
		t.Fatal(err)
	}
	want := "<bos><start_of_turn>user\nSistem metni.\n\nBirinci soru?<end_of_turn>\n" +
		"<start_of_turn>model\nBirinci cevap.<end_of_turn>\n" +
		"<start_of_turn>user\nİkinci soru?<end_of_turn>\n<start_of_turn>model\n"
	if second != want {
		t.Errorf("turn 2:\n%q\nwant\n%q", second, want)
	}
	third, err := turnConversation(q, []string{"Birinci cevap.", "İkinci cevap."}).Prompt()
	if err != nil || !strings.HasPrefix(third, strings.TrimSuffix(second, "<start_of_turn>model\n")) ||
		!strings.Contains(third, "<start_of_turn>model\nİkinci cevap.<end_of_turn>\n<start_of_turn>user\nÜçüncü soru?") {
		t.Errorf("turn 3: %q (%v)", third, err)
	}
	if strings.Contains(second, "Üçüncü") {
		t.Error("turn 2's prompt holds turn 3")
	}
}

// TestGenerateSingleQuestions answers an Alpaca-style source with a base
// model alone: the question is the instruction and input as the chat
// template stage joins them, its id the row's number, the system text the
// source's.
func TestGenerateSingleQuestions(t *testing.T) {
	r := newTestRun(t)
	var logs bytes.Buffer
	r.log = slog.New(slog.NewTextHandler(&logs, nil))
	tok := testenv.GemmaFile(t, "tokenizer.json")
	src := filepath.Join(r.dir, "src.jsonl")
	os.WriteFile(src, []byte(`{"instruction": "Topla", "input": "2 ve 3", "output": "5"}
{"instruction": "Bir renk söyle", "input": "", "output": "Mavi."}
`), 0o644)
	spec0 := fmt.Sprintf(`name: single
stages:
  alpaca: {kind: jsonl, with: {paths: [%s], system: "Kısa cevap ver."}}
  base: {kind: model, with: {preset: tiny, seed: 2, std: 0.3}}
  answers: {kind: generate, needs: [alpaca, base], with: {tokenizer: %s, max_new_tokens: 4, temperature: 0.8, top_k: 64, top_p: 0.95, seed: 5}}
`, src, tok)
	rec, err := r.run(r.spec(spec0), pipeline.Options{})
	if err != nil {
		t.Fatal(err)
	}
	rows := readAnswers(t, r, rec)
	if len(rows) != 2 || rows[0].id != 1 || rows[1].id != 2 || fmt.Sprint(rows[0].turns) != "[Topla\n\n2 ve 3]" || fmt.Sprint(rows[1].turns) != "[Bir renk söyle]" {
		t.Fatalf("rows: %+v", rows)
	}
	// Instructions have no category, which FastChat's judge needs: said.
	if !strings.Contains(logs.String(), `level=WARN msg="questions without a category`) || !strings.Contains(logs.String(), "questions=2 of=2") {
		t.Errorf("no warning of the missing categories: %s", logs.String())
	}
	st := stageRecord(t, rec, "answers")
	if fmt.Sprintf("%v %v", st.Stats["quantize"], st.Stats["adapter"]) != "none false" {
		t.Errorf("stats: %v", st.Stats)
	}
	// The source's system text went in front of the question.
	dec, err := trainer.OpenDecoder(trainer.DecoderConfig{Model: r.store.EntryDir(stageRecord(t, rec, "base").Key)})
	if err != nil {
		t.Fatal(err)
	}
	tk, _ := tokenizer.LoadFile(tok)
	gen, _ := converse.New(dec, tk)
	got, err := gen.Reply(context.Background(), []converse.Conversation{{System: "Kısa cevap ver.", Turns: rows[0].turns}},
		trainer.GenerateOptions{MaxNewTokens: 4, Temperature: 0.8, TopK: 64, TopP: 0.95, Seed: 5}, nil)
	if err != nil || got[0].Text != rows[0].answers[0] {
		t.Errorf("answer %q, the conversation alone gives %q (%v)", rows[0].answers[0], got[0].Text, err)
	}
	if _, err := os.Stat(filepath.Join(r.store.EntryDir(st.Key), AnswersDir, "model.jsonl")); err != nil {
		t.Errorf("answer file under the default model_id: %v", err)
	}
	// Sampled answers do not depend on the batching either: each question
	// draws from its own stream.
	again, err := r.run(r.spec(strings.Replace(spec0, "seed: 5}", "seed: 5, batch_size: 1}", 1)), pipeline.Options{Force: []string{"answers"}})
	if err != nil {
		t.Fatal(err)
	}
	if rows2 := readAnswers(t, r, again); fmt.Sprint(rows2[0].answers, rows2[1].answers) != fmt.Sprint(rows[0].answers, rows[1].answers) {
		t.Errorf("batch 8: %q %q; batch 1: %q %q", rows[0].answers, rows[1].answers, rows2[0].answers, rows2[1].answers)
	}
}

// TestGenerateResumes: a stage interrupted after some batches keeps their
// answers (the scratch folder's answered.jsonl, a torn last line dropped)
// and answers the rest as an uninterrupted run would.
func TestGenerateResumes(t *testing.T) {
	tok := testenv.GemmaFile(t, "tokenizer.json")
	dir := t.TempDir()
	src := filepath.Join(dir, "src.jsonl")
	os.WriteFile(src, []byte(`{"instruction": "Topla", "input": "2 ve 3", "output": "5"}
{"instruction": "Bir renk söyle", "input": "", "output": "Mavi."}
{"instruction": "Bir sayı söyle", "input": "", "output": "7"}
`), 0o644)
	spec := fmt.Sprintf(`name: resume
stages:
  alpaca: {kind: jsonl, with: {paths: [%s]}}
  base: {kind: model, with: {preset: tiny, seed: 2, std: 0.3}}
  answers: {kind: generate, needs: [alpaca, base], with: {tokenizer: %s, max_new_tokens: 4, temperature: 0.8, seed: 5, batch_size: 1}}
`, src, tok)
	whole := newTestRun(t)
	rec, err := whole.run(whole.spec(spec), pipeline.Options{})
	if err != nil {
		t.Fatal(err)
	}
	want := readAnswers(t, whole, rec)

	r := newTestRun(t)
	var logs bytes.Buffer
	r.log = slog.New(slog.NewTextHandler(&logs, nil))
	path := r.spec(spec)
	scratch := r.store.ScratchDir(r.plan(path).Step("answers").Key)
	os.MkdirAll(scratch, 0o755)
	// Question 0 kept; question 2's line has two answers for its one turn,
	// so it is answered again; the torn last line is dropped.
	kept := `{"question": 0, "texts": ["KEPT"], "tokens": [1], "truncated": [false]}` + "\n" +
		`{"question": 2, "texts": ["A", "B"], "tokens": [1, 1], "truncated": [false, false]}` + "\n" + `{"question": 1, "te`
	if err := os.WriteFile(filepath.Join(scratch, answeredFile), []byte(kept), 0o644); err != nil {
		t.Fatal(err)
	}
	if reason := r.plan(path).Step("answers").Reason; !strings.Contains(reason, "it resumes an interrupted attempt (2 questions answered)") {
		t.Errorf("plan: %q", reason)
	}
	rec, err = r.run(path, pipeline.Options{})
	if err != nil {
		t.Fatal(err)
	}
	got := readAnswers(t, r, rec)
	if len(got) != 3 || fmt.Sprint(got[0].answers) != "[KEPT]" || fmt.Sprint(got[1].answers, got[2].answers) != fmt.Sprint(want[1].answers, want[2].answers) {
		t.Errorf("resumed %+v\nwhole %+v", got, want)
	}
	if !strings.Contains(logs.String(), "resuming: the last attempt answered some questions; their whole batches are kept") {
		t.Errorf("no word of the resume:\n%s", logs.String())
	}
	if _, err := os.Stat(scratch); err == nil {
		t.Error("the scratch folder outlived the entry")
	}
}

// TestGenerateBeyondTheContext: a question whose prompt cannot fit the
// model's context fails before anything is decoded, naming the question,
// and so does a later turn that could not fit even after empty earlier
// answers; none leaves an entry. A turn whose prompt fits with less room
// than max_new_tokens, the first or one grown by the model's own answers,
// is answered in the room left, marked truncated, as chat answers it, and
// the other questions of its batch as they are answered alone.
func TestGenerateBeyondTheContext(t *testing.T) {
	r := newTestRun(t)
	model := filepath.Join(r.dir, "short")
	cfg, err := trainer.Preset("tiny")
	if err != nil {
		t.Fatal(err)
	}
	cfg.MaxPositions = 64
	if err := trainer.WriteRandomCheckpoint(model, cfg, trainer.InitOptions{Seed: 1, DType: "bfloat16", Std: 0.3}); err != nil {
		t.Fatal(err)
	}
	data, _ := os.ReadFile(testenv.GemmaFile(t, "tokenizer.json"))
	os.WriteFile(filepath.Join(model, "tokenizer.json"), data, 0o644)
	long := strings.Repeat("Çok uzun bir soru cümlesi bu. ", 12)
	for name, c := range map[string]struct{ questions, want, fix string }{
		"first turn": {`{"question_id": 1, "turns": ["Kısa soru?"]}
{"question_id": 2, "turns": ["` + long + `"]}
`, "question 2, turn 1: the prompt is", "; shorten the question"}, // max_new_tokens would not help
		// Even after an empty first answer it cannot fit: said up front.
		"later turn, before any answer": {`{"question_id": 7, "turns": ["Kısa soru?", "` + long + `"]}
`, "question 7, turn 2 with every earlier answer empty: the prompt is", "; shorten the question"},
	} {
		t.Run(name, func(t *testing.T) {
			q := filepath.Join(r.dir, "q.jsonl")
			os.WriteFile(q, []byte(c.questions), 0o644)
			spec := r.spec(fmt.Sprintf(`name: short
stages:
  questions: {kind: mt_bench, with: {paths: [%s]}}
  answers: {kind: generate, needs: [questions], with: {model: %s, max_new_tokens: 20}}
`, q, model))
			_, err := r.run(spec, pipeline.Options{})
			if err == nil || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), "beyond the model's context of 64") ||
				!strings.HasSuffix(err.Error(), c.fix) {
				t.Fatalf("error: %v", err)
			}
			assertNoEntry(t, r, spec, "answers")
		})
	}
	// Question 8's second turn fits after an empty answer, not after the
	// model's own: its answer is cut where the context ends.
	q := filepath.Join(r.dir, "q.jsonl")
	answer := func(questions string) []answerRow {
		os.WriteFile(q, []byte(questions), 0o644)
		rec, err := r.run(r.spec(fmt.Sprintf(`name: short
stages:
  questions: {kind: mt_bench, with: {paths: [%s]}}
  answers: {kind: generate, needs: [questions], with: {model: %s, max_new_tokens: 20}}
`, q, model)), pipeline.Options{})
		if err != nil {
			t.Fatal(err)
		}
		return readAnswers(t, r, rec)
	}
	short := `{"question_id": 9, "turns": ["Merhaba", "Nasılsın?"]}` + "\n"
	both := answer(`{"question_id": 8, "turns": ["Kısa soru?", "` + long[:50] + `"]}` + "\n" + short)
	if len(both) != 2 || len(both[0].truncated) != 2 || !both[0].truncated[1] || both[0].tokens[1] >= 20 || both[0].tokens[1] == 0 {
		t.Fatalf("question 8: %+v", both)
	}
	if alone := answer(short); fmt.Sprint(alone[0].answers) != fmt.Sprint(both[1].answers) {
		t.Errorf("question 9 beside a cut one: %q; alone: %q", both[1].answers, alone[0].answers)
	}
	// Question 10's only turn leaves fewer than max_new_tokens positions.
	first := answer(`{"question_id": 10, "turns": ["` + long[:150] + `"]}` + "\n")
	if len(first) != 1 || !first[0].truncated[0] || first[0].tokens[0] >= 20 || first[0].tokens[0] == 0 {
		t.Fatalf("question 10: %+v", first)
	}
}

func TestGenerateParamErrors(t *testing.T) {
	r := newTestRun(t)
	q := filepath.Join(r.dir, "q.jsonl")
	os.WriteFile(q, []byte(mtQuestions), 0o644)
	// Wiring a generate stage cannot answer with is a spec error.
	for stages, want := range map[string]string{
		"  bad: {kind: generate, needs: [chat, base]}\n":                                                                    `needs: "chat" is a chat_template stage, but a generate stage reads questions`,
		"  bad: {kind: generate, needs: [questions, alpaca, base]}\n":                                                       "needs: two sources of questions (questions, alpaca)",
		"  bad: {kind: generate, needs: [questions]}\n":                                                                     "needs: no model",
		"  conv: {kind: jsonl, with: {paths: [q.jsonl], format: sharegpt}}\n  bad: {kind: generate, needs: [conv, base]}\n": `needs: "conv" reads sharegpt conversations, but a generate stage asks instructions`,
		"  bad: {kind: generate, needs: [questions, base]}\n":                                                               `tokenizer: model stage "base" writes no tokenizer`,
		"  bad: {kind: generate, needs: [questions, base], with: {model: m}}\n":                                             "model: names m, and model stage \"base\" is in needs",
		"  merged: {kind: merge, needs: [base]}\n  bad: {kind: generate, needs: [questions, merged, base]}\n":               `merge stage "merged" holds a whole model`,
	} {
		spec := r.spec(fmt.Sprintf(`name: w
stages:
  questions: {kind: mt_bench, with: {paths: [%s]}}
  alpaca: {kind: jsonl, with: {paths: [%s]}}
  chat: {kind: chat_template, needs: [alpaca]}
  base: {kind: model}
`, q, q) + stages)
		_, err := loadSpec(spec, Registry())
		if err == nil || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), `stage "bad"`) {
			t.Errorf("%s: %v, want %q", stages, err, want)
		}
	}
	os.MkdirAll(filepath.Join(r.dir, "ad"), 0o755)
	os.WriteFile(filepath.Join(r.dir, "ad", "adapter_config.json"), []byte("{}"), 0o644)
	for with, want := range map[string]string{
		"{top_k: 64}":                "top_k: applies only when sampling, and temperature is 0 (greedy)",
		"{seed: 3}":                  "seed: applies only when sampling",
		"{model_id: a/b}":            `model_id: "a/b" is not a file name`,
		"{quantize: int8}":           `quantize: unknown "int8"`,
		"{max_new_tokens: 0}":        "max_new_tokens: must be at least 1",
		"{temperature: -1}":          "temperature: -1 must be 0 (greedy) or a positive finite number",
		"{temperature: 1, top_p: 2}": "top_p: 2 must be in (0, 1]",
		"{temperature: 1, top_p: 0}": "top_p: 0 would keep only the most likely token",
		"{model: nowhere}":           "model: ",
		"{model: ad}":                "ad holds no config.json: it is a PEFT adapter; give the base checkpoint",
	} {
		spec := r.spec(fmt.Sprintf("name: p\nstages:\n  questions: {kind: mt_bench, with: {paths: [%s]}}\n  answers: {kind: generate, needs: [questions], with: %s}\n", q, with))
		_, err := loadSpec(spec, Registry())
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v, want %q", with, err, want)
		}
	}
	// The same questions as Parquet (a list column of turns) make the same
	// table.
	os.WriteFile(q, []byte(mtQuestions), 0o644)
	table := func(path string) []byte {
		rec, err := r.run(r.spec(fmt.Sprintf("name: p\nstages:\n  questions: {kind: mt_bench, with: {paths: [%s]}}\n", path)), pipeline.Options{})
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		data, err := os.ReadFile(filepath.Join(stageRecord(t, rec, "questions").Entry, pipeline.TableFile))
		if err != nil {
			t.Fatal(err)
		}
		return data
	}
	qs, err := dataset.ReadQuestions([]string{q}, 0, nil)
	if err != nil {
		t.Fatal(err)
	}
	rec := dataset.QuestionsRecord(qs, nil)
	pq := filepath.Join(r.dir, "question.parquet")
	writeParquet(t, pq, rec)
	rec.Release()
	if !bytes.Equal(table(q), table(pq)) {
		t.Error("the questions read from Parquet differ from those of JSON lines")
	}
	// An MT-Bench file without turns fails in its own stage.
	os.WriteFile(q, []byte(`{"question_id": 1, "category": "x", "prompt": ["a"]}`+"\n"), 0o644)
	spec := r.spec(fmt.Sprintf("name: p\nstages:\n  questions: {kind: mt_bench, with: {paths: [%s]}}\n", q))
	if _, err := r.run(spec, pipeline.Options{}); err == nil || !strings.Contains(err.Error(), "question 1 has no turns") {
		t.Errorf("questions without turns: %v", err)
	}
}

// TestGenerateBaseFromTheAdaptersLineage: an adapter trained on a
// checkpoint folder (`model:` in the qlora stage, as the gemma DAGs have
// it) is decoded on that folder without naming it again; naming another
// checkpoint is refused.
func TestGenerateBaseFromTheAdaptersLineage(t *testing.T) {
	r := newTestRun(t)
	folder := func(name string, seed uint64) string {
		dir := filepath.Join(r.dir, name)
		cfg, err := trainer.Preset("tiny")
		if err != nil {
			t.Fatal(err)
		}
		if err := trainer.WriteRandomCheckpoint(dir, cfg, trainer.InitOptions{Seed: seed, DType: "bfloat16", Std: 0.3}); err != nil {
			t.Fatal(err)
		}
		return dir
	}
	a, b := folder("a", 7), folder("b", 8)
	q := filepath.Join(r.dir, "q.jsonl")
	os.WriteFile(q, []byte(mtQuestions), 0o644)
	train := strings.Replace(trainSpec(t, 2), "  base: {kind: model, with: {preset: tiny, seed: 7, std: 0.3}}\n", "", 1)
	train = strings.Replace(train, "needs: [pack, base]", "needs: [pack]", 1)
	train = strings.Replace(train, "with: {r: 4,", "with: {model: "+a+", quantize: none, r: 4,", 1)
	spec := r.spec(train + fmt.Sprintf("  questions: {kind: mt_bench, with: {paths: [%s]}}\n  answers: {kind: generate, needs: [questions, adapter], with: {max_new_tokens: 3}}\n", q))
	rec, err := r.run(spec, pipeline.Options{})
	if err != nil {
		t.Fatal(err)
	}
	st := stageRecord(t, rec, "answers")
	if fmt.Sprintf("%v %v", st.Stats["quantize"], st.Stats["adapter"]) != "none true" {
		t.Errorf("stats: %v (an adapter trained with quantize: none decodes on the stored weights)", st.Stats)
	}
	rows := readAnswers(t, r, rec)
	dec, err := trainer.OpenDecoder(trainer.DecoderConfig{Model: a, Adapter: filepath.Join(r.store.EntryDir(stageRecord(t, rec, "adapter").Key), trainer.AdapterDirName)})
	if err != nil {
		t.Fatal(err)
	}
	tok, _ := tokenizer.LoadFile(testenv.GemmaFile(t, "tokenizer.json"))
	gen, _ := converse.New(dec, tok)
	got, err := gen.Reply(context.Background(), []converse.Conversation{{Turns: rows[1].turns}}, trainer.GenerateOptions{MaxNewTokens: 3}, nil)
	if err != nil || got[0].Text != rows[1].answers[0] {
		t.Errorf("answer %q; the adapter on folder a gives %q (%v)", rows[1].answers[0], got[0].Text, err)
	}

	bad := r.spec(train + fmt.Sprintf("  questions: {kind: mt_bench, with: {paths: [%s]}}\n  answers: {kind: generate, needs: [questions, adapter], with: {model: %s}}\n", q, b))
	_, err = r.run(bad, pipeline.Options{})
	if err == nil || !strings.Contains(err.Error(), "an adapter for another base") || !strings.Contains(err.Error(), "trained on "+a) {
		t.Fatalf("another base: %v", err)
	}
	assertNoEntry(t, r, bad, "answers")
}

// TestGenerateFromTheHub: MT-Bench questions from a dataset repository, an
// adapter trained on an hf:// model: the base is fetched at the commit
// training used (the tokenizer beside it), without naming it again; a
// `model:` at another commit is refused.
func TestGenerateFromTheHub(t *testing.T) {
	f := newHubFixture(t)
	f.srv.AddRepo("dataset", "tr-bench/mt-bench-tr").Commit("main", map[string][]byte{"question.jsonl": []byte(mtQuestions)})
	r := newTestRun(t)
	answers := `  questions: {kind: mt_bench, with: {paths: ["hf://datasets/tr-bench/mt-bench-tr/question.jsonl"]}}
  answers: {kind: generate, needs: [questions, adapter], with: {max_new_tokens: 3%s}}
`
	spec := r.spec(hubSpec + fmt.Sprintf(answers, ""))
	rec, err := r.run(spec, pipeline.Options{})
	if err != nil {
		t.Fatal(err)
	}
	st := stageRecord(t, rec, "answers")
	if fmt.Sprintf("%v %v %v", st.Stats["questions"], st.Stats["quantize"], st.Stats["adapter"]) != "3 nf4 true" {
		t.Errorf("answers: %v", st.Stats)
	}
	q := stageRecord(t, rec, "questions")
	if len(q.Refs) != 1 || q.Refs[0].Name != "hf://datasets/tr-bench/mt-bench-tr@main" || q.Rows != 3 {
		t.Errorf("questions: rows %d, refs %+v", q.Rows, q.Refs)
	}
	// The answers are those of the adapter on the checkpoint at the commit.
	c1 := f.model.Head("main")
	rows := readAnswers(t, r, rec)
	snap := filepath.Join(f.cache, "models--google--gemma-3-tiny-it", "snapshots", c1)
	dec, err := trainer.OpenDecoder(trainer.DecoderConfig{Model: snap, Quantize: "nf4",
		Adapter: filepath.Join(r.store.EntryDir(stageRecord(t, rec, "adapter").Key), trainer.AdapterDirName)})
	if err != nil {
		t.Fatal(err)
	}
	tok, _ := tokenizer.LoadFile(filepath.Join(snap, "tokenizer.json"))
	gen, _ := converse.New(dec, tok)
	got, err := gen.Reply(context.Background(), []converse.Conversation{{Turns: rows[1].turns}}, trainer.GenerateOptions{MaxNewTokens: 3}, nil)
	if err != nil || got[0].Text != rows[1].answers[0] {
		t.Errorf("answer %q; the adapter on the snapshot gives %q (%v)", rows[1].answers[0], got[0].Text, err)
	}

	// main moves on; an adapter trained at the old commit is not decoded
	// on the new one.
	f.model.Commit("main", map[string][]byte{"README.md": []byte("moved\n")})
	pinned := strings.Replace(hubSpec, `model: "hf://google/gemma-3-tiny-it"`, fmt.Sprintf(`model: "hf://google/gemma-3-tiny-it@%s"`, c1), 1)
	bad := r.spec(pinned + fmt.Sprintf(answers, `, model: "hf://google/gemma-3-tiny-it@main"`))
	_, err = r.run(bad, pipeline.Options{})
	if err == nil || !strings.Contains(err.Error(), "trained on hf://google/gemma-3-tiny-it@"+c1) || !strings.Contains(err.Error(), "an adapter for another base") {
		t.Fatalf("another commit: %v", err)
	}
	assertNoEntry(t, r, bad, "answers")
}
