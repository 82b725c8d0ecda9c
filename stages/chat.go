package stages

import (
	"context"
	"crypto/sha256"
	"fmt"
	"strings"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/memory"

	"gemmaft/chat"
	"gemmaft/dataset"
	"gemmaft/pipeline"
)

const chatKindName = "chat_template"

func init() { kinds[chatKindName] = chatKind{} }

// chatKind renders Alpaca records and conversations as chat text with the
// model's template and keeps the byte spans of what the model says (every
// assistant turn's content and its <end_of_turn>), from which tokenize
// makes the loss mask.
type chatKind struct{}

type chatParams struct {
	Template string `json:"template"`
	// Dedupe drops each record that renders word for word as an earlier
	// one did (Axolotl's dataset_exact_deduplication); without it they are
	// counted and warned of.
	Dedupe bool `json:"dedupe,omitempty"`
}

// Synonyms are Axolotl's names for the stage's switches.
func (chatKind) Synonyms() map[string]string {
	return map[string]string{"dataset_exact_deduplication": "dedupe", "chat_template": "template"}
}

func (chatKind) Version() int       { return 1 }
func (chatKind) Inputs() (int, int) { return 1, 1 }
func (chatKind) Params() any        { return &chatParams{Template: "gemma3"} }

func (p *chatParams) Validate() error {
	if p.Template != "gemma3" {
		return &pipeline.ParamError{Param: "template", Msg: fmt.Sprintf("unknown template %q", p.Template), Fix: "the built-in template is gemma3"}
	}
	return nil
}

func (chatKind) Prepare(params any, _ string) (pipeline.Runner, error) {
	return chatStage{dedupe: params.(*chatParams).Dedupe}, nil
}

type chatStage struct{ dedupe bool }

// ChatSchema is the table a chat_template stage writes: the rendered text
// and, for each assistant turn, the byte span [start, end) of its content
// and closing <end_of_turn>.
var ChatSchema = arrow.NewSchema([]arrow.Field{
	{Name: colText, Type: arrow.BinaryTypes.String},
	{Name: colSpanStart, Type: arrow.ListOf(arrow.PrimitiveTypes.Int32)},
	{Name: colSpanEnd, Type: arrow.ListOf(arrow.PrimitiveTypes.Int32)},
}, nil)

// Columns of ChatSchema.
const (
	colText      = "text"
	colSpanStart = "span_start"
	colSpanEnd   = "span_end"
)

func (chatStage) Files() []string { return nil }

func (s chatStage) Run(ctx context.Context, t *pipeline.Task) error {
	var row int64
	n := renderCounts{seen: map[[16]byte]int64{}, dropDuplicates: s.dedupe}
	conversations := false
	err := mapBatches(ctx, t, ChatSchema, func(rec arrow.RecordBatch) (arrow.RecordBatch, error) {
		first := row
		row += rec.NumRows()
		if len(rec.Schema().FieldIndices(dataset.ColMessages)) == 1 {
			conversations = true
			return renderConversations(t.Inputs[0], rec, first, &n)
		}
		return renderBatch(t.Inputs[0], rec, first, &n)
	})
	t.SetStat("records", row)
	if conversations {
		t.SetStat("assistant_turns", n.turns)
	}
	t.SetStat("empty_answers", n.empty)
	t.SetStat("empty_prompts", n.emptyPrompts)
	t.SetStat("control_token_records", n.control)
	t.SetStat("duplicate_records", n.duplicates)
	if err != nil {
		return err // what it saw of a stage that did not finish is no finding
	}
	in := t.Inputs[0].Name
	where := func(row int64) string {
		return fmt.Sprintf("the first is in row %d of stage %s (pipeline inspect SPEC %s --rows %d shows it last)", row+1, in, in, row+1)
	}
	if n.empty > 0 {
		// An empty answer trains the model to close its turn at once.
		t.Log.Warn(fmt.Sprintf("%s empty (or white space): each trains only on <end_of_turn>, teaching the model to answer nothing; %s",
			counted(n.empty, "answer is", "answers are"), where(n.firstEmpty)),
			"fix", "remove such records from the data")
	}
	if n.emptyPrompts > 0 {
		t.Log.Warn(fmt.Sprintf("%s an empty (or white space) question: the model learns to answer nothing in particular; %s",
			counted(n.emptyPrompts, "record has", "records have"), where(n.firstEmptyPrompt)),
			"fix", "remove such records, or map the field that holds the question with columns:")
	}
	if n.control > 0 {
		t.Log.Warn(fmt.Sprintf("%s the text of a Gemma 3 control token (%s) in a message: the tokenizer reads it as the token, as transformers' does, so the record can open or close turns of its own; %s",
			counted(n.control, "record holds", "records hold"), strings.Join(controlTokens, ", "), where(n.firstControl)),
			"fix", "remove or rewrite such records")
	}
	if n.duplicates > 0 {
		msg := fmt.Sprintf("%s word for word as an earlier one: row %d of stage %s repeats row %d",
			counted(n.duplicates, "record renders", "records render"), n.firstDuplicate[0]+1, in, n.firstDuplicate[1]+1)
		if s.dedupe {
			t.Log.Info(msg+"; dedupe left them out", "records", row-n.duplicates)
		} else {
			t.Log.Warn(msg+": the model trains on each copy, as often as it repeats, and a copy held out for evaluation is one it trained on",
				"fix", "with: {dedupe: true} in this stage drops them")
		}
	}
	return err
}

// renderCounts are what a chat_template stage counts as it renders, and
// the rendered texts it has seen, to find records that repeat.
type renderCounts struct {
	turns      int64 // assistant turns
	empty      int64 // of which empty or white space
	firstEmpty int64 // the record of the first empty one
	// Records with an empty (or white space) user turn, and with control
	// tokens' text in a message, and the first of each.
	emptyPrompts, firstEmptyPrompt int64
	control, firstControl          int64

	seen           map[[16]byte]int64 // a text's digest, its first half: its first row
	dropDuplicates bool
	duplicates     int64
	firstDuplicate [2]int64 // its row and the row it repeats
}

// repeated reports whether text, rendered from record row, is that of an
// earlier record, and counts it.
func (n *renderCounts) repeated(text string, row int64) bool {
	// Half the digest: two texts share it with a probability of about their
	// pairs over 2¹²⁸, and the stage's peak memory at a million records
	// falls from 250 to 164 MB.
	sum := sha256.Sum256([]byte(text))
	key := [16]byte(sum[:16])
	first, ok := n.seen[key]
	if !ok {
		n.seen[key] = row
		return false
	}
	if n.duplicates == 0 {
		n.firstDuplicate = [2]int64{row, first}
	}
	n.duplicates++
	return true
}

// controlTokens are the Gemma 3 control tokens whose text a message may
// hold: the tokenizer reads it as the token itself, as transformers'
// does, so that a record can open and close turns of its own.
var controlTokens = []string{"<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<pad>", "<unk>", "<mask>",
	"<start_of_image>", "<end_of_image>", "<image_soft_token>"}

// check counts into n what record row's messages hold that the model
// should not be trained on unawares.
func (n *renderCounts) check(msgs []chat.Message, row int64) {
	emptyPrompt, control := false, false
	for _, m := range msgs {
		if m.Role == "user" && strings.TrimSpace(m.Content) == "" {
			emptyPrompt = true
		}
		for _, tok := range controlTokens {
			control = control || strings.Contains(m.Content, tok)
		}
	}
	if emptyPrompt {
		if n.emptyPrompts == 0 {
			n.firstEmptyPrompt = row
		}
		n.emptyPrompts++
	}
	if control {
		if n.control == 0 {
			n.firstControl = row
		}
		n.control++
	}
}

// chatBuilder builds a ChatSchema batch.
type chatBuilder struct {
	b            *array.RecordBuilder
	text         *array.StringBuilder
	starts, ends *array.ListBuilder
	sv, ev       *array.Int32Builder
}

func newChatBuilder() *chatBuilder {
	b := array.NewRecordBuilder(memory.DefaultAllocator, ChatSchema)
	c := &chatBuilder{b: b, text: b.Field(0).(*array.StringBuilder),
		starts: b.Field(1).(*array.ListBuilder), ends: b.Field(2).(*array.ListBuilder)}
	c.sv = c.starts.ValueBuilder().(*array.Int32Builder)
	c.ev = c.ends.ValueBuilder().(*array.Int32Builder)
	return c
}

// add appends one rendered conversation, record row, and the spans of its
// assistant turns, counting them into n.
func (c *chatBuilder) add(text string, spans []chat.Span, row int64, n *renderCounts) {
	c.text.Append(text)
	c.starts.Append(true)
	c.ends.Append(true)
	for _, sp := range spans {
		if sp.Role != "assistant" {
			continue
		}
		c.sv.Append(int32(sp.Start))
		c.ev.Append(int32(sp.End))
		n.turns++
		if answer, _ := strings.CutSuffix(strings.TrimRight(text[sp.Start:sp.End], "\n"), "<end_of_turn>"); strings.TrimSpace(answer) == "" {
			if n.empty == 0 {
				n.firstEmpty = row
			}
			n.empty++
		}
	}
}

// renderConversations renders one batch of conversations (a messages
// column) read from in, whose first row is the input's row firstRow.
func renderConversations(in *pipeline.Input, rec arrow.RecordBatch, firstRow int64, n *renderCounts) (arrow.RecordBatch, error) {
	i, err := columnIndex(in, rec, dataset.ColMessages, parquetKindName+" or "+jsonlKindName)
	if err != nil {
		return nil, err
	}
	col, err := dataset.NewMessagesColumn(rec.Column(i))
	if err != nil {
		return nil, fmt.Errorf("stage %s: %w", in.Name, err)
	}
	c := newChatBuilder()
	defer c.b.Release()
	for r := 0; r < int(rec.NumRows()); r++ {
		msgs := col.Row(r)
		text, spans, err := chat.RenderGemma3(msgs)
		if err != nil {
			return nil, fmt.Errorf("row %d of stage %s: %w", firstRow+int64(r)+1, in.Name, err)
		}
		if n.repeated(text, firstRow+int64(r)) && n.dropDuplicates {
			continue
		}
		n.check(msgs, firstRow+int64(r))
		c.add(text, spans, firstRow+int64(r), n)
	}
	return c.b.NewRecordBatch(), nil
}

// renderBatch renders one batch of records read from in, whose first row
// is the input's row firstRow.
func renderBatch(in *pipeline.Input, rec arrow.RecordBatch, firstRow int64, n *renderCounts) (arrow.RecordBatch, error) {
	const sources = parquetKindName + " or " + jsonlKindName
	col := func(name string) (*array.String, error) { return stringColumn(in, rec, name, sources) }
	inst, err := col(dataset.ColInstruction)
	if err != nil {
		return nil, err
	}
	input, err := col(dataset.ColInput)
	if err != nil {
		return nil, err
	}
	output, err := col(dataset.ColOutput)
	if err != nil {
		return nil, err
	}
	var system *array.String
	if len(rec.Schema().FieldIndices(dataset.ColSystem)) == 1 {
		if system, err = col(dataset.ColSystem); err != nil {
			return nil, err
		}
	}
	c := newChatBuilder()
	defer c.b.Release()
	for i := 0; i < int(rec.NumRows()); i++ {
		sys := ""
		if system != nil {
			sys = system.Value(i)
		}
		msgs := chat.Alpaca(inst.Value(i), input.Value(i), output.Value(i), sys)
		rendered, spans, err := chat.RenderGemma3(msgs)
		if err != nil {
			return nil, fmt.Errorf("row %d of stage %s: %w", firstRow+int64(i)+1, in.Name, err)
		}
		if n.repeated(rendered, firstRow+int64(i)) && n.dropDuplicates {
			continue
		}
		n.check(msgs, firstRow+int64(i))
		c.add(rendered, spans, firstRow+int64(i), n)
	}
	return c.b.NewRecordBatch(), nil
}
