package stages

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"hash/fnv"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"

	"gemmaft/dataset"
	"gemmaft/internal/testenv"
	"gemmaft/pipeline"
)

// The proofs of the data stages on the 20,748 records of ../shared, each
// checked against an oracle that shares no code with the stage: Python's
// jinja2 rendering the real chat template, Hugging Face tokenizers through
// Node for ids and offsets, and spans found in the text by the test itself.

const testSystem = "Sen yardımsever bir asistansın. Kısa ve doğru cevap ver."

// oracleLines runs an oracle command with JSON lines in and returns its
// output lines.
func oracleLines(t *testing.T, stdin []byte, name string, args ...string) [][]byte {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = testenv.RepoRoot(t)
	cmd.Stdin = bytes.NewReader(stdin)
	var errb bytes.Buffer
	cmd.Stderr = &errb
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, errb.String())
	}
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(make([]byte, 1<<20), 1<<30)
	var lines [][]byte
	for sc.Scan() {
		lines = append(lines, append([]byte(nil), sc.Bytes()...))
	}
	return lines
}

type chatRow struct {
	text       string
	start, end []int32
}

type tokenRow struct{ ids, labels []int32 }

func readChat(t *testing.T, r *testRun, rec *pipeline.RunRecord, stage string) []chatRow {
	var rows []chatRow
	forEach(t, r.table(rec, stage), func(b arrow.RecordBatch) {
		text := b.Column(0).(*array.String)
		st, en := b.Column(1).(*array.List), b.Column(2).(*array.List)
		for i := 0; i < int(b.NumRows()); i++ {
			rows = append(rows, chatRow{text.Value(i), dataset.Int32Row(st, i), dataset.Int32Row(en, i)})
		}
	})
	return rows
}

func readTokens(t *testing.T, r *testRun, rec *pipeline.RunRecord, stage string) []tokenRow {
	var rows []tokenRow
	forEach(t, r.table(rec, stage), func(b arrow.RecordBatch) {
		ids, labels := b.Column(0).(*array.List), b.Column(1).(*array.List)
		for i := 0; i < int(b.NumRows()); i++ {
			rows = append(rows, tokenRow{dataset.Int32Row(ids, i), dataset.Int32Row(labels, i)})
		}
	})
	return rows
}

func dataChainSpec(parquetGlob, tokenizer, system string) string {
	with := ""
	if system != "" {
		with = fmt.Sprintf(", system: %q", system)
	}
	return fmt.Sprintf(`name: alpaca-tr
stages:
  alpaca:
    kind: parquet
    with: {paths: [%s], columns: {instruction: instruction-turkish, input: input-turkish, output: output-turkish}%s}
  chat: {kind: chat_template, needs: [alpaca]}
  tokens: {kind: tokenize, needs: [chat], with: {tokenizer: %s}}
  pack: {kind: pack, needs: [tokens], with: {seq_len: 4096}}
`, parquetGlob, with, tokenizer)
}

func TestDataStagesOnAlpacaTR(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the oracles on 20,748 records")
	}
	testenv.NeedTool(t, "node")
	testenv.NeedTool(t, "python3")
	shard := testenv.AlpacaTR(t, "parquet/train-00000-of-00002.parquet")
	records := testenv.AlpacaTR(t, "alpaca-tr.jsonl.gz")
	tok := testenv.GemmaFile(t, "tokenizer.json")
	config := filepath.Join(filepath.Dir(tok), "tokenizer_config.json")
	glob := filepath.Join(filepath.Dir(shard), "train-*.parquet")

	for _, system := range []string{"", testSystem} {
		t.Run(fmt.Sprintf("system=%v", system != ""), func(t *testing.T) {
			r := newTestRun(t)
			rec, err := r.run(r.spec(dataChainSpec(glob, tok, system)), pipeline.Options{})
			if err != nil {
				t.Fatal(err)
			}
			chats := readChat(t, r, rec, "chat")
			tokens := readTokens(t, r, rec, "tokens")
			if len(chats) != 20748 || len(tokens) != 20748 {
				t.Fatalf("%d chat rows, %d token rows; want 20748", len(chats), len(tokens))
			}

			// 1. Chat text: byte-identical to the real template through jinja2.
			args := []string{"scripts/oracle/render_chat.py", config, "--alpaca", records}
			if system != "" {
				args = append(args, "--system", system)
			}
			rendered := oracleLines(t, nil, "python3", args...)
			if len(rendered) != len(chats) {
				t.Fatalf("oracle rendered %d texts", len(rendered))
			}
			var texts bytes.Buffer
			for i, line := range rendered {
				var o struct{ Text, Error string }
				if err := json.Unmarshal(line, &o); err != nil || o.Error != "" {
					t.Fatalf("record %d: oracle: %v %s", i, err, o.Error)
				}
				if o.Text != chats[i].text {
					t.Fatalf("record %d: chat text differs from the template's rendering:\n got %q\nwant %q", i, chats[i].text, o.Text)
				}
				json.NewEncoder(&texts).Encode(map[string]string{"text": o.Text})
			}

			// 2. Token ids: identical to HF tokenizers on those texts; and
			// 3. labels: trained exactly on the tokens HF's rule picks for
			// the assistant's span, found here by searching the text.
			hf := oracleLines(t, texts.Bytes(), "node", "npm/hf-tokenize.js", "encode", tok, "--offsets")
			var trained, total int64
			for i, line := range hf {
				var o struct {
					IDs     []int32  `json:"ids"`
					Offsets [][2]int `json:"offsets"`
				}
				if err := json.Unmarshal(line, &o); err != nil {
					t.Fatal(err)
				}
				got := tokens[i]
				if !slices.Equal(got.ids, o.IDs) {
					t.Fatalf("record %d: ids differ from HF tokenizers (%d vs %d tokens)", i, len(got.ids), len(o.IDs))
				}
				if got.ids[0] != 2 || slices.Contains(got.ids[1:], 2) {
					t.Fatalf("record %d: not exactly one <bos> at the start", i)
				}
				want := expectedLabels(t, i, chats[i].text, o.IDs, o.Offsets)
				if !slices.Equal(got.labels, want) {
					t.Fatalf("record %d: labels differ from the span-derived mask", i)
				}
				for _, l := range want {
					if l != -100 {
						trained++
					}
				}
				total += int64(len(o.IDs))
			}
			t.Logf("%d tokens, %d trained", total, trained)

			// 4. Packing: every example once, nothing visible across examples.
			checkPacked(t, r, rec, tokens)
		})
	}
}

// expectedLabels derives the labels of one record from its text alone: the
// assistant's turn is what follows the last "<start_of_turn>model\n" up to
// and including the next "<end_of_turn>"; a token is trained when it holds
// a byte of that span (HF's return_assistant_tokens_mask runs from the token
// holding the first byte to the one holding the last).
func expectedLabels(t *testing.T, rec int, text string, ids []int32, offs [][2]int) []int32 {
	const open, close = "<start_of_turn>model\n", "<end_of_turn>"
	s := strings.LastIndex(text, open)
	if s < 0 {
		t.Fatalf("record %d: no model turn in %q", rec, text)
	}
	s += len(open)
	e := strings.Index(text[s:], close)
	if e < 0 {
		t.Fatalf("record %d: model turn not closed", rec)
	}
	e += s + len(close)
	labels := make([]int32, len(ids))
	for k, o := range offs {
		labels[k] = -100
		if o[0] < e && o[1] > s {
			labels[k] = ids[k]
		}
	}
	return labels
}

func checkPacked(t *testing.T, r *testRun, rec *pipeline.RunRecord, tokens []tokenRow) {
	t.Helper()
	const seqLen = 4096
	want := map[uint64]int{}
	for _, tr := range tokens {
		if len(tr.ids) <= seqLen {
			want[hashIDs(tr.ids)]++
		}
	}
	var real, slots int64
	forEach(t, r.table(rec, "pack"), func(b arrow.RecordBatch) {
		ids, labels := b.Column(0).(*array.List), b.Column(1).(*array.List)
		pos, lens := b.Column(2).(*array.List), b.Column(3).(*array.List)
		for i := 0; i < int(b.NumRows()); i++ {
			id, lab, ps, ls := dataset.Int32Row(ids, i), dataset.Int32Row(labels, i), dataset.Int32Row(pos, i), dataset.Int32Row(lens, i)
			if len(id) != seqLen || len(lab) != seqLen || len(ps) != seqLen {
				t.Fatalf("row of %d/%d/%d tokens", len(id), len(lab), len(ps))
			}
			at := 0
			for _, n := range ls {
				ex := id[at : at+int(n)]
				// position ids restart at 0 and count up within the
				// example: attention derived from them never crosses
				// into another example.
				for j := 0; j < int(n); j++ {
					if ps[at+j] != int32(j) {
						t.Fatalf("position id %d at offset %d of an example", ps[at+j], j)
					}
				}
				if lab[at] != -100 {
					t.Fatal("first label of a packed example is not -100")
				}
				h := hashIDs(ex)
				if want[h] == 0 {
					t.Fatal("a packed example is not one of the tokenized records (or appears twice)")
				}
				want[h]--
				at += int(n)
			}
			for j := at; j < seqLen; j++ {
				if id[j] != 0 || lab[j] != -100 {
					t.Fatal("padding is not id 0 with label -100")
				}
			}
			real += int64(at)
			slots += seqLen
		}
	})
	for _, n := range want {
		if n != 0 {
			t.Fatal("a tokenized record is missing from the packed rows")
		}
	}
	eff := float64(real) / float64(slots)
	t.Logf("packing efficiency %.5f over %d rows", eff, slots/seqLen)
	if eff < 0.998 {
		t.Errorf("packing efficiency %.5f, want at least 0.998", eff)
	}
}

func hashIDs(ids []int32) uint64 {
	h := fnv.New64a()
	for _, id := range ids {
		h.Write([]byte{byte(id), byte(id >> 8), byte(id >> 16), byte(id >> 24)})
	}
	return h.Sum64()
}

// TestPackOverlong runs the demo data at a seq_len that some records
// exceed, under each policy, and with a seq_len no record fits.
func TestPackOverlong(t *testing.T) {
	tok := testenv.GemmaFile(t, "tokenizer.json")
	demo := filepath.Join(testenv.RepoRoot(t), "dataset", "demo", "alpaca-tr-demo.jsonl")
	spec := func(seqLen int, policy string) string {
		return fmt.Sprintf(`name: overlong
stages:
  alpaca: {kind: jsonl, with: {paths: [%s]}}
  chat: {kind: chat_template, needs: [alpaca]}
  tokens: {kind: tokenize, needs: [chat], with: {tokenizer: %s}}
  pack: {kind: pack, needs: [tokens], with: {seq_len: %d, overlong: %s}}
`, demo, tok, seqLen, policy)
	}
	r := newTestRun(t)
	stats := map[string]map[string]any{}
	for _, policy := range []string{"drop", "truncate", "split"} {
		rec, err := r.run(r.spec(spec(96, policy)), pipeline.Options{})
		if err != nil {
			t.Fatalf("%s: %v", policy, err)
		}
		stats[policy] = rec.Stages[3].Stats
		forEach(t, r.table(rec, "pack"), func(b arrow.RecordBatch) {
			lens := b.Column(3).(*array.List)
			for i := 0; i < int(b.NumRows()); i++ {
				for _, n := range dataset.Int32Row(lens, i) {
					if n > 96 {
						t.Fatalf("%s: an example of %d tokens in a row of 96", policy, n)
					}
				}
			}
		})
	}
	num := func(p, k string) float64 { v, _ := stats[p][k].(float64); return v }
	if num("drop", "dropped") == 0 || num("drop", "examples")+num("drop", "dropped") != 129 {
		t.Errorf("drop: %v", stats["drop"])
	}
	if num("truncate", "truncated") != num("drop", "dropped") || num("truncate", "examples")+num("truncate", "skipped_untrained") != 129 {
		t.Errorf("truncate: %v", stats["truncate"])
	}
	if num("split", "split") != num("drop", "dropped") || num("split", "split_pieces") <= num("split", "split") {
		t.Errorf("split: %v", stats["split"])
	}

	// Nothing fits: a clear error, and no entry for the pack stage.
	before := r.entries()
	_, err := r.run(r.spec(spec(8, "drop")), pipeline.Options{})
	if err == nil || !strings.Contains(err.Error(), "stage pack (pack)") || !strings.Contains(err.Error(), "longer than seq_len 8") {
		t.Fatalf("all records over-long: %v", err)
	}
	if r.entries() != before {
		t.Errorf("the failed pack left an entry")
	}
}
