package packer

import (
	"context"
	"io"
	"path/filepath"
	"testing"

	"github.com/apache/arrow-go/v18/arrow/array"

	"gemmaft/dataset"
	"gemmaft/tokenizer"

	"gemmaft/internal/testenv"
)

// gemma3Turns renders an Alpaca record as the Gemma 3 chat template does for
// one user turn and one model turn, returning the text and the byte offset
// where the trained part (the answer and its closing turn) starts.
func gemma3Turns(instruction, input, output string) (string, int) {
	prompt := instruction
	if input != "" {
		prompt += "\n\n" + input
	}
	head := "<bos><start_of_turn>user\n" + prompt + "<end_of_turn>\n<start_of_turn>model\n"
	return head + output + "<end_of_turn>\n", len(head)
}

func loadTokenizer(t testing.TB) *tokenizer.Tokenizer {
	t.Helper()
	tok, err := tokenizer.LoadFile(testenv.GemmaFile(t, "tokenizer.json"))
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// tokenize renders and tokenizes a batch of records; labels follow the
// answer's byte span through the token offsets.
func tokenize(tok *tokenizer.Tokenizer, cols [3]*array.String) (ids, labels [][]int32) {
	n := cols[0].Len()
	texts := make([]string, n)
	starts := make([]int, n)
	for i := range texts {
		texts[i], starts[i] = gemma3Turns(cols[0].Value(i), cols[1].Value(i), cols[2].Value(i))
	}
	ids, offsets := tok.EncodeBatchOffsets(texts, false)
	labels = make([][]int32, n)
	for i := range ids {
		labels[i] = make([]int32, len(ids[i]))
		for j, id := range ids[i] {
			labels[i][j] = IgnoreIndex
			if offsets[i][j][0] >= starts[i] {
				labels[i][j] = id
			}
		}
	}
	return ids, labels
}

func addTokenized(p *Packer, tok *tokenizer.Tokenizer, cols [3]*array.String) error {
	ids, labels := tokenize(tok, cols)
	for i := range ids {
		if err := p.Add(ids[i], labels[i]); err != nil {
			return err
		}
	}
	return nil
}

// TestAlpacaRealTokens packs alpaca-tr tokenized with the real Gemma 3
// tokenizer at seq_len 4096 and requires at least 99.8% efficiency.
func TestAlpacaRealTokens(t *testing.T) {
	dir := testenv.AlpacaTR(t, "")
	tok := loadTokenizer(t)
	s, err := dataset.Open(dataset.SourceOptions{Paths: []string{filepath.Join(dir, "parquet", "alpaca-tr.parquet")}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()

	var examples []genExample
	for {
		rec, err := s.Next(context.Background())
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		var cols [3]*array.String
		for c := range cols {
			cols[c] = rec.Column(c).(*array.String)
		}
		ids, labels := tokenize(tok, cols)
		for i := range ids {
			examples = append(examples, genExample{ids[i], labels[i]})
		}
		rec.Release()
	}
	if len(examples) != 20748 {
		t.Fatalf("%d examples", len(examples))
	}
	for _, algo := range []Algorithm{Auto, MinimumSlack, BestFitDecreasing} {
		opts := Options{SeqLen: 4096, Seed: 3407, Algorithm: algo}
		rows, st := pack(t, opts, examples)
		for _, r := range rows {
			checkIsolation(t, opts, Row{r.ids, r.labels, r.pos, r.lens})
		}
		t.Logf("%s: %d examples, %d tokens in %d rows: efficiency %.4f%%", algo, st.Examples, st.RealTokens, st.Rows, 100*st.Efficiency)
		if st.Examples != 20748 {
			t.Errorf("%s: %d examples packed", algo, st.Examples)
		}
		if algo != BestFitDecreasing && st.Efficiency < 0.998 {
			t.Errorf("packing efficiency %.4f%%, want at least 99.8%%", 100*st.Efficiency)
		}
	}
}
