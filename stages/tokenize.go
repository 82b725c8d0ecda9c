package stages

import (
	"context"
	"fmt"
	"io"
	"strings"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/memory"

	"gemmaft/chat"
	"gemmaft/dataset"
	"gemmaft/eval"
	"gemmaft/hub"
	"gemmaft/packer"
	"gemmaft/pipeline"
	"gemmaft/tokenizer"
)

const tokenizeKindName = "tokenize"

func init() { kinds[tokenizeKindName] = tokenizeKind{} }

// tokenizeKind turns chat text into token ids and labels: labels are the
// ids where the model is trained (the assistant's content and its
// <end_of_turn>, in every assistant turn or only the last) and -100
// elsewhere. Plain texts (a text stage) are trained on every token: <bos>,
// the text, and <eos> when asked.
type tokenizeKind struct{}

type tokenizeParams struct {
	// Tokenizer is the path of a Hugging Face tokenizer.json, or an hf://
	// reference to one (hf://ORG/NAME@REV/tokenizer.json; a reference to the
	// repository means its tokenizer.json).
	Tokenizer string `json:"tokenizer"`
	// LossOn is "assistant" (train on what the model says, in every
	// assistant turn), "last_assistant" (only in a conversation's last
	// assistant turn) or "all". A plain text is trained on every token.
	LossOn string `json:"loss_on"`
	// LossOnNewline trains the "\n" after each trained <end_of_turn> too,
	// as TRL's assistant_only_loss and Unsloth's train_on_responses_only
	// do: one token more a turn, for numbers to compare with theirs.
	LossOnNewline bool `json:"loss_on_newline,omitempty"`
	// EOS ends every plain text with <eos> (only for a text stage's texts;
	// a chat turn ends with <end_of_turn>).
	EOS bool `json:"eos,omitempty"`
}

// ParamNotes say what stands here for the switches with which Axolotl,
// TRL and Unsloth choose the tokens the loss is taken on.
func (tokenizeKind) ParamNotes() map[string]string {
	lossOn := "loss_on chooses the tokens trained on: assistant (the default: the answers), last_assistant, or all (the prompts too)"
	return map[string]string{
		"train_on_inputs":         lossOn,
		"assistant_only_loss":     lossOn,
		"completion_only_loss":    lossOn,
		"train_on_responses_only": lossOn,
		"roles_to_train":          lossOn,
		"add_eos_token":           "eos: true ends each plain text with <eos>; a chat turn always ends with <end_of_turn>",
		"train_on_eos":            "a trained turn always ends with its <end_of_turn>; loss_on_newline: true trains the \"\\n\" after it too, as TRL and Unsloth do",
	}
}

func (tokenizeKind) Version() int       { return 1 }
func (tokenizeKind) Inputs() (int, int) { return 1, 1 }
func (tokenizeKind) Params() any        { return &tokenizeParams{LossOn: eval.LossOnAssistant} }

func (p *tokenizeParams) Validate() error {
	if p.Tokenizer == "" {
		return &pipeline.ParamError{Param: "tokenizer", Msg: "missing", Fix: "give the path of the model's tokenizer.json, or hf://ORG/NAME@REV/tokenizer.json"}
	}
	switch p.LossOn {
	case eval.LossOnAssistant, eval.LossOnLastAssistant, eval.LossOnAll:
	default:
		return &pipeline.ParamError{Param: "loss_on", Msg: fmt.Sprintf("unknown value %q", p.LossOn),
			Fix: "use assistant (every assistant turn), last_assistant (a conversation's last one) or all"}
	}
	if p.LossOnNewline && p.LossOn == eval.LossOnAll {
		return &pipeline.ParamError{Param: "loss_on_newline", Msg: "has nothing to add to loss_on: all, which trains every token",
			Fix: "remove loss_on_newline, or choose loss_on: assistant"}
	}
	return nil
}

func (tokenizeKind) Prepare(params any, dir string) (pipeline.Runner, error) {
	p := params.(*tokenizeParams)
	if hub.IsRef(p.Tokenizer) {
		h, err := parseHub("tokenizer", p.Tokenizer, hubFile)
		if err != nil {
			return nil, err
		}
		return &tokenizeStage{p: p, hub: h}, nil
	}
	path, err := pipeline.ResolvePath(dir, p.Tokenizer)
	if err != nil {
		return nil, &pipeline.ParamError{Param: "tokenizer", Msg: err.Error(), Fix: "write the path in full"}
	}
	if err := pipeline.CheckReadableFile(path); err != nil {
		fix := "give the path of the model's tokenizer.json, relative to the spec's folder"
		if strings.Contains(path, "node_modules") {
			fix = "paths are relative to the spec's folder; for the demo's Gemma 3 tokenizer, point at the repository's npm/node_modules/… (scripts/npm-deps.sh installs it)"
		}
		fix = withHubHint(fix, "tokenizer", p.Tokenizer, path, "tokenizer.json")
		return nil, &pipeline.ParamError{Param: "tokenizer", Msg: err.Error(), Fix: fix}
	}
	return &tokenizeStage{p: p, path: path}, nil
}

type tokenizeStage struct {
	p    *tokenizeParams
	path string    // a local tokenizer.json
	hub  *hubInput // or one on the Hub
}

func (s *tokenizeStage) Files() []string {
	if s.hub != nil {
		return nil
	}
	return []string{s.path}
}

func (s *tokenizeStage) Resolve(ctx context.Context) ([]pipeline.Ref, error) {
	return resolveAll(ctx, s.hub)
}

// load reads the tokenizer at path (the local one, or one fetched from the
// Hub) through the task, which checks that a local one is the file the key
// was computed from.
func load(t *pipeline.Task, path string) (*tokenizer.Tokenizer, error) {
	f, err := t.Open(path)
	if err != nil {
		return nil, err
	}
	data, err := io.ReadAll(f)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, err
	}
	tok, err := tokenizer.Load(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return tok, nil
}

// TokensSchema is the table a tokenize stage writes; its columns have the
// names they keep in packed rows.
var TokensSchema = arrow.NewSchema([]arrow.Field{
	{Name: packer.ColInputIDs, Type: arrow.ListOf(arrow.PrimitiveTypes.Int32)},
	{Name: packer.ColLabels, Type: arrow.ListOf(arrow.PrimitiveTypes.Int32)},
}, nil)

// tokenCounts are the statistics a tokenize stage reports.
type tokenCounts struct {
	records, tokens, trained, words, dropped int64
	read                                     int64 // rows of the input before the batch in hand
	firstDropped                             int64 // the input's row (from 0) of the first dropped, once dropped > 0
}

// drop counts row i of the batch in hand as dropped.
func (c *tokenCounts) drop(i int) {
	if c.dropped == 0 {
		c.firstDropped = c.read + int64(i)
	}
	c.dropped++
}

func (s *tokenizeStage) Run(ctx context.Context, t *pipeline.Task) error {
	path := s.path
	if s.hub != nil {
		files, err := s.hub.fetch(ctx, t)
		if err != nil {
			return err
		}
		path = files[0]
		t.Report(0, 0, "", "") // back to counting rows
	}
	tok, err := load(t, path)
	if err != nil {
		return err
	}
	bos, ok := tok.ID("<bos>")
	if !ok {
		return fmt.Errorf("%s has no <bos> token: not a Gemma tokenizer, and only Gemma's are supported", path)
	}
	var c tokenCounts
	if t.Inputs[0].Kind == textKindName {
		eos := int32(-1)
		if s.p.EOS {
			if eos, ok = tok.ID("<eos>"); !ok {
				return fmt.Errorf("%s has no <eos> token; remove eos: true", path)
			}
		}
		err = mapBatches(ctx, t, TokensSchema, func(rec arrow.RecordBatch) (arrow.RecordBatch, error) {
			return tokenizeTexts(tok, bos, eos, t.Inputs[0], rec, &c)
		})
	} else {
		err = mapBatches(ctx, t, TokensSchema, func(rec arrow.RecordBatch) (arrow.RecordBatch, error) {
			return s.tokenizeBatch(tok, bos, t.Inputs[0], rec, &c)
		})
	}
	if err != nil {
		return err
	}
	t.SetStat("records", c.records)
	t.SetStat("tokens", c.tokens)
	t.SetStat("trained_tokens", c.trained)
	t.SetStat("dropped_records", c.dropped)
	if c.dropped > 0 {
		in := t.Inputs[0].Name
		t.Log.Warn(fmt.Sprintf("%s empty, and left out; the first is row %d of stage %s", counted(c.dropped, "record is", "records are"), c.firstDropped+1, in),
			"fix", "remove empty records (or files) from the data")
	}
	if c.records > 0 {
		t.SetStat("tokens_per_record", float64(c.tokens)/float64(c.records))
	}
	if c.words > 0 {
		t.SetStat("fertility", float64(c.tokens)/float64(c.words))
	}
	return nil
}

// tokenizeBatch tokenizes one batch of chat text read from in.
func (s *tokenizeStage) tokenizeBatch(tok *tokenizer.Tokenizer, bos int32, in *pipeline.Input, rec arrow.RecordBatch, c *tokenCounts) (arrow.RecordBatch, error) {
	textCol, err := stringColumn(in, rec, colText, chatKindName)
	if err != nil {
		return nil, err
	}
	// spansOf returns row i's assistant spans (or only the last); nil
	// under loss_on: all.
	spansOf := func(int) []chat.Span { return nil }
	if s.p.LossOn != eval.LossOnAll {
		last := s.p.LossOn == eval.LossOnLastAssistant
		starts, err := int32Lists(in, rec, colSpanStart, chatKindName)
		if err != nil {
			return nil, err
		}
		ends, err := int32Lists(in, rec, colSpanEnd, chatKindName)
		if err != nil {
			return nil, err
		}
		sv := starts.ListValues().(*array.Int32).Int32Values()
		ev := ends.ListValues().(*array.Int32).Int32Values()
		spansOf = func(i int) []chat.Span {
			a, z := starts.ValueOffsets(i)
			e0, _ := ends.ValueOffsets(i)
			if last && z > a {
				e0 += z - 1 - a
				a = z - 1
			}
			spans := make([]chat.Span, 0, z-a)
			for j := a; j < z; j++ {
				spans = append(spans, chat.Span{Role: "assistant", Start: int(sv[j]), End: int(ev[e0+j-a])})
			}
			if s.p.LossOnNewline {
				spans = chat.ThroughNewline(textCol.Value(i), spans)
			}
			return spans
		}
	}
	n := int(rec.NumRows())
	texts := make([]string, n)
	for i := range texts {
		texts[i] = textCol.Value(i)
	}
	// The chat template writes <bos> itself, so the post-processor's is
	// not added: exactly one <bos> starts every sequence.
	ids, offs := tok.EncodeBatchOffsets(texts, false)

	b := array.NewRecordBuilder(memory.DefaultAllocator, TokensSchema)
	defer b.Release()
	idsB, labB := b.Field(0).(*array.ListBuilder), b.Field(1).(*array.ListBuilder)
	idsV, labV := idsB.ValueBuilder().(*array.Int32Builder), labB.ValueBuilder().(*array.Int32Builder)
	for i := 0; i < n; i++ {
		if len(ids[i]) == 0 {
			c.drop(i)
			continue
		}
		if ids[i][0] != bos {
			ids[i] = append([]int32{bos}, ids[i]...)
			offs[i] = append([][2]int{{0, 0}}, offs[i]...)
		}
		var trained []bool // nil: every token is trained
		if spans := spansOf(i); spans != nil {
			trained = chat.LabelMask(offs[i], spans)
		}
		idsB.Append(true)
		labB.Append(true)
		idsV.AppendValues(ids[i], nil)
		for j, id := range ids[i] {
			if trained == nil || trained[j] {
				labV.Append(id)
				if j > 0 { // the first token is no model's prediction: packing masks its label
					c.trained++
				}
			} else {
				labV.Append(packer.IgnoreIndex)
			}
		}
		c.records++
		c.tokens += int64(len(ids[i]))
		c.words += int64(len(strings.Fields(texts[i])))
	}
	c.read += int64(n)
	return b.NewRecordBatch(), nil
}

// tokenizeTexts tokenizes one batch of plain texts read from in (a text
// stage): <bos>, the text's tokens and, when eos is not -1, <eos>, every
// token trained. An empty text is left out and counted as dropped.
func tokenizeTexts(tok *tokenizer.Tokenizer, bos, eos int32, in *pipeline.Input, rec arrow.RecordBatch, c *tokenCounts) (arrow.RecordBatch, error) {
	textCol, err := stringColumn(in, rec, dataset.ColText, textKindName)
	if err != nil {
		return nil, err
	}
	n := int(rec.NumRows())
	texts := make([]string, n)
	for i := range texts {
		texts[i] = textCol.Value(i)
	}
	ids := tok.EncodeBatch(texts, false)
	b := array.NewRecordBuilder(memory.DefaultAllocator, TokensSchema)
	defer b.Release()
	idsB, labB := b.Field(0).(*array.ListBuilder), b.Field(1).(*array.ListBuilder)
	idsV, labV := idsB.ValueBuilder().(*array.Int32Builder), labB.ValueBuilder().(*array.Int32Builder)
	for i := 0; i < n; i++ {
		if texts[i] == "" {
			c.drop(i)
			continue
		}
		row := ids[i]
		if len(row) == 0 || row[0] != bos {
			row = append([]int32{bos}, row...)
		}
		if eos >= 0 {
			row = append(row, eos)
		}
		idsB.Append(true)
		labB.Append(true)
		idsV.AppendValues(row, nil)
		labV.AppendValues(row, nil)
		c.records++
		c.tokens += int64(len(row))
		c.trained += int64(len(row) - 1) // every token after <bos>
		c.words += int64(len(strings.Fields(texts[i])))
	}
	c.read += int64(n)
	return b.NewRecordBatch(), nil
}
