package converse

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"gemmaft/internal/testenv"
	"gemmaft/tokenizer"
	"gemmaft/trainer"
)

func gemmaTokenizer(t *testing.T) *tokenizer.Tokenizer {
	t.Helper()
	tok, err := tokenizer.LoadFile(testenv.GemmaFile(t, "tokenizer.json"))
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func id(t *testing.T, tok *tokenizer.Tokenizer, s string) int32 {
	t.Helper()
	v, ok := tok.ID(s)
	if !ok {
		t.Fatalf("no token %q", s)
	}
	return v
}

// TestPromptOfALaterTurn: the prompt of a later turn holds the system
// text in front of the first turn, every earlier turn with the model's own
// answer to it (stripped, as the template strips turns), and ends with the
// generation prompt, byte for byte as Gemma 3's template renders it.
func TestPromptOfALaterTurn(t *testing.T) {
	c := Conversation{
		System:  "Kısa cevap ver.",
		Turns:   []string{"Türkiye'nin başkenti neresidir?", "Peki en kalabalık şehri?"},
		Answers: []string{"  Ankara.\n"},
	}
	got, err := c.Prompt()
	if err != nil {
		t.Fatal(err)
	}
	want := "<bos><start_of_turn>user\nKısa cevap ver.\n\nTürkiye'nin başkenti neresidir?<end_of_turn>\n" +
		"<start_of_turn>model\nAnkara.<end_of_turn>\n" +
		"<start_of_turn>user\nPeki en kalabalık şehri?<end_of_turn>\n" +
		"<start_of_turn>model\n"
	if got != want {
		t.Errorf("prompt:\n%q\nwant\n%q", got, want)
	}
	for _, bad := range []Conversation{
		{Turns: []string{"a", "b"}},
		{Turns: []string{"a"}, Answers: []string{"x"}},
		{},
	} {
		if _, err := bad.Prompt(); err == nil {
			t.Errorf("%d turns and %d answers rendered", len(bad.Turns), len(bad.Answers))
		}
	}
}

// TestStreamerTurkish: a Turkish character spelled in byte tokens comes
// out whole once its last byte arrives, never as replacement characters,
// and the streamed pieces add up to what decoding the whole answer gives.
func TestStreamerTurkish(t *testing.T) {
	tok := gemmaTokenizer(t)
	s := NewStreamer(tok)
	// "ğ" is C4 9F; "ş" C5 9F; "€" E2 82 AC.
	for _, c := range []struct {
		bytes []string
		want  string
	}{{[]string{"<0xC4>", "<0x9F>"}, "ğ"}, {[]string{"<0xC5>", "<0x9F>"}, "ş"}, {[]string{"<0xE2>", "<0x82>", "<0xAC>"}, "€"}} {
		for i, b := range c.bytes {
			got := s.Add(id(t, tok, b))
			if i < len(c.bytes)-1 && got != "" {
				t.Errorf("%s: after %d of %d bytes the streamer gave %q", c.want, i+1, len(c.bytes), got)
			}
			if i == len(c.bytes)-1 && got != c.want {
				t.Errorf("%s: gave %q", c.want, got)
			}
		}
	}
	// A real answer with byte tokens in the middle of words.
	ids := tok.EncodeIDs("Çay demlenirken ", false)
	for _, b := range []string{"<0xC4>", "<0x9F>"} {
		ids = append(ids, id(t, tok, b))
	}
	ids = append(ids, tok.EncodeIDs("ünlü bir şarkı söylüyordu: İstanbul'u dinliyorum.", false)...)
	ids = append(ids, id(t, tok, "<0xC4>")) // cut short: the last byte never comes
	s = NewStreamer(tok)
	var got strings.Builder
	for _, v := range ids {
		piece := s.Add(v)
		if strings.ContainsRune(piece, '\uFFFD') {
			t.Errorf("piece %q holds a replacement character", piece)
		}
		got.WriteString(piece)
	}
	got.WriteString(s.Flush())
	want, err := tok.Decode(ids, true)
	if err != nil {
		t.Fatal(err)
	}
	if got.String() != want || !strings.Contains(want, "ğünlü") || !strings.HasSuffix(want, "\uFFFD") {
		t.Errorf("streamed %q, decoded %q", got.String(), want)
	}
}

// scripted is a Decoder that answers every prompt with the same tokens.
type scripted struct {
	info    trainer.ModelInfo
	answer  []int32
	prompts [][]int32
}

func (d *scripted) Info() *trainer.ModelInfo { return &d.info }
func (d *scripted) Close() error             { return nil }
func (d *scripted) Generate(ctx context.Context, prompts [][]int32, o trainer.GenerateOptions, emit func(int, int32)) ([][]int32, error) {
	d.prompts = prompts
	stop := map[int32]bool{}
	for _, s := range o.Stop {
		stop[s] = true
	}
	out := make([][]int32, len(prompts))
	for i := range prompts {
		for _, tok := range d.answer {
			if len(out[i]) == o.MaxNewTokens {
				break
			}
			out[i] = append(out[i], tok)
			if emit != nil {
				emit(i, tok)
			}
			if stop[tok] {
				break
			}
		}
	}
	return out, nil
}

// TestReply: prompts are the rendered conversations with one <bos>; the
// answer's text leaves out the stop token and surrounding white space; a
// cut answer says so; the streamed pieces spell the answer; and a prompt
// with no room for its answer in the context is refused before decoding.
func TestReply(t *testing.T) {
	tok := gemmaTokenizer(t)
	eot := id(t, tok, "<end_of_turn>")
	body := tok.EncodeIDs("\nMerhaba, ben bir modelim. Çok güzel bir gün!  ", false)
	dec := &scripted{info: trainer.ModelInfo{Config: &trainer.Config{VocabSize: 262144, MaxPositions: 200}}}
	dec.answer = append(append([]int32(nil), body...), eot, 5, 6)
	g, err := New(dec, tok)
	if err != nil {
		t.Fatal(err)
	}
	convs := []Conversation{{Turns: []string{"Selam!"}}, {System: "Kısa cevap ver.", Turns: []string{"a", "b"}, Answers: []string{"c"}}}
	pieces := make([]strings.Builder, len(convs))
	replies, err := g.Reply(context.Background(), convs, trainer.GenerateOptions{MaxNewTokens: 64}, func(i int, p string) { pieces[i].WriteString(p) })
	if err != nil {
		t.Fatal(err)
	}
	for i, r := range replies {
		if r.Text != "Merhaba, ben bir modelim. Çok güzel bir gün!" || !r.Stopped || len(r.Tokens) != len(body)+1 {
			t.Errorf("reply %d: %+v", i, r)
		}
		if chatStrip := strings.TrimSpace(pieces[i].String()); chatStrip != r.Text {
			t.Errorf("reply %d streamed %q", i, pieces[i].String())
		}
		text, _ := convs[i].Prompt()
		want := tok.EncodeIDs(text, false)
		if fmt.Sprint(dec.prompts[i]) != fmt.Sprint(want) || r.PromptTokens != len(want) {
			t.Errorf("prompt %d: %v, want %v", i, dec.prompts[i], want)
		}
		if all, _ := tok.Decode(dec.prompts[i], false); strings.Count(all, "<bos>") != 1 || dec.prompts[i][0] != id(t, tok, "<bos>") {
			t.Errorf("prompt %d does not start with the one <bos>: %q", i, all)
		}
	}
	cut, err := g.Reply(context.Background(), convs[:1], trainer.GenerateOptions{MaxNewTokens: 4}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if cut[0].Stopped || len(cut[0].Tokens) != 4 {
		t.Errorf("cut reply: %+v", cut[0])
	}
	_, err = g.Reply(context.Background(), convs, trainer.GenerateOptions{MaxNewTokens: 190}, nil)
	var ce *ContextError
	if !errors.As(err, &ce) || ce.Context != 200 || ce.MaxNewTokens != 190 || !strings.Contains(err.Error(), "context of 200") {
		t.Errorf("no room for the answer: %v", err)
	}
}

// writeTinyModel writes a random tiny Gemma 3 (the real vocabulary) with
// the tokenizer beside it.
func writeTinyModel(t *testing.T, seed uint64) string {
	t.Helper()
	dir := t.TempDir()
	cfg, err := trainer.Preset("tiny")
	if err != nil {
		t.Fatal(err)
	}
	if err := trainer.WriteRandomCheckpoint(dir, cfg, trainer.InitOptions{Seed: seed, DType: "bfloat16", Std: 0.3}); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(testenv.GemmaFile(t, "tokenizer.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "tokenizer.json"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

// TestGreedyRepliesAreReproducible: on a real (tiny, random) model, greedy
// answers are the same from one call to the next and whatever the other
// conversations decoded in the same batch.
func TestGreedyRepliesAreReproducible(t *testing.T) {
	tok := gemmaTokenizer(t)
	dir := writeTinyModel(t, 3)
	dec, err := trainer.OpenDecoder(trainer.DecoderConfig{Model: dir, Quantize: "nf4"})
	if err != nil {
		t.Fatal(err)
	}
	g, err := New(dec, tok)
	if err != nil {
		t.Fatal(err)
	}
	convs := []Conversation{
		{Turns: []string{"Bir haiku yaz."}},
		{System: "Kısa cevap ver.", Turns: []string{"İki artı iki kaçtır?", "Ya üç artı üç?"}, Answers: []string{"Dört."}},
		{Turns: []string{"Ankara hakkında uzun bir paragraf yaz, tarihini de anlat."}},
	}
	o := trainer.GenerateOptions{MaxNewTokens: 10}
	all, err := g.Reply(context.Background(), convs, o, nil)
	if err != nil {
		t.Fatal(err)
	}
	again, err := g.Reply(context.Background(), convs, o, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := range convs {
		one, err := g.Reply(context.Background(), convs[i:i+1], o, nil)
		if err != nil {
			t.Fatal(err)
		}
		if fmt.Sprint(all[i].Tokens) != fmt.Sprint(again[i].Tokens) || fmt.Sprint(all[i].Tokens) != fmt.Sprint(one[0].Tokens) {
			t.Errorf("conversation %d: %v, again %v, alone %v", i, all[i].Tokens, again[i].Tokens, one[0].Tokens)
		}
		if len(all[i].Tokens) == 0 {
			t.Errorf("conversation %d: no tokens", i)
		}
	}
	// Sampling with a seed is reproducible too, and differs from greedy.
	s := o
	s.Temperature, s.TopK, s.TopP, s.Seed = 1, 64, 0.95, 11
	a, _ := g.Reply(context.Background(), convs, s, nil)
	b, _ := g.Reply(context.Background(), convs, s, nil)
	if fmt.Sprint(a[0].Tokens) != fmt.Sprint(b[0].Tokens) {
		t.Errorf("seeded sampling differs: %v, %v", a[0].Tokens, b[0].Tokens)
	}
}

func TestGenerationConfig(t *testing.T) {
	dir := t.TempDir()
	if gc, err := ReadGenerationConfig(dir); gc != nil || err != nil {
		t.Fatalf("no file: %v %v", gc, err)
	}
	if temp, k, p := (*GenerationConfig)(nil).Sampling(); temp != 0 || k != 0 || p != 1 {
		t.Errorf("no config: %v %v %v", temp, k, p)
	}
	// Gemma 3's own file.
	os.WriteFile(filepath.Join(dir, "generation_config.json"), []byte(`{"bos_token_id": 2, "cache_implementation": "hybrid",
	  "do_sample": true, "eos_token_id": [1, 106], "pad_token_id": 0, "top_k": 64, "top_p": 0.95, "transformers_version": "4.50.0.dev0"}`), 0o644)
	gc, err := ReadGenerationConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	if temp, k, p := gc.Sampling(); temp != 1 || k != 64 || p != 0.95 || fmt.Sprint(gc.EOS) != "[1 106]" {
		t.Errorf("gemma 3: %v %v %v eos %v", temp, k, p, gc.EOS)
	}
	os.WriteFile(filepath.Join(dir, "generation_config.json"), []byte(`{"do_sample": false, "eos_token_id": 1, "temperature": 0.7}`), 0o644)
	gc, _ = ReadGenerationConfig(dir)
	if temp, _, _ := gc.Sampling(); temp != 0 || fmt.Sprint(gc.EOS) != "[1]" {
		t.Errorf("greedy file: temperature %v eos %v", temp, gc.EOS)
	}
	// A caller's temperature samples with transformers' filters where the
	// file gives none (top_k 50), and with the file's where it does.
	if k, p := gc.Filters(); k != 50 || p != 1 {
		t.Errorf("greedy file's filters: %v %v, want 50 1", k, p)
	}
	if k, p := (*GenerationConfig)(nil).Filters(); k != 50 || p != 1 {
		t.Errorf("no config's filters: %v %v, want 50 1", k, p)
	}
	os.WriteFile(filepath.Join(dir, "generation_config.json"), []byte(`{"do_sample": false, "top_k": 40, "top_p": 0.9}`), 0o644)
	gc, _ = ReadGenerationConfig(dir)
	if k, p := gc.Filters(); k != 40 || p != 0.9 {
		t.Errorf("greedy file with filters: %v %v, want 40 0.9", k, p)
	}
	// top_p 0 keeps the most likely token alone, as transformers' top-p
	// filter keeps at least one token: top_k 1, not an uncut draw.
	os.WriteFile(filepath.Join(dir, "generation_config.json"), []byte(`{"do_sample": true, "top_k": 64, "top_p": 0.0}`), 0o644)
	gc, _ = ReadGenerationConfig(dir)
	temp, k, p := gc.Sampling()
	if k, p = TopPZero(k, p); temp != 1 || k != 1 || p != 1 {
		t.Errorf("top_p 0: %v %v %v, want 1 1 1", temp, k, p)
	}
	if k, p := TopPZero(64, 0.9); k != 64 || p != 0.9 {
		t.Errorf("top_p 0.9: %v %v", k, p)
	}
	os.WriteFile(filepath.Join(dir, "generation_config.json"), []byte(`{"eos_token_id": "x"}`), 0o644)
	if _, err := ReadGenerationConfig(dir); err == nil {
		t.Error("a string eos_token_id was read")
	}
}
