package tokenizer

import (
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"unicode/utf8"

	"gemmaft/internal/testenv"
)

// compareEncodings checks our ids and offsets against the oracle's for
// every text and reports the first differences.
func compareEncodings(t *testing.T, tk *Tokenizer, texts []string, addSpecial bool, want []hfEncoding) {
	t.Helper()
	ids, offs := tk.EncodeBatchOffsets(texts, addSpecial)
	bad := 0
	for i := range texts {
		if slices.Equal(ids[i], want[i].IDs) && slices.Equal(offs[i], want[i].Offsets) {
			continue
		}
		bad++
		if bad > 5 {
			continue
		}
		k := 0
		for k < len(ids[i]) && k < len(want[i].IDs) && ids[i][k] == want[i].IDs[k] && offs[i][k] == want[i].Offsets[k] {
			k++
		}
		t.Errorf("text %d %.60q (addSpecial=%v): first difference at token %d:\n got  %v %v\n want %v %v",
			i, texts[i], addSpecial, k, window(ids[i], k), window(offs[i], k), window(want[i].IDs, k), window(want[i].Offsets, k))
	}
	if bad > 0 {
		t.Errorf("%d of %d texts differ from Hugging Face (addSpecial=%v)", bad, len(texts), addSpecial)
	}
}

func window[T any](s []T, k int) []T { return s[min(k, len(s)):min(k+4, len(s))] }

// TestParityAlpaca encodes every alpaca-tr record, rendered with the real
// Gemma 3 chat template, and compares ids and byte offsets with Hugging
// Face tokenizers, with and without the post-processor's <bos>.
func TestParityAlpaca(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the oracles over 20,748 records")
	}
	tk := gemma(t)
	path := testenv.GemmaFile(t, "tokenizer.json")
	texts := renderAlpaca(t, nil)
	if len(texts) != 20748 {
		t.Fatalf("rendered %d records, want 20748", len(texts))
	}
	total := 0
	for _, addSpecial := range []bool{false, true} {
		want := hfEncode(t, path, texts, addSpecial)
		compareEncodings(t, tk, texts, addSpecial, want)
		if !addSpecial {
			for _, w := range want {
				total += len(w.IDs)
			}
		}
	}
	t.Logf("%d records, %d tokens identical to Hugging Face", len(texts), total)
}

// adversarialTexts are inputs chosen to break a tokenizer: white space of
// every kind and length, Turkish casing, emoji sequences, scripts of all
// directions, combining marks, private-use and non-characters, control
// characters, the literal "▁", added tokens whole, embedded and broken,
// and very long texts.
func adversarialTexts(tk *Tokenizer) []string {
	texts := []string{"", " ", "▁", "\u00a0", "\u3000", "\r\n", " \n ", "\t \t", "a", "A B", " a", "a "}
	for n := 1; n <= 40; n++ {
		for _, ws := range []string{" ", "\t", "\n", "\r", "\r\n", " \n", "\n ", "\t ", "▁", " ▁", "\u00a0", "\u2003", "\u3000"} {
			r := strings.Repeat(ws, n)
			texts = append(texts, r, "x"+r+"y", r+"word", "word"+r, "a>"+r+"</b", "<b>"+r+"</b>")
		}
	}
	texts = append(texts,
		"İstanbul'da ılık bir İlkbahar günü; IŞIK ışık İi Iı", "İİİİ ıııı IIII iiii İıIi", "I\u0307stanbul",
		"KIRMIZI kırmızı Kırmızı kIrMıZı", "Şişli'de ğüşiöç ĞÜŞİÖÇ",
		"👨‍👩‍👧‍👦 family 👩🏽‍💻 coder 🏳️‍🌈 🏴‍☠️", "🇹🇷🇺🇸🇯🇵🇩🇪 flags🇹🇷", "👍🏽👍🏿✋🏻", "❤️‍🔥 ❤\ufe0f ☺\ufe0e",
		"日本語のテキストです。", "中文字符测试，标点！", "한국어 텍스트 입니다", "ｆｕｌｌｗｉｄｔｈ ＡＢＣ",
		"مرحبا بالعالم، كيف حالك؟", "שלום עולם", "mixed עברית and English العربية 123", "\u202eRTL override\u202c",
		"e\u0301 a\u0300\u0301\u0302\u0303 Z\u0351\u0352\u0353\u0354\u0355\u0356", "\u0301\u0301\u0301 leading marks",
		"\ue000\uf8ff\U000f0000\U0010fffd private", "\ufdd0\ufdef\ufffe\uffff\U0001fffe\U0001ffff\U0010fffe\U0010ffff",
		"\ufeffBOM \u200b zero \u200c\u200d joiners \u2060", "\ufffd replacement \ufffd\ufffd",
		"▁", "▁▁", "▁▁▁", "a▁b", "▁ ▁ ▁", " ▁", "▁ ", "x▁▁▁▁y", "<▁>", ">▁</", "> </", ">  </", "a> </b",
		"<0x41> <0xZZ> <0x> <0x4> <0xFF>", "<unk> <pad> <mask>", "[multimodal]x[multimodal]",
		"<start_of", "_of_turn>", "<start_of_turn", "start_of_turn>", "<<bos>>", "<bos<bos>>", "<bo<bos>s>",
		"<unused99", "<unused6241>", "<unused6242>", "<unused-1>", "</td", "<td", "<ta", "<start_of_turn>",
		"<start_of_turn><end_of_turn>", "a<bos>b", "<bos>", "<bos><bos>", "<eos>\n<eos>",
		"<start_of_turn>user\nMerhaba<end_of_turn>\n<start_of_turn>model\nSelam<end_of_turn>\n",
		"3.14159 1,000,000 2024-01-01 0x1F 1e10 ½ ¾ ① ⅷ", "$€£¥₺ %&*", "path/to/file.go:12:3", "https://example.com/a?b=c&d=e#f",
		"func main() {\n\tfmt.Println(\"hi\")\n}\n", "    indented\n        more", "tabs\tin\tthe\tmiddle",
	)
	var ctl strings.Builder
	for r := rune(0); r < 0x20; r++ {
		ctl.WriteRune(r)
		texts = append(texts, fmt.Sprintf("a%cb", r), string(r))
	}
	for r := rune(0x7f); r <= 0x9f; r++ {
		ctl.WriteRune(r)
		texts = append(texts, fmt.Sprintf("a%cb", r))
	}
	texts = append(texts, ctl.String())
	// Every added token alone, embedded, and cut in half.
	for id := range tk.VocabSize() {
		tok, ok := tk.Token(int32(id))
		if !ok {
			continue
		}
		if _, added := tk.added.exact(tok); !added {
			continue
		}
		texts = append(texts, tok)
		if tk.IsSpecial(int32(id)) || id%97 == 0 || id < 300 {
			half := len(tok) / 2
			for half > 0 && !utf8.RuneStart(tok[half]) {
				half--
			}
			texts = append(texts, "x"+tok+"y", " "+tok+" ", tok[:half], tok[half:], tok[:half]+" "+tok[half:], tok+tok[:half])
		}
	}
	// Long texts with and without spaces.
	sentence := "Türkiye'nin en kalabalık şehri İstanbul, iki kıtaya yayılır; 🇹🇷 ve 日本 gibi. "
	texts = append(texts,
		strings.Repeat(sentence, 2000),
		strings.ReplaceAll(strings.Repeat(sentence, 1000), " ", ""),
		strings.Repeat("a", 100000), strings.Repeat("ab", 30000), strings.Repeat("1", 20000),
		strings.Repeat("🇹🇷", 5000), strings.Repeat(" ", 10000), strings.Repeat("▁", 5000),
		strings.Repeat("\u0301", 5000), strings.Repeat("<bos", 3000),
	)
	// Random mixtures of the pieces above.
	pieces := []string{" ", "  ", "\n", "\t", "▁", "a", "İ", "ı", "ş", "lar", "ler", "The", "the", ".", ",", ">", "</", "<", "<bos>",
		"<start_of_turn>", "<end_of_turn>", "👨‍👩‍👧", "🇹🇷", "日本", "م", "\u0301", "\ue000", "\uffff", "\x00", "\x1f", "1", "23", "\u00a0", "<0x41>", "**", "##"}
	rng := rand.New(rand.NewPCG(1, 2))
	for range 3000 {
		var b strings.Builder
		for range rng.IntN(30) {
			b.WriteString(pieces[rng.IntN(len(pieces))])
		}
		texts = append(texts, b.String())
	}
	return texts
}

// TestParityAdversarial compares ids and offsets on the adversarial set,
// then decoding (with and without special tokens) and round trips.
func TestParityAdversarial(t *testing.T) {
	tk := gemma(t)
	path := testenv.GemmaFile(t, "tokenizer.json")
	texts := adversarialTexts(tk)
	for _, addSpecial := range []bool{false, true} {
		compareEncodings(t, tk, texts, addSpecial, hfEncode(t, path, texts, addSpecial))
	}

	// Decoding: our ids (now known equal to HF's), plus id sequences that
	// no encoder produces: lone and shuffled byte tokens, specials.
	var idLists [][]int32
	for _, s := range texts {
		idLists = append(idLists, tk.EncodeIDs(s, true))
	}
	rng := rand.New(rand.NewPCG(3, 4))
	for range 500 {
		ids := make([]int32, rng.IntN(12))
		for k := range ids {
			switch rng.IntN(3) {
			case 0:
				ids[k] = tk.byteIDs[rng.IntN(256)]
			case 1:
				ids[k] = int32(rng.IntN(300))
			default:
				ids[k] = int32(rng.IntN(tk.VocabSize()))
			}
		}
		idLists = append(idLists, ids)
	}
	for _, skip := range []bool{false, true} {
		want := hfDecode(t, path, idLists, skip)
		bad := 0
		for i, ids := range idLists {
			got, err := tk.Decode(ids, skip)
			if err != nil {
				t.Fatal(err)
			}
			if got != want[i] {
				if bad++; bad <= 5 {
					t.Errorf("Decode(%v, skipSpecial=%v) = %.80q, want %.80q", window(ids, 0), skip, got, want[i])
				}
			}
			if skip && i < len(texts) && want[i] == texts[i] && got != texts[i] {
				t.Errorf("text %d round-trips in Hugging Face but not here", i)
			}
		}
		if bad > 0 {
			t.Errorf("%d of %d decodes differ (skipSpecial=%v)", bad, len(idLists), skip)
		}
	}
}

// TestParityFuzzCorpus sends the fuzzer's corpus (the valid UTF-8 inputs,
// which are all Hugging Face accepts) through the oracle too.
func TestParityFuzzCorpus(t *testing.T) {
	tk := gemma(t)
	files, err := filepath.Glob(filepath.Join("testdata", "fuzz", "FuzzEncode", "*"))
	if err != nil || len(files) == 0 {
		t.Skip("no fuzz corpus")
	}
	var texts []string
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		lines := strings.Split(strings.TrimSpace(string(data)), "\n")
		if len(lines) != 2 || !strings.HasPrefix(lines[1], "string(") {
			t.Fatalf("%s: unexpected corpus file", f)
		}
		s, err := strconv.Unquote(strings.TrimSuffix(strings.TrimPrefix(lines[1], "string("), ")"))
		if err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		if utf8.ValidString(s) {
			texts = append(texts, s)
		}
	}
	path := testenv.GemmaFile(t, "tokenizer.json")
	for _, add := range []bool{false, true} {
		compareEncodings(t, tk, texts, add, hfEncode(t, path, texts, add))
	}
	t.Logf("%d of %d corpus inputs are valid UTF-8 and match", len(texts), len(files))
}
