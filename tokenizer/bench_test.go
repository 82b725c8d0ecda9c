package tokenizer

import (
	"bufio"
	"encoding/json"
	"os"
	"testing"

	"gemmaft/internal/testenv"
)

// benchTexts are the chat-templated alpaca-tr records: read from the JSON
// lines file named by TOKENIZER_BENCH_TEXTS (scripts/bench-tokenizer.sh
// sets it, so both sides see the same texts), else rendered here.
func benchTexts(b *testing.B) []string {
	path := os.Getenv("TOKENIZER_BENCH_TEXTS")
	if path == "" {
		return renderAlpaca(b, nil)
	}
	f, err := os.Open(path)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<26)
	var texts []string
	for sc.Scan() {
		var rec struct{ Text string }
		if err := json.Unmarshal(sc.Bytes(), &rec); err != nil {
			b.Fatal(err)
		}
		texts = append(texts, rec.Text)
	}
	return texts
}

// BenchmarkEncodeBatch encodes all texts on GOMAXPROCS cores per iteration
// and reports tokens per second. Each iteration uses fresh word caches, as
// a new process would.
func BenchmarkEncodeBatch(b *testing.B) {
	tk := gemma(b)
	texts := benchTexts(b)
	tokens := 0
	for _, ids := range tk.EncodeBatch(texts, false) {
		tokens += len(ids)
	}
	b.ResetTimer()
	for b.Loop() {
		b.StopTimer()
		tk.encoders = newPool()
		b.StartTimer()
		tk.EncodeBatch(texts, false)
	}
	b.ReportMetric(float64(tokens)*float64(b.N)/b.Elapsed().Seconds(), "tokens/s")
}

// BenchmarkEncode encodes one text at a time on one goroutine.
func BenchmarkEncode(b *testing.B) {
	tk := gemma(b)
	texts := benchTexts(b)[:2000]
	tokens := 0
	b.ResetTimer()
	for b.Loop() {
		for _, s := range texts {
			ids, _ := tk.Encode(s, false)
			tokens += len(ids)
		}
	}
	b.ReportMetric(float64(tokens)/b.Elapsed().Seconds(), "tokens/s")
}

func BenchmarkLoad(b *testing.B) {
	data, err := os.ReadFile(testenv.GemmaFile(b, "tokenizer.json"))
	if err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		if _, err := Load(data); err != nil {
			b.Fatal(err)
		}
	}
}
