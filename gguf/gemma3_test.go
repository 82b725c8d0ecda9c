package gguf

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"gemmaft/chat"
	"gemmaft/internal/testenv"
	"gemmaft/tokenizer"
	"gemmaft/trainer"
)

// checkpoint writes a random Gemma 3 checkpoint of the preset with the real
// Gemma 3 tokenizer files beside it, and returns its folder.
func checkpoint(t *testing.T, preset string) string {
	t.Helper()
	c, err := trainer.Preset(preset)
	if err != nil {
		t.Fatal(err)
	}
	return checkpointOf(t, c, preset)
}

// checkpointOf writes a random checkpoint of shape c in a folder called
// name, with the real Gemma 3 tokenizer files beside it.
func checkpointOf(t *testing.T, c *trainer.Config, name string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), name)
	// Norm weights drawn away from zero exercise the 1 + w shift.
	if err := trainer.WriteRandomCheckpoint(dir, c, trainer.InitOptions{Seed: 3, Std: 0.125, NormStd: 0.5}); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"tokenizer.json", "tokenizer_config.json"} {
		b, err := os.ReadFile(testenv.GemmaFile(t, f))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, f), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func convert(t *testing.T, dir string, typ FileType) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), filepath.Base(dir)+"."+typ.String()+".gguf")
	if err := Gemma3(context.Background(), dir, out, Options{Type: typ}); err != nil {
		t.Fatal(err)
	}
	return out
}

// oracle runs the llama.cpp oracle script with JSON lines on stdin.
func oracle(t *testing.T, stdin []byte, args ...string) []byte {
	t.Helper()
	cmd := exec.Command("node", append([]string{testenv.LlamaOracle(t)}, args...)...)
	cmd.Stdin = bytes.NewReader(stdin)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("llama oracle %s: %v\n%s", args[0], err, stderr.String())
	}
	return out
}

func jsonLines[T any](t *testing.T, b []byte) []T {
	t.Helper()
	var out []T
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(nil, 64<<20)
	for sc.Scan() {
		var v T
		if err := json.Unmarshal(sc.Bytes(), &v); err != nil {
			t.Fatalf("oracle output %q: %v", sc.Text(), err)
		}
		out = append(out, v)
	}
	return out
}

// TestMetadataAsLlamaCppReadsIt: @huggingface/gguf reads every key of a
// converted tiny model, with the values llama.cpp's gemma3 loader needs,
// and the tensors under llama.cpp's names and shapes.
func TestMetadataAsLlamaCppReadsIt(t *testing.T) {
	testenv.LlamaOracle(t)
	dir := checkpoint(t, "tiny")
	path := convert(t, dir, MostlyQ4_0)
	var got struct {
		Metadata map[string]any
		Tensors  []struct {
			Name  string
			Shape []int
			DType int
		}
	}
	if err := json.Unmarshal(oracle(t, nil, "meta", path), &got); err != nil {
		t.Fatal(err)
	}
	c, _ := trainer.Preset("tiny")
	want := map[string]any{
		"general.architecture":                    "gemma3",
		"general.name":                            "tiny",
		"general.file_type":                       2.0,
		"general.quantization_version":            2.0,
		"gemma3.context_length":                   float64(c.MaxPositions),
		"gemma3.embedding_length":                 64.0,
		"gemma3.block_count":                      6.0,
		"gemma3.feed_forward_length":              256.0,
		"gemma3.attention.head_count":             4.0,
		"gemma3.attention.head_count_kv":          2.0,
		"gemma3.attention.key_length":             16.0,
		"gemma3.attention.value_length":           16.0,
		"gemma3.attention.layer_norm_rms_epsilon": float64(float32(1e-6)),
		"gemma3.attention.sliding_window":         64.0,
		"gemma3.rope.freq_base":                   1e6,
		"tokenizer.ggml.model":                    "llama",
		"tokenizer.ggml.pre":                      "default",
		"tokenizer.ggml.bos_token_id":             2.0,
		"tokenizer.ggml.eos_token_id":             106.0, // tokenizer_config's eos_token, <end_of_turn>
		"tokenizer.ggml.eot_token_id":             106.0,
		"tokenizer.ggml.unknown_token_id":         3.0,
		"tokenizer.ggml.padding_token_id":         0.0,
		"tokenizer.ggml.add_bos_token":            true,
		"tokenizer.ggml.add_eos_token":            false,
		"tokenizer.ggml.add_space_prefix":         false,
	}
	for k, v := range want {
		if got.Metadata[k] != v {
			t.Errorf("%s = %v (%T), want %v", k, got.Metadata[k], got.Metadata[k], v)
		}
	}
	for _, k := range []string{"tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"} {
		arr, _ := got.Metadata[k].(map[string]any)
		if arr == nil || arr["length"] != float64(c.VocabSize) {
			t.Errorf("%s: %v, want %d entries", k, got.Metadata[k], c.VocabSize)
		}
	}
	cfg, err := os.ReadFile(filepath.Join(dir, "tokenizer_config.json"))
	if err != nil {
		t.Fatal(err)
	}
	var tc struct {
		ChatTemplate string `json:"chat_template"`
	}
	json.Unmarshal(cfg, &tc)
	if got.Metadata["tokenizer.chat_template"] != tc.ChatTemplate || tc.ChatTemplate == "" {
		t.Error("tokenizer.chat_template is not the tokenizer's chat template")
	}

	if len(got.Tensors) != 2+6*13 {
		t.Fatalf("%d tensors, want %d", len(got.Tensors), 2+6*13)
	}
	shapes := map[string][]int{"token_embd.weight": {64, 262144}, "output_norm.weight": {64}}
	for i := 0; i < 6; i++ {
		b := fmt.Sprintf("blk.%d.", i)
		for _, n := range []string{"attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"} {
			shapes[b+n+".weight"] = []int{64}
		}
		shapes[b+"attn_q_norm.weight"], shapes[b+"attn_k_norm.weight"] = []int{16}, []int{16}
		shapes[b+"attn_q.weight"], shapes[b+"attn_k.weight"], shapes[b+"attn_v.weight"] = []int{64, 64}, []int{64, 32}, []int{64, 32}
		shapes[b+"attn_output.weight"] = []int{64, 64}
		shapes[b+"ffn_gate.weight"], shapes[b+"ffn_up.weight"], shapes[b+"ffn_down.weight"] = []int{64, 256}, []int{64, 256}, []int{256, 64}
	}
	for _, tn := range got.Tensors {
		if fmt.Sprint(tn.Shape) != fmt.Sprint(shapes[tn.Name]) {
			t.Errorf("tensor %s: shape %v, want %v", tn.Name, tn.Shape, shapes[tn.Name])
		}
		wantType := Q4_0
		switch {
		case len(tn.Shape) == 1:
			wantType = F32
		case tn.Name == "token_embd.weight":
			wantType = Q8_0
		}
		if Type(tn.DType) != wantType {
			t.Errorf("tensor %s: type %s, want %s", tn.Name, Type(tn.DType), wantType)
		}
	}
}

// prompt is a token sequence and the positions whose logits are compared
// (every sixth and the last: llama.cpp hands logits over one position at a
// time, sorted, which is slow for a 262k vocabulary).
type prompt struct {
	IDs []int32 `json:"ids"`
	At  []int   `json:"at"`
}

// prompts are demo records as the chat template renders them, tokenised by
// our tokenizer and cut to about n tokens.
func prompts(t *testing.T, tok *tokenizer.Tokenizer, n int) []prompt {
	t.Helper()
	f, err := os.ReadFile(filepath.Join(testenv.RepoRoot(t), "dataset", "demo", "alpaca-tr-demo.jsonl"))
	if err != nil {
		t.Fatal(err)
	}
	var out []prompt
	for i, line := range strings.Split(string(f), "\n")[:3] {
		var r struct{ Instruction, Input, Output string }
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			t.Fatal(err)
		}
		text, _, err := chat.RenderGemma3(chat.Alpaca(r.Instruction, r.Input, r.Output, ""))
		if err != nil {
			t.Fatal(err)
		}
		ids := tok.EncodeIDs(text, false)
		p := prompt{IDs: ids[:min(len(ids), n+8*i)]}
		for s := 5; s < len(p.IDs)-1; s += 6 {
			p.At = append(p.At, s)
		}
		p.At = append(p.At, len(p.IDs)-1)
		out = append(out, p)
	}
	return out
}

// llamaLogits evaluates each prompt in llama.cpp from position 0 and
// returns its logits at the prompt's positions, [len(At)×vocab] per prompt.
func llamaLogits(t *testing.T, path string, ps []prompt, vocab int, lora ...string) [][]float32 {
	t.Helper()
	var in bytes.Buffer
	for _, p := range ps {
		json.NewEncoder(&in).Encode(p)
	}
	out := filepath.Join(t.TempDir(), "logits.f32")
	oracle(t, in.Bytes(), append([]string{"logits", path, out}, lora...)...)
	raw, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	var res [][]float32
	off := 0
	for _, p := range ps {
		n := len(p.At) * vocab
		if len(raw) < 4*(off+n) {
			t.Fatalf("the oracle wrote %d logits, want %d more after %d", len(raw)/4, n, off)
		}
		l := make([]float32, n)
		for i := range l {
			l[i] = math.Float32frombits(binary.LittleEndian.Uint32(raw[4*(off+i):]))
		}
		res = append(res, l)
		off += n
	}
	if len(raw) != 4*off {
		t.Fatalf("the oracle wrote %d logits, want %d", len(raw)/4, off)
	}
	return res
}

// referenceLogits runs our CPU reference model (with adapter a, when not
// nil) on each prompt and keeps the logits at the prompt's positions.
func referenceLogits(t *testing.T, m *trainer.Model, ps []prompt, a *trainer.Adapter) [][]float32 {
	t.Helper()
	v := m.Config.VocabSize
	var res [][]float32
	for _, p := range ps {
		b, err := trainer.NewBatch([]trainer.PackedRow{{InputIDs: p.IDs, Labels: p.IDs, SeqLengths: []int32{int32(len(p.IDs))}}})
		if err != nil {
			t.Fatal(err)
		}
		l, err := m.Logits(a, b)
		if err != nil {
			t.Fatal(err)
		}
		var kept []float32
		for _, s := range p.At {
			kept = append(kept, l[s*v:(s+1)*v]...)
		}
		res = append(res, kept)
	}
	return res
}

// asStored replaces the model's matrices by what a file of type ft holds
// (Encode then Decode, each in its tensor's type), so that the reference
// computes with the weights llama.cpp reads, and returns the largest
// relative RMS error that storing put on any matrix.
func asStored(t *testing.T, m *trainer.Model, ft FileType) float64 {
	t.Helper()
	worst := 0.0
	round := func(v []float32, typ Type) {
		data, err := Encode(nil, typ, v)
		if err != nil {
			t.Fatal(err)
		}
		y, err := Decode(typ, data, len(v))
		if err != nil {
			t.Fatal(err)
		}
		var num, den float64
		for i := range v {
			d := float64(v[i] - y[i])
			num, den = num+d*d, den+float64(v[i])*float64(v[i])
		}
		worst = max(worst, math.Sqrt(num/den))
		copy(v, y)
	}
	c := m.Config
	round(m.Embed, ft.tensorType(trainer.WeightTensor{Role: trainer.RoleEmbed, Layer: -1, Shape: []int{c.VocabSize, c.Hidden}}, c.Layers))
	for i, l := range m.Layers {
		for mod, p := range l.Proj {
			round(p.W, ft.tensorType(trainer.WeightTensor{Role: string(mod), Layer: i, Shape: []int{p.Out, p.In}}, c.Layers))
		}
	}
	return worst
}

// relError is ‖a − b‖/‖b‖ over all logits of all prompts, and the share of
// positions whose most likely token is the same.
func relError(a, b [][]float32, vocab int) (rel, argmaxAgree float64) {
	var num, den float64
	same, n := 0, 0
	for p := range a {
		for i := range a[p] {
			d := float64(a[p][i] - b[p][i])
			num += d * d
			den += float64(b[p][i]) * float64(b[p][i])
		}
		for s := 0; s < len(a[p])/vocab; s++ {
			if trainer.Argmax(a[p][s*vocab:(s+1)*vocab]) == trainer.Argmax(b[p][s*vocab:(s+1)*vocab]) {
				same++
			}
			n++
		}
	}
	return math.Sqrt(num / den), float64(same) / float64(n)
}

// activationRounding is the relative error llama.cpp's CPU matrix
// products put on their inputs for a file of each type: with float16
// weights the activations are rounded to float16, with bfloat16 weights to
// bfloat16, with quantised weights they are quantised to q8_0 blocks (q8_K
// for the k-quants: an error up to max|x|/254 per element, about 2⁻⁷ of a
// block's RMS). Its GELU reads its input through a float16 table, so
// nothing is finer than float16's 2⁻¹¹, not even a float32 file.
func activationRounding(ft FileType) float64 {
	switch ft {
	case AllF32, MostlyF16:
		return 0x1p-11
	case MostlyBF16:
		return 0x1p-8
	}
	return 0x1p-7
}

// checkLogits converts the preset's random checkpoint to each type and
// holds llama.cpp's logits on demo prompts to two bounds. Each layer feeds
// about seven rounded inputs to matrix products (q, k, v, o, gate, up,
// down); if each adds a relative error of at most u and the errors are
// independent (they add in quadrature) and the normalised residual stream
// does not amplify them, the logits' relative error stays below √(7L)·u.
// Against our CPU reference computing with the weights as stored, u is the
// activation rounding; against the checkpoint itself, u also holds the
// weights' own storage error, measured on the matrices.
func checkLogits(t *testing.T, preset string, n int, types ...FileType) {
	dir := checkpoint(t, preset)
	tok, err := tokenizer.LoadFile(filepath.Join(dir, "tokenizer.json"))
	if err != nil {
		t.Fatal(err)
	}
	ps := prompts(t, tok, n)
	for _, typ := range types {
		t.Run(typ.String(), func(t *testing.T) {
			m, err := trainer.LoadModel(dir)
			if err != nil {
				t.Fatal(err)
			}
			// llama.cpp scales embeddings by √hidden in float32; transformers,
			// whom the reference follows elsewhere, rounds the factor to the
			// checkpoint's bfloat16 (33.94 → 34.0 for the 1B).
			m.Config.DType = "float32"
			v := m.Config.VocabSize
			checkpointLogits := referenceLogits(t, m, ps, nil)
			weightErr := asStored(t, m, typ)
			storedLogits := referenceLogits(t, m, ps, nil)
			got := llamaLogits(t, convert(t, dir, typ), ps, v)

			layers := math.Sqrt(7 * float64(m.Config.Layers))
			u := activationRounding(typ)
			rel, agree := relError(got, storedLogits, v)
			relCk, agreeCk := relError(got, checkpointLogits, v)
			t.Logf("%s %s: vs the stored weights: relative error %.3g (bound %.3g), same argmax %.0f%%; "+
				"vs the checkpoint: %.3g (bound %.3g, weights stored with error %.3g), same argmax %.0f%%",
				preset, typ, rel, layers*u, 100*agree, relCk, layers*(u+weightErr), weightErr, 100*agreeCk)
			if rel > layers*u {
				t.Errorf("logits differ from the reference on the stored weights by %.3g, above the bound %.3g", rel, layers*u)
			}
			if relCk > layers*(u+weightErr) {
				t.Errorf("logits differ from the checkpoint's by %.3g, above the bound %.3g", relCk, layers*(u+weightErr))
			}
		})
	}
}

// TestLlamaCppLogits: llama.cpp loads the converted tiny model in every
// type and its logits meet the bounds.
func TestLlamaCppLogits(t *testing.T) {
	testenv.LlamaOracle(t)
	checkLogits(t, "tiny", 40, AllF32, MostlyF16, MostlyBF16, MostlyQ8_0, MostlyQ4_0, MostlyQ4_K_M, MostlyQ5_K_M)
}

// TestLlamaCppLogits1B: the same at the 1B shape (a 2 GB random
// checkpoint), in q8_0.
func TestLlamaCppLogits1B(t *testing.T) {
	testenv.LlamaOracle(t)
	if testing.Short() {
		t.Skip("writes and converts a 1B checkpoint")
	}
	checkLogits(t, "1b", 24, MostlyQ8_0)
}

// TestLlamaCppTokenizer: llama.cpp's tokenizer, reading the vocabulary,
// token types and merge scores of our file, gives our ids on a sample of
// the Turkish corpus: the records as the chat template renders them
// (special tokens included) and their raw answers.
func TestLlamaCppTokenizer(t *testing.T) {
	testenv.LlamaOracle(t)
	dir := checkpoint(t, "tiny")
	tok, err := tokenizer.LoadFile(filepath.Join(dir, "tokenizer.json"))
	if err != nil {
		t.Fatal(err)
	}
	var texts []string
	for i, r := range testenv.AlpacaRecords(t) {
		if i%40 != 0 {
			continue
		}
		text, _, err := chat.RenderGemma3(chat.Alpaca(r.Instruction, r.Input, r.Output, "Sen yardımsever bir asistansın."))
		if err != nil {
			t.Fatal(err)
		}
		texts = append(texts, text, r.Output)
	}
	texts = append(texts, "  iki  boşluk\n\n\nüç satır\t sekme <b>kalın</b> <unused3> 🙂 ünİcode ǅ", "")
	var in bytes.Buffer
	for _, s := range texts {
		json.NewEncoder(&in).Encode(map[string]string{"text": s})
	}
	got := jsonLines[struct {
		IDs  []int32
		Text string
	}](t, oracle(t, in.Bytes(), "tokenize", convert(t, dir, MostlyQ8_0)))
	if len(got) != len(texts) {
		t.Fatalf("%d results for %d texts", len(got), len(texts))
	}
	tokens, bad := 0, 0
	for i, s := range texts {
		want := tok.EncodeIDs(s, false)
		tokens += len(want)
		if fmt.Sprint(got[i].IDs) != fmt.Sprint(want) {
			if bad++; bad <= 3 {
				t.Errorf("text %d %.80q:\nllama.cpp %v\nours      %v", i, s, got[i].IDs, want)
			}
		}
		// And back: runs of spaces (Gemma's user-defined tokens) as spaces.
		if got[i].Text != s {
			t.Errorf("text %d detokenized by llama.cpp:\n got %.120q\nwant %.120q", i, got[i].Text, s)
		}
	}
	t.Logf("%d texts, %d tokens, %d differ", len(texts), tokens, bad)
}

// TestLlamaCppChatTemplate: node-llama-cpp formats a two-turn conversation
// with the template the file carries exactly as our chat template renders
// it, to the text and to the token ids: ready for the next answer after a
// user turn, and up to the last answer (which it leaves open) after a model
// turn. (node-llama-cpp splices message text into the rendered template
// as it is, so the template's trim of each message does not happen there;
// the conversation's messages carry no outer white space.)
func TestLlamaCppChatTemplate(t *testing.T) {
	testenv.LlamaOracle(t)
	dir := checkpoint(t, "tiny")
	tok, err := tokenizer.LoadFile(filepath.Join(dir, "tokenizer.json"))
	if err != nil {
		t.Fatal(err)
	}
	conv := []chat.Message{
		{Role: "system", Content: "Sen yardımsever bir Türkçe asistansın."},
		{Role: "user", Content: "Merhaba! Bugün hava nasıl?"},
		{Role: "assistant", Content: "Merhaba, bugün İstanbul'da hava güneşli ve ılık.\n\nBaşka bir sorunuz var mı?"},
		{Role: "user", Content: "Ankara'da da öyle mi?"},
		{Role: "assistant", Content: "Ankara'da bugün bulutlu."},
	}
	prompt, _, err := chat.RenderGemma3Prompt(conv[:4])
	if err != nil {
		t.Fatal(err)
	}
	full, _, err := chat.RenderGemma3(conv)
	if err != nil {
		t.Fatal(err)
	}
	var in bytes.Buffer
	json.NewEncoder(&in).Encode(map[string]any{"messages": conv[:4]})
	json.NewEncoder(&in).Encode(map[string]any{"messages": conv})
	got := jsonLines[struct {
		Text string
		IDs  []int32
	}](t, oracle(t, in.Bytes(), "chat", convert(t, dir, MostlyQ8_0)))
	if len(got) != 2 {
		t.Fatalf("%d results", len(got))
	}
	open := strings.TrimSuffix(full, "<end_of_turn>\n")
	for i, want := range []string{prompt, open} {
		if got[i].Text != want {
			t.Errorf("conversation %d:\nllama.cpp %q\nours      %q", i, got[i].Text, want)
		}
		if ids := tok.EncodeIDs(want, false); fmt.Sprint(got[i].IDs) != fmt.Sprint(ids) {
			t.Errorf("conversation %d: llama.cpp evaluates %v, our template and tokenizer give %v", i, got[i].IDs, ids)
		}
	}
}

// TestVocabularyMustMatchTheEmbedding: a tokenizer with text tokens past
// the embedding's rows is refused (the file used to carry the vocabulary
// cut to the rows); Gemma 3's <image_soft_token>, one special token past
// the 1B's rows, is not.
func TestVocabularyMustMatchTheEmbedding(t *testing.T) {
	dir := checkpoint(t, "tiny")
	c, err := trainer.LoadConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	for rows, refused := range map[int]bool{1000: true, 262144: false} {
		if _, err := vocabulary(dir, rows); refused != (err != nil && strings.Contains(err.Error(), "tokenizer and model do not match")) {
			t.Errorf("%d rows (the model has %d): %v", rows, c.VocabSize, err)
		}
	}
}

// TestGemma3Canceled: a conversion whose context is canceled stops and
// leaves neither the file nor a temporary one.
func TestGemma3Canceled(t *testing.T) {
	dir := checkpoint(t, "tiny")
	outDir := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := Gemma3(ctx, dir, filepath.Join(outDir, "m.q8_0.gguf"), Options{Type: MostlyQ8_0}); !errors.Is(err, context.Canceled) {
		t.Fatalf("canceled conversion: %v", err)
	}
	if ents, _ := os.ReadDir(outDir); len(ents) != 0 {
		t.Errorf("left %v", ents)
	}
}

// TestGemma3Progress: the conversion says after each tensor how many of
// how many are written, ending with all of them, as many as the file has;
// canceled midway, it stops there.
func TestGemma3Progress(t *testing.T) {
	dir := checkpoint(t, "tiny")
	var seen [][2]int
	out := filepath.Join(t.TempDir(), "m.q8_0.gguf")
	if err := Gemma3(context.Background(), dir, out, Options{Type: MostlyQ8_0, Progress: func(done, total int) { seen = append(seen, [2]int{done, total}) }}); err != nil {
		t.Fatal(err)
	}
	head := make([]byte, 16) // magic, version, then the tensor count
	f, err := os.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	_, err = io.ReadFull(f, head)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	n := int(binary.LittleEndian.Uint64(head[8:]))
	if len(seen) != n || seen[0] != [2]int{1, n} || seen[n-1] != [2]int{n, n} {
		t.Errorf("progress %v for %d tensors", seen, n)
	}
	ctx, cancel := context.WithCancel(context.Background())
	calls := 0
	err = Gemma3(ctx, dir, filepath.Join(t.TempDir(), "m.gguf"), Options{Type: MostlyQ8_0, Progress: func(done, _ int) {
		if calls++; done == 3 {
			cancel()
		}
	}})
	if !errors.Is(err, context.Canceled) || calls != 3 {
		t.Errorf("canceled after 3 tensors: %d more heard, %v", calls-3, err)
	}
}
