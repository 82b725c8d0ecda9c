package eval

import (
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"sort"
	"strings"

	"gemmaft/chat"
	"gemmaft/tokenizer"
)

// Multiple-choice questions are scored by log-likelihood in the prompt
// formats of lm-evaluation-harness's MMLU tasks (lm_eval/tasks/mmlu):
//
// acc, the `mmlu` task (default/_default_template_yaml): the context is
//
//	The following are multiple choice questions (with answers) about {subject}.\n\n
//	{shot question.strip()}\nA. {choice}\nB. {choice}\n…\nAnswer: {letter}\n\n   (k times)
//	{question.strip()}\nA. {choice}\nB. {choice}\n…\nAnswer:
//
// and each continuation is " A", " B", …; the prediction is the letter of
// highest log-likelihood.
//
// acc_norm, the `mmlu_continuation` task (continuation/
// _continuation_template_yaml): the context is
//
//	The following are questions (with answers) about {subject}.\n\n
//	Question: {shot question.strip()}\nAnswer: {shot's right choice}\n\n   (k times)
//	Question: {question.strip()}\nAnswer:
//
// and each continuation is " " + the choice's text; the prediction is the
// choice of highest log-likelihood divided by the choice text's length in
// UTF-8 bytes. (lm-evaluation-harness reports that normalisation as
// acc_bytes; its acc_norm divides by the length in characters, which is
// the same for ASCII and differs for Turkish letters such as ş and ğ.)
//
// The shots are the first k questions of the dev split with the same
// subject (the harness's first_n sampler over the subject's dev split).
// Subject names are written with '_' as ' ', as the harness's task
// descriptions are; a set without subjects drops " about {subject}".
// As the harness does for causal models (`_encode_pair`), the context is
// tokenized with <bos> first, the context and continuation together too,
// and the continuation's tokens are the whole's tokens past the context's.
// The harness cuts contexts longer than the model from the left; here they
// are an error. No chat template is applied (the harness's default).
//
// FormatTurkishMMLU is the harness's `turkishmmlu` task instead
// (lm_eval/tasks/turkishmmlu, for AYueksel/TurkishMMLU): no description,
// "Soru: {question.strip()}\nA. …\nE. …\nCevap:" with the letters as
// continuations; its continuation prompt, which the harness lacks, is
// "Soru: {question.strip()}\nCevap:" in the same spirit.

// A Format is one of the harness's prompt layouts.
type Format struct {
	Name string
	// description is the task description before the shots; none when
	// nil.
	description func(subject string, cloze bool) string
	// letterQ and clozeQ come before the question's text in the lettered
	// and the continuation prompt; answer ends both.
	letterQ, clozeQ, answer string
}

// The prompt formats.
var (
	FormatMMLU = Format{Name: "mmlu", description: mmluDescription,
		letterQ: "", clozeQ: "Question: ", answer: "Answer:"}
	FormatTurkishMMLU = Format{Name: "turkishmmlu",
		letterQ: "Soru: ", clozeQ: "Soru: ", answer: "Cevap:"}
)

// ParseFormat finds a format by name ("" is mmlu).
func ParseFormat(name string) (Format, error) {
	switch name {
	case "", FormatMMLU.Name:
		return FormatMMLU, nil
	case FormatTurkishMMLU.Name:
		return FormatTurkishMMLU, nil
	}
	return Format{}, fmt.Errorf("unknown prompt format %q (mmlu or turkishmmlu)", name)
}

// mmluDescription is the task description of the harness's MMLU prompts
// (cloze: the continuation task's).
func mmluDescription(subject string, cloze bool) string {
	kind := "multiple choice questions"
	if cloze {
		kind = "questions"
	}
	if subject == "" {
		return "The following are " + kind + " (with answers).\n\n"
	}
	return "The following are " + kind + " (with answers) about " + strings.ReplaceAll(subject, "_", " ") + ".\n\n"
}

// lettered is a question as the lettered prompt writes it, up to and
// including the answer cue.
func (f Format) lettered(q Question) string {
	var b strings.Builder
	b.WriteString(f.letterQ + chat.Strip(q.Question))
	for i, c := range q.Choices {
		b.WriteString("\n" + Letter(i) + ". " + c)
	}
	b.WriteString("\n" + f.answer)
	return b.String()
}

// cloze is a question as the continuation prompt writes it.
func (f Format) cloze(q Question) string {
	return f.clozeQ + chat.Strip(q.Question) + "\n" + f.answer
}

// Contexts are a question's two prompts, shots included.
func (f Format) Contexts(q Question, shots []Question) (letters, cloze string) {
	var l, c strings.Builder
	if f.description != nil {
		l.WriteString(f.description(q.Subject, false))
		c.WriteString(f.description(q.Subject, true))
	}
	for _, s := range shots {
		l.WriteString(f.lettered(s) + " " + Letter(s.Answer) + "\n\n")
		c.WriteString(f.cloze(s) + " " + s.Choices[s.Answer] + "\n\n")
	}
	l.WriteString(f.lettered(q))
	c.WriteString(f.cloze(q))
	return l.String(), c.String()
}

// MCOptions configures multiple-choice scoring.
type MCOptions struct {
	// Shots is how many solved dev questions precede each question.
	Shots int
	// Dev is the split the shots come from.
	Dev []Question
	// Format is the prompt layout; the zero Format is FormatMMLU.
	Format Format
}

// MCPrompts is a set's questions turned into scoring requests, made once
// and scored for each model.
type MCPrompts struct {
	Questions []Question
	Shots     int // the dev questions before each one
	// Letters[i] and Texts[i] are question i's requests: one per choice.
	Letters, Texts [][]Request
}

// Shots picks each question's shots: the first opts.Shots dev questions of
// its subject, passing over the question itself (the same text and
// choices) where the dev split holds it, as lm-evaluation-harness does
// when the shots come from the split being scored: a shot that is the
// question, answer included, would give the answer away.
func Shots(qs []Question, opts MCOptions) ([][]Question, error) {
	out := make([][]Question, len(qs))
	if opts.Shots <= 0 {
		return out, nil
	}
	bySubject := map[string][]Question{}
	for _, d := range opts.Dev {
		bySubject[d.Subject] = append(bySubject[d.Subject], d)
	}
	for i, q := range qs {
		pool := bySubject[q.Subject]
		var shots []Question
		for _, d := range pool {
			if len(shots) == opts.Shots {
				break
			}
			if !sameQuestion(d, q) {
				shots = append(shots, d)
			}
		}
		if len(shots) < opts.Shots {
			subject := fmt.Sprintf("subject %q", q.Subject)
			if q.Subject == "" {
				subject = "questions without a subject"
				if len(pool) == 0 && len(opts.Dev) > 0 {
					subject += fmt.Sprintf(" (%s has none; the dev split's %d all have one)", q.Where, len(opts.Dev))
				}
			}
			n := fmt.Sprintf("has %d", len(pool))
			if len(pool) > len(shots) {
				n += ", one of them the question itself"
			}
			questions := "questions"
			if opts.Shots == 1 {
				questions = "question"
			}
			return nil, fmt.Errorf("%d-shot needs %d dev %s of %s, the dev split %s", opts.Shots, opts.Shots, questions, subject, n)
		}
		out[i] = shots
	}
	return out, nil
}

// sameQuestion says whether a and b ask the same thing with the same
// choices.
func sameQuestion(a, b Question) bool {
	return a.Question == b.Question && slices.Equal(a.Choices, b.Choices)
}

// BuildMC makes the requests of every question.
func BuildMC(tok *tokenizer.Tokenizer, qs []Question, opts MCOptions) (*MCPrompts, error) {
	if len(qs) == 0 {
		return nil, errors.New("no questions")
	}
	bos, ok := tok.ID("<bos>")
	if !ok {
		return nil, errors.New("the tokenizer has no <bos> token; only Gemma-style tokenizers are supported")
	}
	shots, err := Shots(qs, opts)
	if err != nil {
		return nil, err
	}
	f := opts.Format
	if f.Name == "" {
		f = FormatMMLU
	}
	// Every text to tokenize: per question its two contexts, then each
	// context followed by each continuation.
	var texts []string
	type span struct{ letters, texts int }
	at := make([]span, len(qs))
	for i, q := range qs {
		lc, cc := f.Contexts(q, shots[i])
		at[i] = span{len(texts), len(texts) + 1 + len(q.Choices)}
		texts = append(texts, lc)
		for j := range q.Choices {
			texts = append(texts, lc+" "+Letter(j))
		}
		texts = append(texts, cc)
		for _, c := range q.Choices {
			texts = append(texts, cc+" "+c)
		}
	}
	ids := tok.EncodeBatch(texts, true)
	for i := range ids {
		if len(ids[i]) == 0 || ids[i][0] != bos {
			ids[i] = append([]int32{bos}, ids[i]...)
		}
	}
	p := &MCPrompts{Questions: qs, Shots: opts.Shots, Letters: make([][]Request, len(qs)), Texts: make([][]Request, len(qs))}
	pair := func(q Question, first int, choice func(j int) string) ([]Request, error) {
		ctx := ids[first]
		var reqs []Request
		for j := range q.Choices {
			whole := ids[first+1+j]
			if len(whole) <= len(ctx) {
				return nil, fmt.Errorf("%s: the continuation %q adds no token to the prompt", q.Where, choice(j))
			}
			reqs = append(reqs, Request{Context: ctx, Continuation: whole[len(ctx):]})
		}
		return reqs, nil
	}
	for i, q := range qs {
		if p.Letters[i], err = pair(q, at[i].letters, func(j int) string { return " " + Letter(j) }); err != nil {
			return nil, err
		}
		if p.Texts[i], err = pair(q, at[i].texts, func(j int) string { return " " + q.Choices[j] }); err != nil {
			return nil, err
		}
	}
	return p, nil
}

// CheckLengths reports the first question whose prompt and a continuation
// do not fit the scorer's context.
func (p *MCPrompts) CheckLengths(s Scorer) error {
	max := s.MaxLength()
	for i, q := range p.Questions {
		for _, set := range []struct {
			name string
			reqs []Request
		}{{"lettered prompt (acc)", p.Letters[i]}, {"continuation prompt (acc_norm)", p.Texts[i]}} {
			for j, r := range set.reqs {
				if n := len(r.Context) + len(r.Continuation); n > max {
					hint := ""
					if p.Shots > 0 {
						hint = " (fewer shots make it shorter)"
					}
					return fmt.Errorf("%s: the %s with choice %s is %d tokens long, more than the model's context of %d tokens%s",
						q.Where, set.name, Letter(j), n, max, hint)
				}
			}
		}
	}
	return nil
}

// MCItem is one question's scores under one model.
type MCItem struct {
	Index   int    `json:"index"`
	Subject string `json:"subject,omitempty"`
	// Question and Choices are the question as the set holds it, for
	// whoever reads why a pick was right or wrong.
	Question string   `json:"question"`
	Choices  []string `json:"choices"`
	Answer   int      `json:"answer"`
	// LetterLogLik[j] is the log-likelihood of " " + letter j after the
	// lettered prompt; ChoiceLogLik[j] that of " " + choice j after the
	// continuation prompt, and ChoiceBytes[j] the choice's UTF-8 length.
	LetterLogLik []float64 `json:"letter_loglik"`
	ChoiceLogLik []float64 `json:"choice_loglik"`
	ChoiceBytes  []int     `json:"choice_bytes"`
	// Pred is the acc prediction, PredNorm the acc_norm one.
	Pred     int `json:"pred"`
	PredNorm int `json:"pred_norm"`
}

// ScoreMC scores every question's requests.
func ScoreMC(ctx context.Context, s Scorer, p *MCPrompts) ([]MCItem, error) {
	if err := p.CheckLengths(s); err != nil {
		return nil, err
	}
	var reqs []Request
	for i := range p.Questions {
		reqs = append(append(reqs, p.Letters[i]...), p.Texts[i]...)
	}
	res, err := s.LogLikelihoods(ctx, reqs)
	if err != nil {
		return nil, err
	}
	items := make([]MCItem, len(p.Questions))
	k := 0
	for i, q := range p.Questions {
		it := MCItem{Index: i, Subject: q.Subject, Question: q.Question, Choices: q.Choices, Answer: q.Answer}
		for range q.Choices {
			it.LetterLogLik = append(it.LetterLogLik, res[k].LogLik)
			k++
		}
		for _, c := range q.Choices {
			it.ChoiceLogLik = append(it.ChoiceLogLik, res[k].LogLik)
			it.ChoiceBytes = append(it.ChoiceBytes, len(c))
			k++
		}
		it.Pred, it.PredNorm = Predict(it.LetterLogLik, it.ChoiceLogLik, it.ChoiceBytes)
		items[i] = it
	}
	return items, nil
}

// Predict is the acc and acc_norm choice: the highest letter
// log-likelihood, and the highest choice log-likelihood per byte; the
// first of equals, as numpy's argmax.
func Predict(letters, choices []float64, bytes []int) (pred, predNorm int) {
	for j := range letters {
		if letters[j] > letters[pred] {
			pred = j
		}
	}
	norm := func(j int) float64 { return choices[j] / float64(bytes[j]) }
	for j := range choices {
		if norm(j) > norm(predNorm) {
			predNorm = j
		}
	}
	return pred, predNorm
}

// MCScores are accuracies over a set of questions, with their standard
// errors as lm-evaluation-harness reports them (acc_stderr: the sample
// standard deviation of the 0/1 scores over the square root of their
// count; 0 for fewer than two questions, where it is undefined).
type MCScores struct {
	Questions     int     `json:"questions"`
	Acc           float64 `json:"acc"`
	AccStderr     float64 `json:"acc_stderr"`
	AccNorm       float64 `json:"acc_norm"`
	AccNormStderr float64 `json:"acc_norm_stderr"`
}

// meanStderr is the standard error of the mean p of n scores of 0 or 1:
// their sample variance, n/(n-1)·p(1-p), over n.
func meanStderr(p float64, n int) float64 {
	if n < 2 {
		return 0
	}
	return math.Sqrt(p * (1 - p) / float64(n-1))
}

// NoSubject names, among the subjects of a set where some questions have
// one, the questions that have none.
const NoSubject = "(no subject)"

// Summarize is the accuracy over all items and per subject (subjects
// sorted by name; none when no item has a subject).
func Summarize(items []MCItem) (all MCScores, subjects map[string]MCScores) {
	add := func(s *MCScores, it MCItem) {
		s.Questions++
		if it.Pred == it.Answer {
			s.Acc++
		}
		if it.PredNorm == it.Answer {
			s.AccNorm++
		}
	}
	by := map[string]*MCScores{}
	var none MCScores
	for _, it := range items {
		add(&all, it)
		if it.Subject == "" || it.Subject == NoSubject { // a set may spell it out
			add(&none, it)
			continue
		}
		if by[it.Subject] == nil {
			by[it.Subject] = &MCScores{}
		}
		add(by[it.Subject], it)
	}
	if len(by) > 0 && none.Questions > 0 { // so that the subjects' rows account for every question
		by[NoSubject] = &none
	}
	norm := func(s *MCScores) {
		if s.Questions > 0 {
			s.Acc /= float64(s.Questions)
			s.AccNorm /= float64(s.Questions)
		}
		s.AccStderr, s.AccNormStderr = meanStderr(s.Acc, s.Questions), meanStderr(s.AccNorm, s.Questions)
	}
	norm(&all)
	subjects = map[string]MCScores{}
	for name, s := range by {
		norm(s)
		subjects[name] = *s
	}
	return all, subjects
}

// SubjectNames lists the subjects of a summary in order.
func SubjectNames(subjects map[string]MCScores) []string {
	names := make([]string, 0, len(subjects))
	for n := range subjects {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}
