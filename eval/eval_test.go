package eval

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/memory"
	"github.com/apache/arrow-go/v18/parquet"
	"github.com/apache/arrow-go/v18/parquet/pqarrow"

	"gemmaft/chat"
	"gemmaft/internal/testenv"
	"gemmaft/tokenizer"
	"gemmaft/trainer"
)

// smallModel is a random Gemma 3 of a small vocabulary whose sliding
// window (4) is shorter than the contexts.
func smallModel(t testing.TB) *trainer.Model {
	t.Helper()
	c, _ := trainer.Preset("tiny")
	c.VocabSize, c.Hidden, c.Intermediate, c.Layers = 101, 32, 48, 7
	c.Heads, c.KVHeads, c.HeadDim, c.QueryPreAttnScalar, c.SlidingWindow = 4, 2, 8, 8, 4
	c.DType = "float32"
	c.LayerTypes = nil
	for i := 0; i < c.Layers; i++ {
		lt := trainer.SlidingAttention
		if (i+1)%6 == 0 {
			lt = trainer.FullAttention
		}
		c.LayerTypes = append(c.LayerTypes, lt)
	}
	dir := t.TempDir()
	if err := trainer.WriteRandomCheckpoint(dir, c, trainer.InitOptions{Seed: 3, Std: 0.3, NormStd: 0.5}); err != nil {
		t.Fatal(err)
	}
	m, err := trainer.LoadModel(dir)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// directLogLik is a request's log-likelihood computed from Model.Logits of
// the whole sequence: the log-softmax at the position before each
// continuation token, summed in float64.
func directLogLik(t testing.TB, m *trainer.Model, a *trainer.Adapter, r Request) (float64, bool) {
	t.Helper()
	whole := append(append([]int32(nil), r.Context...), r.Continuation...)
	b, err := trainer.NewBatch([]trainer.PackedRow{{InputIDs: whole, Labels: whole, SeqLengths: []int32{int32(len(whole))}}})
	if err != nil {
		t.Fatal(err)
	}
	logits, err := m.Logits(a, b)
	if err != nil {
		t.Fatal(err)
	}
	V := m.Config.VocabSize
	var sum float64
	greedy := true
	for j, id := range r.Continuation {
		row := logits[(len(r.Context)-1+j)*V : (len(r.Context)+j)*V]
		mx, arg := math.Inf(-1), 0
		for i, v := range row {
			if float64(v) > mx {
				mx, arg = float64(v), i
			}
		}
		var s float64
		for _, v := range row {
			s += math.Exp(float64(v) - mx)
		}
		sum += float64(row[id]) - mx - math.Log(s)
		greedy = greedy && arg == int(id)
	}
	return sum, greedy
}

// TestScorerMatchesLogits: the scorer's log-likelihoods, over batches of
// several requests with shared contexts (as a question's choices share
// one), equal those computed here from Model.Logits, with and without an
// adapter, whatever the batch size.
func TestScorerMatchesLogits(t *testing.T) {
	m := smallModel(t)
	a, err := trainer.NewAdapter(m.Config, trainer.LoRAConfig{R: 4, Alpha: 8, Targets: trainer.AllModules}, 1)
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	for _, p := range a.Params() {
		if strings.HasSuffix(p.Name, "lora_B") {
			for i := range p.Data {
				p.Data[i] = float32(rng.NormFloat64() * 0.1)
			}
		}
	}
	ids := randomIDs(rng, m.Config.VocabSize)
	var reqs []Request
	for q := 0; q < 6; q++ {
		ctx := append([]int32{2}, ids(3+rng.IntN(10))...)
		for c := 0; c < 4; c++ {
			reqs = append(reqs, Request{Context: ctx, Continuation: ids(1)})
		}
		for c := 0; c < 3; c++ {
			reqs = append(reqs, Request{Context: ctx, Continuation: ids(1 + rng.IntN(4))})
		}
	}
	reqs = append(reqs, Request{Context: []int32{2}, Continuation: ids(6)})
	for _, ad := range []*trainer.Adapter{nil, a} {
		for _, batch := range []int{1, 24, 0} {
			t.Run(fmt.Sprintf("adapter=%v/batch=%d", ad != nil, batch), func(t *testing.T) {
				calls := 0
				s := &ModelScorer{Model: m, Adapter: ad, BatchTokens: batch, Progress: func(done, total int) {
					calls++
					if done > total {
						t.Errorf("progress %d of %d", done, total)
					}
				}}
				got, err := s.LogLikelihoods(context.Background(), reqs)
				if err != nil {
					t.Fatal(err)
				}
				for i, r := range reqs {
					want, g := directLogLik(t, m, ad, r)
					if math.Abs(got[i].LogLik-want) > 1e-5*math.Max(1, math.Abs(want)) {
						t.Errorf("request %d: %.8f, from the logits %.8f", i, got[i].LogLik, want)
					}
					if got[i].Greedy != g {
						t.Errorf("request %d: greedy %v, the logits say %v", i, got[i].Greedy, g)
					}
				}
				if batch == 1 && calls < 7 {
					t.Errorf("a one-token budget made %d batches; each context should be its own", calls)
				}
			})
		}
	}
}

func TestScorerRejectsLongRequests(t *testing.T) {
	m := smallModel(t)
	m.Config.MaxPositions = 8
	s := &ModelScorer{Model: m}
	_, err := s.LogLikelihoods(context.Background(), []Request{{Context: make([]int32, 6), Continuation: make([]int32, 3)}})
	if err == nil || !strings.Contains(err.Error(), "more than the model's context of 8 tokens") {
		t.Fatalf("want a context-length error, got %v", err)
	}
}

// tableScorer answers each request with the log-likelihood set for its
// continuation's first token.
type tableScorer map[int32]float64

func (s tableScorer) MaxLength() int { return 100 }
func (s tableScorer) LogLikelihoods(_ context.Context, reqs []Request) ([]Result, error) {
	out := make([]Result, len(reqs))
	for i, r := range reqs {
		v, ok := s[r.Continuation[0]]
		if !ok {
			return nil, fmt.Errorf("no value for %d", r.Continuation[0])
		}
		out[i] = Result{LogLik: v}
	}
	return out, nil
}

// TestPicksHandBuilt: acc takes the letter of highest log-likelihood, the
// first of equals; acc_norm the choice text of highest log-likelihood per
// UTF-8 byte (not per character), so a long choice can win it while
// losing on its total; accuracies overall and per subject follow.
func TestPicksHandBuilt(t *testing.T) {
	qs := []Question{
		// Letter A wins acc (wrong); the long choice B wins acc_norm (right)
		// though its total is lower: -10/26 > -4/4.
		{Subject: "s", Choices: []string{"kısa", "çok daha uzun bir seçenek"}, Answer: 1},
		// Equal letters: the first (A, right). By byte, ığüşöç (12 bytes)
		// wins: -9/12 > -7/8; by character it would lose: -9/6 < -7/8.
		{Subject: "t", Choices: []string{"ığüşöç", "abcdefgh"}, Answer: 0},
		// Letter C wins (right); text A wins (wrong).
		{Subject: "t", Choices: []string{"a", "b", "c"}, Answer: 2},
	}
	if len("çok daha uzun bir seçenek") != 27 || len("ığüşöç") != 12 {
		t.Fatal("byte lengths in the comments are off")
	}
	ll := tableScorer{}
	p := &MCPrompts{Questions: qs, Letters: make([][]Request, 3), Texts: make([][]Request, 3)}
	set := func(q int, letters, texts []float64) {
		for j := range letters {
			lt, tt := int32(100*q+j), int32(100*q+50+j)
			ll[lt], ll[tt] = letters[j], texts[j]
			p.Letters[q] = append(p.Letters[q], Request{Context: []int32{2}, Continuation: []int32{lt}})
			p.Texts[q] = append(p.Texts[q], Request{Context: []int32{2}, Continuation: []int32{tt}})
		}
	}
	set(0, []float64{-1, -2}, []float64{-4, -10})
	set(1, []float64{-3, -3}, []float64{-9, -7})
	set(2, []float64{-5, -6, -0.5}, []float64{-1, -2, -3})
	items, err := ScoreMC(context.Background(), ll, p)
	if err != nil {
		t.Fatal(err)
	}
	for i, want := range [][2]int{{0, 1}, {0, 0}, {2, 0}} {
		if items[i].Pred != want[0] || items[i].PredNorm != want[1] {
			t.Errorf("question %d: pred %s, pred_norm %s; want %s, %s", i, Letter(items[i].Pred), Letter(items[i].PredNorm), Letter(want[0]), Letter(want[1]))
		}
	}
	all, subjects := Summarize(items)
	if all.Questions != 3 || all.Acc != 2.0/3 || all.AccNorm != 2.0/3 {
		t.Errorf("overall %+v, want 3 questions, acc 2/3, acc_norm 2/3", all)
	}
	if s := subjects["s"]; s.Questions != 1 || s.Acc != 0 || s.AccNorm != 1 {
		t.Errorf("subject s %+v, want acc 0, acc_norm 1", s)
	}
	if s := subjects["t"]; s.Questions != 2 || s.Acc != 1 || s.AccNorm != 0.5 {
		t.Errorf("subject t %+v, want acc 1, acc_norm 0.5", s)
	}
	// Questions without a subject beside ones with have a row of their
	// own, so that the rows account for every question; a set without
	// subjects has no rows.
	items[1].Subject = ""
	if _, subjects := Summarize(items); len(subjects) != 3 || subjects[NoSubject].Questions != 1 || subjects["t"].Questions != 1 {
		t.Errorf("one question of t without a subject: %+v", subjects)
	}
	// A set that spells the row's name out as a subject adds to the row,
	// not replaces it.
	items[0].Subject = NoSubject
	if _, subjects := Summarize(items); len(subjects) != 2 || subjects[NoSubject].Questions != 2 {
		t.Errorf("a subject called %q beside one without: %+v", NoSubject, subjects)
	}
	for i := range items {
		items[i].Subject = ""
	}
	if _, subjects := Summarize(items); len(subjects) != 0 {
		t.Errorf("no subjects: %+v", subjects)
	}
}

// TestPromptFormat: the prompts are lm-evaluation-harness's mmlu and
// mmlu_continuation prompts, written out here by hand.
func TestPromptFormat(t *testing.T) {
	shot := Question{Subject: "temel_matematik", Question: " 2 + 2 kaçtır? ", Choices: []string{"3", "4", "5"}, Answer: 1}
	q := Question{Subject: "temel_matematik", Question: "Bir düzine kaç tanedir?\n", Choices: []string{"6", "12", "20", "24"}, Answer: 1}
	letters, cloze := FormatMMLU.Contexts(q, []Question{shot})
	wantL := "The following are multiple choice questions (with answers) about temel matematik.\n\n" +
		"2 + 2 kaçtır?\nA. 3\nB. 4\nC. 5\nAnswer: B\n\n" +
		"Bir düzine kaç tanedir?\nA. 6\nB. 12\nC. 20\nD. 24\nAnswer:"
	wantC := "The following are questions (with answers) about temel matematik.\n\n" +
		"Question: 2 + 2 kaçtır?\nAnswer: 4\n\n" +
		"Question: Bir düzine kaç tanedir?\nAnswer:"
	if letters != wantL {
		t.Errorf("lettered prompt\n%q\nwant\n%q", letters, wantL)
	}
	if cloze != wantC {
		t.Errorf("continuation prompt\n%q\nwant\n%q", cloze, wantC)
	}
	q.Subject = ""
	if l, c := FormatMMLU.Contexts(q, nil); !strings.HasPrefix(l, "The following are multiple choice questions (with answers).\n\nBir") ||
		!strings.HasPrefix(c, "The following are questions (with answers).\n\nQuestion: Bir") {
		t.Errorf("without a subject: %q, %q", l, c)
	}
	// lm-evaluation-harness's turkishmmlu task, and its continuation twin.
	q.Subject = "Mathematics"
	letters, cloze = FormatTurkishMMLU.Contexts(q, []Question{shot})
	wantL = "Soru: 2 + 2 kaçtır?\nA. 3\nB. 4\nC. 5\nCevap: B\n\n" +
		"Soru: Bir düzine kaç tanedir?\nA. 6\nB. 12\nC. 20\nD. 24\nCevap:"
	wantC = "Soru: 2 + 2 kaçtır?\nCevap: 4\n\n" +
		"Soru: Bir düzine kaç tanedir?\nCevap:"
	if letters != wantL || cloze != wantC {
		t.Errorf("turkishmmlu prompts\n%q\n%q", letters, cloze)
	}
}

// TestBuildMCTokens: with the Gemma 3 tokenizer, a context is <bos> and
// the prompt's tokens, and a continuation the tokens the whole text has
// past the context's (the harness's _encode_pair), " A" for the letters.
func TestBuildMCTokens(t *testing.T) {
	tok, err := tokenizer.LoadFile(testenv.GemmaFile(t, "tokenizer.json"))
	if err != nil {
		t.Fatal(err)
	}
	qs := []Question{{Subject: "coğrafya", Question: "Türkiye'nin başkenti neresidir?", Choices: []string{"İstanbul", "Ankara", "İzmir", "Bursa", "Konya"}, Answer: 1}}
	dev := []Question{{Subject: "coğrafya", Question: "Topkapı Sarayı hangi şehirdedir?", Choices: []string{"Bursa", "İstanbul"}, Answer: 1}}
	p, err := BuildMC(tok, qs, MCOptions{Shots: 1, Dev: dev})
	if err != nil {
		t.Fatal(err)
	}
	bos, _ := tok.ID("<bos>")
	lc, cc := FormatMMLU.Contexts(qs[0], dev)
	for _, c := range []struct {
		ctx  string
		reqs []Request
		cont func(j int) string
	}{{lc, p.Letters[0], func(j int) string { return " " + Letter(j) }}, {cc, p.Texts[0], func(j int) string { return " " + qs[0].Choices[j] }}} {
		want := append([]int32{bos}, tok.EncodeIDs(c.ctx, false)...)
		for j, r := range c.reqs {
			if fmt.Sprint(r.Context) != fmt.Sprint(want) {
				t.Fatalf("choice %d: context tokens %v, want %v", j, r.Context, want)
			}
			whole := append([]int32{bos}, tok.EncodeIDs(c.ctx+c.cont(j), false)...)
			if fmt.Sprint(r.Continuation) != fmt.Sprint(whole[len(want):]) {
				t.Errorf("choice %d: continuation %v, want %v", j, r.Continuation, whole[len(want):])
			}
			text, _ := tok.Decode(r.Continuation, false)
			if text != c.cont(j) {
				t.Errorf("choice %d: continuation decodes to %q, want %q", j, text, c.cont(j))
			}
		}
	}
	if len(p.Letters[0][0].Continuation) != 1 {
		t.Errorf("\" A\" is %d tokens; the letters should be one each", len(p.Letters[0][0].Continuation))
	}
	// Shots come from the question's subject only.
	if _, err := BuildMC(tok, qs, MCOptions{Shots: 1, Dev: []Question{{Subject: "tarih", Question: "?", Choices: []string{"a", "b"}}}}); err == nil ||
		!strings.Contains(err.Error(), `1-shot needs 1 dev question of subject "coğrafya"`) {
		t.Errorf("shots from another subject: %v", err)
	}
}

// TestDemoSet: the project's own set reads, has what its README says,
// and every question's answer is among its choices.
func TestDemoSet(t *testing.T) {
	dir := filepath.Join(testenv.RepoRoot(t), "dataset", "demo")
	test, err := ReadQuestions([]string{filepath.Join(dir, "mc-tr-test.jsonl")}, nil)
	if err != nil {
		t.Fatal(err)
	}
	dev, err := ReadQuestions([]string{filepath.Join(dir, "mc-tr-dev.jsonl")}, nil)
	if err != nil {
		t.Fatal(err)
	}
	count := func(qs []Question) map[string]int {
		n := map[string]int{}
		for _, q := range qs {
			n[q.Subject]++
			if len(q.Choices) != 5 {
				t.Errorf("%s: %d choices", q.Where, len(q.Choices))
			}
		}
		return n
	}
	nt, nd := count(test), count(dev)
	if len(test) < 60 || len(nt) < 3 {
		t.Errorf("%d questions over %d subjects", len(test), len(nt))
	}
	for s := range nt {
		if nd[s] < 5 {
			t.Errorf("subject %s has %d dev questions", s, nd[s])
		}
	}
	letters := map[int]int{}
	for _, q := range test {
		letters[q.Answer]++
	}
	for l := 0; l < 5; l++ {
		if letters[l] < len(test)/5-1 {
			t.Errorf("answer %s is right %d times of %d", Letter(l), letters[l], len(test))
		}
	}
}

func writeFile(t *testing.T, dir, name, content string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// writeParquetSet writes a set with one column per choice (A to D, D
// empty on the second row), integer answers and Turkish column names.
func writeParquetSet(t *testing.T, path string) {
	t.Helper()
	fields := []arrow.Field{{Name: "bolum", Type: arrow.BinaryTypes.String}, {Name: "soru", Type: arrow.BinaryTypes.String}}
	for _, l := range []string{"sa", "sb", "sc", "sd"} {
		fields = append(fields, arrow.Field{Name: l, Type: arrow.BinaryTypes.String, Nullable: true})
	}
	fields = append(fields, arrow.Field{Name: "cevap", Type: arrow.PrimitiveTypes.Int64})
	b := array.NewRecordBuilder(memory.DefaultAllocator, arrow.NewSchema(fields, nil))
	defer b.Release()
	rows := [][]string{{"tarih", "Cumhuriyet hangi yıl ilan edildi?", "1920", "1923", "1938", "1950"}, {"fen", "Su kaç derecede kaynar?", "50", "90", "100", ""}}
	for i, r := range rows {
		for c, v := range r {
			sb := b.Field(c).(*array.StringBuilder)
			if v == "" {
				sb.AppendNull()
			} else {
				sb.Append(v)
			}
		}
		b.Field(6).(*array.Int64Builder).Append([]int64{1, 2}[i])
	}
	rec := b.NewRecordBatch()
	defer rec.Release()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	w, err := pqarrow.NewFileWriter(rec.Schema(), f, parquet.NewWriterProperties(), pqarrow.DefaultWriterProps())
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Write(rec); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestReadQuestionsLayouts: a list column with letter answers (JSONL), and
// one column per choice with index answers under other names (Parquet).
func TestReadQuestionsLayouts(t *testing.T) {
	dir := t.TempDir()
	jl := writeFile(t, dir, "a.jsonl", `{"question": "Hangisi meyvedir?", "choices": ["elma", "taş", "demir"], "answer": "a", "subject": "genel"}

{"question": "2 + 3 kaçtır?", "choices": ["4", "5"], "answer": 1}
`)
	qs, err := ReadQuestions([]string{jl}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(qs) != 2 || qs[0].Answer != 0 || qs[0].Subject != "genel" || len(qs[0].Choices) != 3 || qs[1].Answer != 1 || qs[1].Subject != "" || qs[1].Where != jl+":3" {
		t.Errorf("read %+v", qs)
	}
	// A .json file may hold one array (as TurkishMMLU's files do).
	arr := writeFile(t, dir, "c.json", ` [{"question": "Q?", "choices": ["a", "b", "c", "d", "e"], "answer": "E"}]`)
	if qs, err = ReadQuestions([]string{arr}, nil); err != nil || len(qs) != 1 || qs[0].Answer != 4 || qs[0].Where != arr+" element .[0]" {
		t.Errorf("JSON array: %+v, %v", qs, err)
	}
	pq := filepath.Join(dir, "b.parquet")
	writeParquetSet(t, pq)
	cols := map[string]string{"question": "soru", "answer": "cevap", "subject": "bolum", "A": "sa", "B": "sb", "C": "sc", "D": "sd"}
	qs, err = ReadQuestions([]string{pq}, cols)
	if err != nil {
		t.Fatal(err)
	}
	if len(qs) != 2 || qs[0].Answer != 1 || len(qs[0].Choices) != 4 || qs[0].Subject != "tarih" || len(qs[1].Choices) != 3 || qs[1].Choices[2] != "100" || qs[1].Answer != 2 {
		t.Errorf("read %+v", qs)
	}
}

// TestReadQuestionsErrors: what is wrong with a set is said, with the file
// and line.
func TestReadQuestionsErrors(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []struct {
		name, content string
		columns       map[string]string
		want          string
	}{
		{"no answer column", `{"question": "Q?", "choices": ["a", "b"]}`, nil, `x.jsonl:1: no answer (column "answer"); map the file's column with columns: {answer: NAME}`},
		{"mapped answer missing", `{"question": "Q?", "choices": ["a", "b"], "cevap": "A"}
{"question": "Q2?", "choices": ["a", "b"], "answer": "A"}`, map[string]string{"answer": "cevap"}, `x.jsonl:2: no answer (column "cevap")`},
		{"mapped column in no row", `{"question": "Q?", "choices": ["a", "b"], "answer": "A", "bolum": "tarih"}`, map[string]string{"subject": "bölüm"},
			`x.jsonl: columns maps subject to "bölüm", which no row has (its columns: answer, bolum, choices, question)`},
		{"null choice", `{"question": "Q?", "choices": ["a", null], "answer": "A"}`, nil, `choice B of column "choices" is null, not a text`},
		{"fractional index", `{"question": "Q?", "choices": ["a", "b"], "answer": 1.5}`, nil, "answer 1.5 is not an integer index"},
		{"letter outside", `{"question": "Q?", "choices": ["a", "b", "c", "d"], "answer": "E"}`, nil, `answer "E" is outside the 4 choices (A to D)`},
		{"index outside", `{"question": "Q?", "choices": ["a", "b"], "answer": 2}`, nil, "answer 2 is outside the 2 choices (indices 0 to 1)"},
		{"negative index", `{"question": "Q?", "choices": ["a", "b"], "answer": -1}`, nil, "answer -1 is outside"},
		{"no choice", `{"question": "Q?", "choices": [], "answer": 0}`, nil, "no choice; a question needs 2 or more"},
		{"not a letter", `{"question": "Q?", "choices": ["a", "b"], "answer": "1"}`, nil, `answer "1" is a number written as text: an index is a JSON integer (0 for A)`},
		{"no question", `{"choices": ["a", "b"], "answer": "A"}`, nil, `no question (column "question")`},
		{"no choices", `{"question": "Q?", "answer": "A"}`, nil, "no choices"},
		{"one choice", `{"question": "Q?", "choices": ["a"], "answer": "A"}`, nil, "one choice; a question needs 2 or more"},
		{"empty choice", `{"question": "Q?", "choices": ["a", " "], "answer": "A"}`, nil, "choice B is empty"},
		{"gap in the columns", `{"question": "Q?", "A": "a", "B": "b", "C": "", "D": "d", "answer": "B"}`, nil, "x.jsonl:1: choice C is empty but choice D after it is not"},
		{"null in the columns", `{"question": "Q?", "A": "a", "B": null, "C": "c", "answer": "A"}`, nil, "choice B is empty but choice C after it is not"},
		{"choices not a list", `{"question": "Q?", "choices": "a, b", "answer": "A"}`, nil, "not a list"},
		{"not json", `question: Q?`, nil, "x.jsonl:1: not a JSON object"},
		{"empty file", ``, nil, "no questions"},
		{"unknown mapping", `{"question": "Q?", "choices": ["a", "b"], "answer": "A"}`, map[string]string{"soru": "q"}, `cannot map "soru"`},
		{"empty question", `{"question": " ", "choices": ["a", "b"], "answer": "A"}`, nil, `x.jsonl:1: the question (column "question") is empty`},
		{"two names to one column", `{"soru": "Q?", "choices": ["a", "b"], "answer": "A"}`, map[string]string{"question": "soru", "answer": "soru"}, `answer and question are both mapped to "soru"`},
		{"choices as a list and as letters", `{"question": "Q?", "opts": ["a", "b"], "s1": "a", "answer": "A"}`, map[string]string{"choices": "opts", "A": "s1"}, "choices and A are both mapped"},
	} {
		t.Run(c.name, func(t *testing.T) {
			p := writeFile(t, dir, "x.jsonl", c.content)
			_, err := ReadQuestions([]string{p}, c.columns)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Errorf("want an error with %q, got %v", c.want, err)
			}
		})
	}
	if _, err := ReadQuestions([]string{writeFile(t, dir, "x.csv", "q,a\n")}, nil); err == nil || !strings.Contains(err.Error(), "unknown format") {
		t.Errorf("csv: %v", err)
	}
}

// TestShotsPassOverTheQuestion: where the dev split holds the question
// being scored, its shots are the next dev questions, never itself; a
// subject with no other dev question is an error saying so.
func TestShotsPassOverTheQuestion(t *testing.T) {
	q := func(s, text string) Question {
		return Question{Subject: s, Question: text, Choices: []string{"a", "b"}, Where: "set.jsonl:1"}
	}
	set := []Question{q("x", "1"), q("x", "2"), q("x", "3"), q("y", "4"), q("y", "5")}
	shots, err := Shots(set, MCOptions{Shots: 1, Dev: set})
	if err != nil {
		t.Fatal(err)
	}
	for i, want := range []string{"2", "1", "1", "5", "4"} {
		if len(shots[i]) != 1 || shots[i][0].Question != want {
			t.Errorf("question %s: shots %v, want %s", set[i].Question, shots[i], want)
		}
	}
	if _, err := Shots(set, MCOptions{Shots: 2, Dev: set}); err == nil || !strings.Contains(err.Error(), `2-shot needs 2 dev questions of subject "y", the dev split has 2, one of them the question itself`) {
		t.Errorf("2-shot from a subject of 2: %v", err)
	}
	// Other choices make another question.
	other := q("y", "4")
	other.Choices = []string{"a", "c"}
	if shots, err := Shots([]Question{q("y", "4")}, MCOptions{Shots: 1, Dev: []Question{other}}); err != nil || shots[0][0].Choices[1] != "c" {
		t.Errorf("the same text with other choices: %v %v", shots, err)
	}
	if _, err := Shots([]Question{q("", "6")}, MCOptions{Shots: 1, Dev: set}); err == nil || !strings.Contains(err.Error(), "questions without a subject (set.jsonl:1 has none; the dev split's 5 all have one)") {
		t.Errorf("a question without a subject, a dev split with them: %v", err)
	}
}

// TestReferencePromptsAgree: scripts/reference/mc_reference.py, the
// transformers implementation run on the GPU machine, builds the same
// prompts and continuations as this package, for the demo set 1-shot and
// in the turkishmmlu layout.
func TestReferencePromptsAgree(t *testing.T) {
	testenv.NeedTool(t, "python3")
	root := testenv.RepoRoot(t)
	dir := filepath.Join(root, "dataset", "demo")
	test, _ := ReadQuestions([]string{filepath.Join(dir, "mc-tr-test.jsonl")}, nil)
	for _, c := range []struct {
		format Format
		shots  int
		dev    string
	}{{FormatMMLU, 1, "mc-tr-dev.jsonl"}, {FormatTurkishMMLU, 2, "mc-tr-dev.jsonl"}, {FormatMMLU, 2, "mc-tr-test.jsonl"}} {
		dev, _ := ReadQuestions([]string{filepath.Join(dir, c.dev)}, nil)
		cmd := exec.Command("python3", "scripts/reference/mc_reference.py", "--prompts-only", filepath.Join(dir, "mc-tr-test.jsonl"),
			"--dev", filepath.Join(dir, c.dev), "--shots", fmt.Sprint(c.shots), "--prompt", c.format.Name)
		cmd.Dir = root
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("%s: %v", cmd, err)
		}
		lines := strings.Split(strings.TrimSpace(string(out)), "\n")
		shots, err := Shots(test, MCOptions{Shots: c.shots, Dev: dev})
		if err != nil {
			t.Fatal(err)
		}
		if len(lines) != len(test) {
			t.Fatalf("%s: %d prompts for %d questions", c.format.Name, len(lines), len(test))
		}
		for i, line := range lines {
			var py struct {
				Letters             string   `json:"letters"`
				Cloze               string   `json:"cloze"`
				LetterContinuations []string `json:"letter_continuations"`
				ClozeContinuations  []string `json:"cloze_continuations"`
			}
			if err := json.Unmarshal([]byte(line), &py); err != nil {
				t.Fatal(err)
			}
			l, cl := c.format.Contexts(test[i], shots[i])
			var lc, cc []string
			for j, ch := range test[i].Choices {
				lc, cc = append(lc, " "+Letter(j)), append(cc, " "+ch)
			}
			if py.Letters != l || py.Cloze != cl || fmt.Sprint(py.LetterContinuations) != fmt.Sprint(lc) || fmt.Sprint(py.ClozeContinuations) != fmt.Sprint(cc) {
				t.Fatalf("%s question %d: the reference builds\n%q\n%q\nthis package\n%q\n%q", c.format.Name, i, py.Letters, py.Cloze, l, cl)
			}
		}
	}
}

// logitsOnCPU is a trainer.LogitSession over the CPU model, for testing
// SessionScorer's packing where no GPU is.
type logitsOnCPU struct {
	trainer.Session // not called
	m               *trainer.Model
	a               *trainer.Adapter
}

func (c logitsOnCPU) Model() *trainer.ModelInfo { return &c.m.ModelInfo }

func (c logitsOnCPU) PositionLogits(b *trainer.Batch) ([][]float32, error) {
	all, err := c.m.Logits(c.a, b)
	if err != nil {
		return nil, err
	}
	V := c.m.Config.VocabSize
	var out [][]float32
	for t, tg := range b.Targets {
		if tg != trainer.IgnoreIndex {
			out = append(out, all[t*V:(t+1)*V])
		}
	}
	return out, nil
}

// TestSessionScorerMatchesLogits: requests packed into rows of a session
// (the GPU's way) score as the logits say, whatever the row length, and a
// request longer than a row is refused.
func TestSessionScorerMatchesLogits(t *testing.T) {
	m := smallModel(t)
	rng := rand.New(rand.NewPCG(3, 4))
	ids := randomIDs(rng, m.Config.VocabSize)
	var reqs []Request
	for q := 0; q < 5; q++ {
		ctx := append([]int32{2}, ids(2+rng.IntN(8))...)
		for c := 0; c < 3; c++ {
			reqs = append(reqs, Request{Context: ctx, Continuation: ids(1 + rng.IntN(3))})
		}
	}
	for _, rowTokens := range []int{16, 64, 1000} {
		s := &SessionScorer{Session: logitsOnCPU{m: m}, MaxTokens: rowTokens}
		got, err := s.LogLikelihoods(context.Background(), reqs)
		if err != nil {
			t.Fatal(err)
		}
		for i, r := range reqs {
			want, g := directLogLik(t, m, nil, r)
			if math.Abs(got[i].LogLik-want) > 1e-5*math.Max(1, math.Abs(want)) || got[i].Greedy != g {
				t.Errorf("rows of %d: request %d: %.8f (greedy %v), from the logits %.8f (%v)", rowTokens, i, got[i].LogLik, got[i].Greedy, want, g)
			}
		}
	}
	s := &SessionScorer{Session: logitsOnCPU{m: m}, MaxTokens: 8}
	if _, err := s.LogLikelihoods(context.Background(), []Request{{Context: ids(6), Continuation: ids(4)}}); err == nil {
		t.Error("a request longer than a row was scored")
	}
}

// randomIDs draws n token ids from rng.
func randomIDs(rng *rand.Rand, vocab int) func(n int) []int32 {
	return func(n int) []int32 {
		out := make([]int32, n)
		for i := range out {
			out[i] = int32(rng.IntN(vocab))
		}
		return out
	}
}

// TestMappedSubjectMissing: a question without the mapped subject column,
// or with a null there, is scored under NoSubject, as with the default
// column.
func TestMappedSubjectMissing(t *testing.T) {
	dir := t.TempDir()
	set := writeFile(t, dir, "set.jsonl", `{"q": "Bir?", "choices": ["a", "b"], "answer": "A", "bolum": "tarih"}
{"q": "İki?", "choices": ["a", "b"], "answer": "B"}
{"q": "Üç?", "choices": ["a", "b"], "answer": "B", "bolum": null}
`)
	qs, err := ReadQuestions([]string{set}, map[string]string{"question": "q", "subject": "bolum"})
	if err != nil || len(qs) != 3 || qs[0].Subject != "tarih" || qs[1].Subject != "" || qs[2].Subject != "" {
		t.Fatalf("%+v, %v", qs, err)
	}
}

// TestMappedColumnsOfTheWholeSet: a mapped subject that some file of the
// set has is fine (a file without subjects scores under NoSubject), and a
// mapped choice column no row has ends the choices before it.
func TestMappedColumnsOfTheWholeSet(t *testing.T) {
	dir := t.TempDir()
	a := writeFile(t, dir, "a.jsonl", `{"soru": "Bir?", "o1": "x", "o2": "y", "cevap": "A"}`+"\n")
	b := writeFile(t, dir, "b.jsonl", `{"soru": "İki?", "o1": "x", "o2": "y", "cevap": "B", "bolum": "tarih"}`+"\n")
	cols := map[string]string{"question": "soru", "answer": "cevap", "subject": "bolum", "A": "o1", "B": "o2", "C": "o3"}
	qs, err := ReadQuestions([]string{a, b}, cols)
	if err != nil || len(qs) != 2 || len(qs[0].Choices) != 2 || qs[0].Subject != "" || qs[1].Subject != "tarih" {
		t.Fatalf("%+v, %v", qs, err)
	}
	if _, err := ReadQuestions([]string{a}, cols); err == nil || !strings.Contains(err.Error(), `columns maps subject to "bolum", which no row has (its columns: cevap, o1, o2, soru)`) {
		t.Errorf("a mapped subject no file has: %v", err)
	}
}

// TestReadQuestionsAsWritten: a set as tools write it reads as it means: a
// byte order mark before the first line (Windows editors), CRLF line ends,
// and integer answers stored as floats (pandas, once a value is missing).
func TestReadQuestionsAsWritten(t *testing.T) {
	dir := t.TempDir()
	jl := writeFile(t, dir, "bom.jsonl", "\xef\xbb\xbf{\"question\": \"Q?\", \"choices\": [\"a\", \"b\"], \"answer\": \"B\"}\r\n{\"question\": \"R?\", \"choices\": [\"a\", \"b\"], \"answer\": 1.0}\r\n")
	qs, err := ReadQuestions([]string{jl}, nil)
	if err != nil || len(qs) != 2 || qs[0].Answer != 1 || qs[1].Answer != 1 || qs[1].Where != jl+":2" {
		t.Errorf("JSONL with a byte order mark: %+v, %v", qs, err)
	}
	blank := writeFile(t, dir, "blank.jsonl", "\n\n{\"question\": \"Q?\", \"choices\": [\"a\", \"b\"], \"answer\": \"B\"}\n")
	if qs, err := ReadQuestions([]string{blank}, nil); err != nil || len(qs) != 1 || qs[0].Where != blank+":3" {
		t.Errorf("a file starting with blank lines: %+v, %v (want line 3)", qs, err)
	}
	arr := writeFile(t, dir, "bom.json", "\xef\xbb\xbf[{\"question\": \"Q?\", \"choices\": [\"a\", \"b\"], \"answer\": \"B\"}]")
	if qs, err := ReadQuestions([]string{arr}, nil); err != nil || len(qs) != 1 || qs[0].Answer != 1 {
		t.Errorf("JSON array with a byte order mark: %+v, %v", qs, err)
	}

	b := array.NewFloat64Builder(memory.DefaultAllocator)
	defer b.Release()
	b.AppendValues([]float64{1, 2.5}, nil)
	col := b.NewFloat64Array()
	defer col.Release()
	v, err := arrowValue(col, 0)
	if err != nil {
		t.Fatal(err)
	}
	if i, err := parseAnswer(v, 3); err != nil || i != 1 {
		t.Errorf("Parquet answer 1.0: %d, %v", i, err)
	}
	v, _ = arrowValue(col, 1)
	if _, err := parseAnswer(v, 3); err == nil || !strings.Contains(err.Error(), "answer 2.5 is not an integer index") {
		t.Errorf("Parquet answer 2.5: %v", err)
	}
}

// TestLossRequestsNewline: with Newline the "\n" after each model turn's
// <end_of_turn> is scored too, as the tokenize stage's loss_on_newline
// trains it; nothing else changes.
func TestLossRequestsNewline(t *testing.T) {
	tok, err := tokenizer.LoadFile(testenv.GemmaFile(t, "tokenizer.json"))
	if err != nil {
		t.Fatal(err)
	}
	recs := []ChatRecord{{Messages: []chat.Message{{Role: "user", Content: "Merhaba"}, {Role: "assistant", Content: "Selam"},
		{Role: "user", Content: "Nasılsın?"}, {Role: "assistant", Content: "İyiyim."}}}}
	scored := func(newline bool) []int32 {
		reqs, _, err := LossRequests(tok, recs, LossOptions{Newline: newline})
		if err != nil {
			t.Fatal(err)
		}
		var ids []int32
		for _, r := range reqs {
			ids = append(ids, r.Continuation...)
		}
		return ids
	}
	plain, withNewline := scored(false), scored(true)
	eot, _ := tok.ID("<end_of_turn>")
	nl := tok.EncodeIDs("\n", false)
	var want []int32
	for _, id := range plain {
		want = append(want, id)
		if id == eot {
			want = append(want, nl...)
		}
	}
	if fmt.Sprint(withNewline) != fmt.Sprint(want) {
		t.Errorf("scored with Newline %v, want %v", withNewline, want)
	}
}
