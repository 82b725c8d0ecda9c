package gpu

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"gemmaft/cuda"
	"gemmaft/cuda/cudatest"
	"gemmaft/trainer"
	"gemmaft/trainer/gpu/kernels"
)

// TestGreedyDecodingOnGPU: in the float32 test mode, the GPU decoder (its
// caches, the ring of sliding layers, prompts longer than the window)
// gives transformers' greedy tokens, every one, on the parity cases with
// and without their adapters: the goldens TestGreedyDecodingMatchesTransformers
// holds the CPU reference to. In bf16 it reports how far it follows them.
func TestGreedyDecodingOnGPU(t *testing.T) {
	cudatest.Device(t)
	for _, precision := range []string{"fp32", "bf16"} {
		for _, c := range []string{"t5_gqa", "orig_mqa", "mm_f32", "trained_qlora", "rslora_gqa"} {
			for _, file := range []string{"generate.json", "generate_adapter.json"} {
				t.Run(precision+"/"+c+"/"+file, func(t *testing.T) {
					g := readGenerateGolden(t, c, file)
					cfg := trainer.DecoderConfig{Model: filepath.Join(refDir, c, "model")}
					if g.Adapter {
						cfg.Adapter = filepath.Join(refDir, c, "adapter")
					}
					d, err := openDecoder(context.Background(), cfg, precision)
					if err != nil {
						t.Fatal(err)
					}
					defer d.Close()
					// All prompts at once: each sequence's tokens are its own.
					got, err := d.Generate(context.Background(), g.Prompts, trainer.GenerateOptions{MaxNewTokens: g.MaxNewTokens, Stop: g.Stop}, nil)
					if err != nil {
						t.Fatal(err)
					}
					same := 0
					for i := range g.Prompts {
						n := 0
						for n < min(len(got[i]), len(g.Outputs[i])) && got[i][n] == g.Outputs[i][n] {
							n++
						}
						same += n
						if precision == "fp32" && fmt.Sprint(got[i]) != fmt.Sprint(g.Outputs[i]) {
							t.Errorf("prompt %d (%d tokens): first difference at new token %d:\n GPU %v\n HF  %v", i, len(g.Prompts[i]), n, got[i], g.Outputs[i])
						}
					}
					t.Logf("%s: %d of %d new tokens as transformers decodes them before the first difference", precision, same, len(g.Prompts)*g.MaxNewTokens)
				})
			}
		}
	}
}

// generateGolden is a parity case's greedy decoding by transformers
// (scripts/reference/generate_golden.py), with or without the case's adapter.
type generateGolden struct {
	Adapter      bool      `json:"adapter"`
	MaxNewTokens int       `json:"max_new_tokens"`
	Stop         []int32   `json:"stop"`
	Prompts      [][]int32 `json:"prompts"`
	Outputs      [][]int32 `json:"outputs"`
}

func readGenerateGolden(t *testing.T, c, file string) generateGolden {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(refDir, "golden", c, file))
	if err != nil {
		t.Fatal(err)
	}
	var g generateGolden
	if err := json.Unmarshal(data, &g); err != nil {
		t.Fatal(err)
	}
	return g
}

// TestNF4DecodingOnGPU: through the NF4 round trip (the base a QLoRA
// adapter was trained against), the GPU decoder in its float32 test mode
// gives the CPU reference's greedy tokens, every one, with the weights
// also stored dequantised (where the device has the room, as decoders do)
// and dequantised at every step (where it has not); steps of a few
// sequences read the NF4 form directly either way.
func TestNF4DecodingOnGPU(t *testing.T) {
	cudatest.Device(t)
	for _, c := range []string{"t5_gqa", "trained_qlora"} {
		g := readGenerateGolden(t, c, "generate_adapter.json")
		cfg := trainer.DecoderConfig{Model: filepath.Join(refDir, c, "model"), Adapter: filepath.Join(refDir, c, "adapter"), Quantize: "nf4"}
		o := trainer.GenerateOptions{MaxNewTokens: g.MaxNewTokens, Stop: g.Stop}
		cpu, err := trainer.OpenDecoder(cfg)
		if err != nil {
			t.Fatal(err)
		}
		want, err := cpu.Generate(context.Background(), g.Prompts, o, nil)
		cpu.Close()
		if err != nil {
			t.Fatal(err)
		}
		for _, dense := range []bool{true, false} {
			t.Run(fmt.Sprintf("%s/dense=%v", c, dense), func(t *testing.T) {
				if !dense {
					defer func(m int64) { densifyMargin = m }(densifyMargin)
					densifyMargin = 1 << 62 // no room: NF4 at every step
				}
				d, err := openDecoder(context.Background(), cfg, "fp32")
				if err != nil {
					t.Fatal(err)
				}
				defer d.Close()
				if nf4 := d.(*decoder).ReadsNF4(len(g.Prompts)); nf4 == dense {
					t.Fatalf("a step of %d sequences reads NF4 weights: %v, want %v", len(g.Prompts), nf4, !dense)
				}
				got, err := d.Generate(context.Background(), g.Prompts, o, nil)
				if err != nil {
					t.Fatal(err)
				}
				if fmt.Sprint(got) != fmt.Sprint(want) {
					t.Errorf("GPU tokens differ from the CPU reference's:\n GPU %v\n CPU %v", got, want)
				}
				// Three sequences: the steps after the prefill read the NF4
				// form directly, whether or not the weights are also dense.
				few := g.Prompts[:3]
				if ss := d.(*decoder).s; !ss.nf4GEMV(len(few), &ss.w.layers[0].proj[0]) {
					t.Fatalf("a step of %d sequences does not read the NF4 form", len(few))
				}
				if got, err = d.Generate(context.Background(), few, o, nil); err != nil {
					t.Fatal(err)
				}
				if fmt.Sprint(got) != fmt.Sprint(want[:3]) {
					t.Errorf("GPU tokens of three sequences differ from the CPU reference's:\n GPU %v\n CPU %v", got, want[:3])
				}
			})
		}
	}
}

// TestDecodeBatch: a prefill of two prompts and a later step laid out as
// the session and the cache kernels read them.
func TestDecodeBatch(t *testing.T) {
	const I = trainer.IgnoreIndex
	b, seq, from := decodeBatch([]int32{2, 5, 6, 7, 8, 2, 9}, []int32{0, 1, 2, 3, 4, 0, 1}, []int{0, 0, 0, 0, 0, 1, 1}, 3)
	for _, c := range []struct {
		what      string
		got, want []int32
	}{
		{"segment starts", b.SegStart, []int32{0, 0, 0, 0, 0, 5, 5}},
		{"targets", b.Targets, []int32{I, I, I, I, 0, I, 0}},
		{"sequences", seq, []int32{0, 0, 0, 0, 0, 1, 1}},
		{"first kept positions", from, []int32{2, 2, 2, 2, 2, 0, 0}},
	} {
		if fmt.Sprint(c.got) != fmt.Sprint(c.want) {
			t.Errorf("prefill %s: %v, want %v", c.what, c.got, c.want)
		}
	}
	b, seq, from = decodeBatch([]int32{11, 12}, []int32{5, 2}, []int{0, 1}, 3)
	if fmt.Sprint(b.SegStart, b.Targets, seq, from) != fmt.Sprint([]int32{0, 1}, []int32{0, 0}, []int32{0, 1}, []int32{3, 0}) {
		t.Errorf("decode step: %v %v %v %v", b.SegStart, b.Targets, seq, from)
	}
}

// TestTeacherForcedBF16: at the 1B shape in bfloat16, the decoder's logits
// at each step of a teacher-forced continuation (a prefill, then one token
// a step through the caches, past the sliding window) are as close to
// transformers' float32 logits as transformers' own bfloat16 ones are.
// scripts/reference/bf16_logits.py writes the references into
// GEMMAFT_BF16_LOGITS for the checkpoint and adapter in GEMMAFT_PEFT_OUT
// (TestAdapterForPEFT's).
func TestTeacherForcedBF16(t *testing.T) {
	refs, out := os.Getenv("GEMMAFT_BF16_LOGITS"), os.Getenv("GEMMAFT_PEFT_OUT")
	if refs == "" || out == "" {
		t.Skip("GEMMAFT_BF16_LOGITS and GEMMAFT_PEFT_OUT not set")
	}
	cudatest.Device(t)
	var tok struct{ Prompts, Continuations [][]int32 }
	data, err := os.ReadFile(filepath.Join(refs, "tokens.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(data, &tok); err != nil {
		t.Fatal(err)
	}
	d, err := openDecoder(context.Background(), trainer.DecoderConfig{Model: filepath.Join(out, "model"),
		Adapter: filepath.Join(out, "adapter")}, "bf16")
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	V := d.Info().Config.VocabSize
	S, N := len(tok.Prompts), len(tok.Continuations[0])
	ours := teacherForced(t, d.(*decoder), tok.Prompts, tok.Continuations)
	read := func(name string) []float32 {
		b, err := os.ReadFile(filepath.Join(refs, name))
		if err != nil {
			t.Fatal(err)
		}
		if len(b) != 4*len(ours) {
			t.Fatalf("%s: %d bytes, want %d", name, len(b), 4*len(ours))
		}
		v := make([]float32, len(ours))
		for i := range v {
			v[i] = math.Float32frombits(binary.LittleEndian.Uint32(b[4*i:]))
		}
		return v
	}
	ref, hf := read("fp32.f32"), read("bf16.f32")
	ow, om, oa := logitsDistance(ours, ref, V)
	hw, hm, ha := logitsDistance(hf, ref, V)
	t.Logf("%d positions against transformers' float32: ours worst %.3g, mean %.3g, argmax agreement %.3f; transformers' bf16 worst %.3g, mean %.3g, agreement %.3f",
		S*N, ow, om, oa, hw, hm, ha)
	if ow > 1.5*hw || om > 1.5*hm || oa < ha-0.05 {
		t.Errorf("the GPU decoder's bf16 logits are further from float32 than transformers' bf16 logits are")
	}
}

// logitsDistance compares got with ref, rows of v logits each: the worst
// and the mean over the rows of the RMS of the difference over the RMS of
// the reference, and the share of rows whose most likely token is the
// same.
func logitsDistance(got, ref []float32, v int) (worst, mean, agree float64) {
	rows := len(ref) / v
	for p := range rows {
		g, r := got[p*v:(p+1)*v], ref[p*v:(p+1)*v]
		var dd, rr float64
		for i := range r {
			e := float64(g[i]) - float64(r[i])
			dd, rr = dd+e*e, rr+float64(r[i])*float64(r[i])
		}
		rel := math.Sqrt(dd / rr)
		worst, mean = max(worst, rel), mean+rel/float64(rows)
		if trainer.Argmax(g) == trainer.Argmax(r) {
			agree += 1 / float64(rows)
		}
	}
	return worst, mean, agree
}

// teacherForced runs the prompts through d, then feeds each sequence its
// continuation a token a step, and returns the logits of every step,
// [sequence][step][vocabulary], as the reference scripts write them.
func teacherForced(t *testing.T, d *decoder, prompts, continuations [][]int32) []float32 {
	t.Helper()
	V := d.Info().Config.VocabSize
	S, N := len(prompts), len(continuations[0])
	out := make([]float32, S*N*V)
	forceSteps(t, d, prompts, continuations, trainer.StepWant{}, func(n int, res trainer.StepResult) {
		for s := range S {
			copy(out[(s*N+n)*V:], res.Logits[s])
		}
	})
	return out
}

// forceSteps runs the prompts through d, then feeds each sequence its
// continuation a token a step (its last token never), asking each step
// for want, and hands step n's result to got.
func forceSteps(t *testing.T, d *decoder, prompts, continuations [][]int32, want trainer.StepWant, got func(n int, res trainer.StepResult)) {
	t.Helper()
	N := len(continuations[0])
	err := d.withCaches(prompts, N, 0, func(step trainer.DecodeStep) error {
		var ids, pos []int32
		var seqOf []int
		for s, p := range prompts {
			for j, id := range p {
				ids, pos, seqOf = append(ids, id), append(pos, int32(j)), append(seqOf, s)
			}
		}
		for n := 0; n < N; n++ {
			res, err := step(ids, pos, seqOf, want)
			if err != nil {
				return err
			}
			got(n, res)
			ids, pos, seqOf = nil, nil, nil
			for s := range prompts {
				ids = append(ids, continuations[s][n])
				pos, seqOf = append(pos, int32(len(prompts[s])+n)), append(seqOf, s)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// randomTokens draws n token ids below vocab from rng at each call.
func randomTokens(rng *rand.Rand, vocab int) func(n int) []int32 {
	return func(n int) []int32 {
		ids := make([]int32, n)
		for i := range ids {
			ids[i] = int32(rng.IntN(vocab))
		}
		return ids
	}
}

// TestTokenKernelOnGPU: decoding steps of one token as decode_token (the
// default; the test sets it explicitly). In the float32 test mode, each parity case's
// base model decodes each prompt alone (every step after the prompt one
// token) to transformers' greedy tokens, every one, through sliding rings
// shorter than the prompts. In bf16 at the 1B, 12B and 27B shapes (random
// weights; head dimension 256 with one and eight key/value heads, 128 with
// sixteen), dense and NF4, decode_token's logits are as close to float32's
// as the launch-per-operation steps' are (compareTokenKernel).
func TestTokenKernelOnGPU(t *testing.T) {
	cudatest.Device(t)
	t.Setenv(TokenKernelEnv, "on")
	for _, c := range []string{"t5_gqa", "orig_mqa", "mm_f32", "trained_qlora", "rslora_gqa"} {
		for _, file := range []string{"generate.json", "generate_adapter.json"} {
			t.Run("fp32/"+c+"/"+file, func(t *testing.T) {
				g := readGenerateGolden(t, c, file)
				cfg := trainer.DecoderConfig{Model: filepath.Join(refDir, c, "model")}
				if g.Adapter {
					cfg.Adapter = filepath.Join(refDir, c, "adapter")
				}
				d, err := openDecoder(context.Background(), cfg, "fp32")
				if err != nil {
					t.Fatal(err)
				}
				defer d.Close()
				for i, p := range g.Prompts {
					got, err := d.Generate(context.Background(), [][]int32{p}, trainer.GenerateOptions{MaxNewTokens: g.MaxNewTokens, Stop: g.Stop}, nil)
					if err != nil {
						t.Fatal(err)
					}
					if fmt.Sprint(got[0]) != fmt.Sprint(g.Outputs[i]) {
						t.Errorf("prompt %d (%d tokens):\n GPU %v\n HF  %v", i, len(p), got[0], g.Outputs[i])
					}
				}
				if n := d.(*decoder).TokenKernelSteps(); n == 0 {
					t.Fatalf("no step ran as decode_token")
				}
			})
		}
	}
	// 27B is the one head dimension of 128, decode_token's other build;
	// eight of its 62 layers (one global) keep the float32 model small.
	for _, shape := range []struct {
		preset string
		layers int // 0: all
	}{{"1b", 0}, {"12b", 0}, {"27b", 8}} {
		for _, quantize := range []string{"none", "nf4"} {
			for _, adapter := range []bool{false, true} {
				name := "bf16/" + shape.preset + "/" + quantize
				if adapter {
					name += "/adapter"
				}
				t.Run(name, func(t *testing.T) {
					if testing.Short() && shape.preset != "1b" {
						t.Skip("-short: the 1B shape only")
					}
					mc, err := trainer.Preset(shape.preset)
					if err != nil {
						t.Fatal(err)
					}
					if shape.layers > 0 {
						mc.Layers, mc.LayerTypes = shape.layers, mc.LayerTypes[:shape.layers]
					}
					compareTokenKernel(t, mc, quantize, adapter)
				})
			}
		}
	}
}

// TestTokenStepsQueuedAhead: a greedy step of one token queues the next
// position's step with its own pick as the token; fed another token
// instead, the decoder waits for that step and runs the token's own,
// which rewrites the cache rows the queued one wrote. Teacher-forced with
// random tokens at the 1B shape (nearly every queued step the wrong one),
// the picks must equal the argmax of the same steps' logits, which
// queue nothing.
func TestTokenStepsQueuedAhead(t *testing.T) {
	cudatest.Device(t)
	t.Setenv(TokenKernelEnv, "on")
	mc, err := trainer.Preset("1b")
	if err != nil {
		t.Fatal(err)
	}
	d, err := openRandomDecoder(context.Background(), mc, 1, "none", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	g := d.(*decoder)
	draw := randomTokens(rand.New(rand.NewPCG(5, 6)), mc.VocabSize)
	prompts, continuations := [][]int32{draw(40)}, [][]int32{draw(24)}
	forced := func(want trainer.StepWant) []int32 {
		var picks []int32
		forceSteps(t, g, prompts, continuations, want, func(_ int, res trainer.StepResult) {
			if want.Greedy {
				picks = append(picks, res.Best[0])
			} else {
				picks = append(picks, int32(trainer.Argmax(res.Logits[0])))
			}
		})
		return picks
	}
	greedy := forced(trainer.StepWant{Greedy: true})
	if g.aheadMissed == 0 {
		t.Fatal("no step was queued ahead and then passed over")
	}
	ref := forced(trainer.StepWant{})
	if fmt.Sprint(greedy) != fmt.Sprint(ref) {
		t.Errorf("picks with steps queued ahead\n %v\nthe logits' argmax without\n %v", greedy, ref)
	}
	t.Logf("%d picks equal; %d steps queued ahead were passed over", len(ref), g.aheadMissed)
}

// randomAdapter is an adapter of rank 16 for mc with B drawn too (PEFT
// starts it at zero, which would leave the updates out of a comparison),
// on every projection but gate, so that the kernels also meet one
// without; the same every call (B is filled in module order, not the
// adapter's map order).
func randomAdapter(t *testing.T, mc *trainer.Config) *trainer.Adapter {
	t.Helper()
	lc := trainer.LoRAConfig{R: 16, Alpha: 32, Targets: []trainer.Module{trainer.QProj, trainer.KProj, trainer.VProj, trainer.OProj, trainer.UpProj, trainer.DownProj}}
	a, err := trainer.NewAdapter(mc, lc, 7)
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(7, 8))
	for _, mods := range a.Layers {
		for _, m := range trainer.AllModules {
			if w, ok := mods[m]; ok {
				for i := range w.B {
					w.B[i] = float32(rng.NormFloat64() * 0.02)
				}
			}
		}
	}
	return a
}

// TestSampledDecodingOnGPU: sampling from the top k with the candidates
// each step hands over (kernels.TopCandidates) draws the very tokens that
// sampling from every logit draws, on the same decoder. At the 1B shape
// (Gemma's vocabulary, bf16): one sequence (steps of one token through
// decode_token) and three (a step per batch); on a parity case's model in
// float32 (a vocabulary of 128 in 4 chunks): k up to the chunks and past
// them, where the step hands over the logits.
func TestSampledDecodingOnGPU(t *testing.T) {
	cudatest.Device(t)
	mc, err := trainer.Preset("1b")
	if err != nil {
		t.Fatal(err)
	}
	d, err := openRandomDecoder(context.Background(), mc, 5, "none", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	draw := randomTokens(rand.New(rand.NewPCG(5, 6)), mc.VocabSize)
	for _, prompts := range [][][]int32{{draw(40)}, {draw(30), draw(7), draw(52)}} {
		for _, o := range []trainer.GenerateOptions{
			{Temperature: 1, TopK: 64, TopP: 0.95}, {Temperature: 0.7, TopK: 5}, {Temperature: 1.5, TopK: 200, TopP: 0.9},
		} {
			o.MaxNewTokens, o.Seed = 24, 9
			compareSampling(t, d.(*decoder), prompts, o, true)
		}
	}
	tiny, err := openDecoder(context.Background(), trainer.DecoderConfig{Model: filepath.Join(refDir, "t5_gqa", "model")}, "fp32")
	if err != nil {
		t.Fatal(err)
	}
	defer tiny.Close()
	ps := [][]int32{{2, 17, 40, 9}, {2, 5}}
	for _, k := range []int{1, 3, 4, 5, 0} {
		compareSampling(t, tiny.(*decoder), ps, trainer.GenerateOptions{MaxNewTokens: 16, Temperature: 2, TopK: k, Seed: 3}, k > 0 && k <= 4)
	}
}

// compareSampling decodes prompts with o twice on g, its sampling steps
// handing over candidates, then every logit, and fails unless both drew
// the same tokens and (with candidates set) candidates were handed over.
func compareSampling(t *testing.T, g *decoder, prompts [][]int32, o trainer.GenerateOptions, candidates bool) {
	t.Helper()
	before := g.candidateSteps
	got, err := g.Generate(context.Background(), prompts, o, nil)
	if err != nil {
		t.Fatal(err)
	}
	steps := g.candidateSteps - before
	g.wholeLogits = true
	want, err := g.Generate(context.Background(), prompts, o, nil)
	g.wholeLogits = false
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("%d prompts, %+v: candidates drew\n %v\nthe logits\n %v", len(prompts), o, got, want)
	}
	if candidates != (steps > 0) {
		t.Errorf("%d prompts, %+v: %d steps handed over candidates", len(prompts), o, steps)
	}
}

// compareTokenKernel decodes a random model of shape mc with the
// base weights in form quantize (with "nf4", steps of one token read that
// form), and with adapter a random adapter (decode_token_lora),
// teacher-forced for 48 steps after a 600-token prompt (past the
// 512-token window): in float32 for the reference, then in bfloat16 with
// decode_token and without. decode_token's logits must be as close to the
// float32 ones as the launch-per-operation steps' are (as in
// TestTeacherForcedBF16): the two bfloat16 paths round the same values
// but sum in other orders, so either is as far from the other as from
// float32.
func compareTokenKernel(t *testing.T, mc *trainer.Config, quantize string, adapter bool) {
	draw := randomTokens(rand.New(rand.NewPCG(3, 4)), mc.VocabSize)
	prompts, continuations := [][]int32{draw(600)}, [][]int32{draw(48)}
	run := func(precision string, kernel ...string) [][]float32 {
		var a *trainer.Adapter
		if adapter {
			a = randomAdapter(t, mc)
		}
		d, err := openRandomDecoder(context.Background(), mc, 1, quantize, precision, a)
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		dec := d.(*decoder)
		var out [][]float32
		for _, k := range kernel {
			t.Setenv(TokenKernelEnv, k)
			out = append(out, teacherForced(t, dec, prompts, continuations))
		}
		if kernel[0] == "on" && dec.TokenKernelSteps() == 0 {
			t.Fatalf("no step ran as decode_token")
		}
		return out
	}
	ref := run("fp32", "off")[0]
	bf16 := run("", "on", "off")
	N := len(continuations[0])
	ow, om, oa := logitsDistance(bf16[0], ref, mc.VocabSize)
	pw, pm, pa := logitsDistance(bf16[1], ref, mc.VocabSize)
	t.Logf("%d steps against float32: decode_token worst relative RMS %.3g, mean %.3g, argmax agreement %.3f; launch per operation %.3g, %.3g, %.3f",
		N, ow, om, oa, pw, pm, pa)
	// The argmax agreements are shares of N steps, each a near tie or not
	// as the random weights fall: the allowance is two standard errors of
	// the difference of two such shares. At 200 positions and agreement
	// 0.95 that is 0.044, about TestTeacherForcedBF16's 0.05; at 48 steps
	// it is about four steps.
	p := (oa + pa) / 2
	allow := max(2*math.Sqrt(2*p*(1-p)/float64(N)), 1/float64(N))
	if ow > 1.5*pw || om > 1.5*pm || oa < pa-allow {
		t.Errorf("decode_token's bf16 logits are further from float32 than the launch-per-operation steps' are (argmax allowance %.3f)", allow)
	}
}

// TestNF4ProductChoice: only a session that infers reads NF4 weights
// directly, for the few tokens of a decoding step and rows the kernel
// takes; a training session's forward pass keeps the dequantised GEMM its
// backward pass mirrors.
func TestNF4ProductChoice(t *testing.T) {
	nf4 := projection{out: 4096, in: 3840, nf4: true}
	for _, c := range []struct {
		what      string
		inference bool
		p         projection
		tokens    int
		want      bool
	}{
		{"decoding step of one", true, nf4, 1, true},
		{"decoding step of eight", true, nf4, NF4StepTokens, true},
		{"decoding step of nine", true, nf4, NF4StepTokens + 1, false},
		{"training forward pass", false, nf4, 1, false},
		{"dense weights", true, projection{out: 4096, in: 3840}, 1, false},
		{"rows of 48", true, projection{out: 32, in: 48, nf4: true}, 1, false},
	} {
		s := &session{cfg: trainer.SessionConfig{Inference: c.inference}}
		if got := s.nf4GEMV(c.tokens, &c.p); got != c.want {
			t.Errorf("%s: reads NF4 directly %v, want %v", c.what, got, c.want)
		}
	}
}

// TestDenseProductChoice: which products from dense weights run as the
// decoding product of our own (kernels.GEMV) instead of a cuBLAS GEMM:
// the few tokens of a bfloat16 inference step, rows of whole 32s, weights
// stored dense (not dequantised for the step). A
// training pass keeps the GEMM its backward pass mirrors, and the float32
// test mode keeps cuBLAS's exact float32 products.
func TestDenseProductChoice(t *testing.T) {
	dense := projection{out: 4096, in: 3840, dense: cuda.Buffer{Ptr: 1 << 20, Size: 2 * 4096 * 3840}}
	for _, c := range []struct {
		what      string
		inference bool
		prec      kernels.Precision
		p         projection
		tokens    int
		want      bool
	}{
		{"decoding step of one", true, kernels.BF16, dense, 1, true},
		{"decoding step of eight", true, kernels.BF16, dense, NF4StepTokens, true},
		{"decoding step of nine", true, kernels.BF16, dense, NF4StepTokens + 1, false},
		{"training forward pass", false, kernels.BF16, dense, 1, false},
		{"float32 test mode", true, kernels.F32, dense, 1, false},
		{"rows of 48", true, kernels.BF16, projection{out: 32, in: 48, dense: dense.dense}, 1, false},
		{"NF4 weights without a dense copy", true, kernels.BF16, projection{out: 4096, in: 3840, nf4: true}, 1, false},
	} {
		s := &session{cfg: trainer.SessionConfig{Inference: c.inference}, k: &kernels.Kernels{Prec: c.prec}}
		if got := s.denseGEMV(c.tokens, &c.p); got != c.want {
			t.Errorf("%s: our decoding product %v, want %v", c.what, got, c.want)
		}
	}
}

// TestTokenKernelChoice: decode_token takes a decoder without an adapter
// whose projections are all dense, or all NF4 as the steps of one token
// read them (in bf16); an adapter's products, a mix of the two, missing
// dense weights, NF4 in the float32 test mode and an offloading session
// keep the launch-per-operation steps, and the reason names what stands
// in the way.
func TestTokenKernelChoice(t *testing.T) {
	mc, err := trainer.Preset("1b")
	if err != nil {
		t.Fatal(err)
	}
	dense := cuda.Buffer{Ptr: 1 << 20, Size: 1 << 20}
	build := func(edit func(s *session)) *session {
		s := &session{
			dev:      &cuda.Device{Info: cuda.DeviceInfo{MaxSharedOptin: 227 << 10}},
			k:        &kernels.Kernels{Prec: kernels.BF16, HeadDim: mc.HeadDim},
			cfg:      trainer.SessionConfig{Inference: true, LoRA: placeholderLoRA},
			info:     trainer.ModelInfo{Config: mc},
			w:        &weights{layers: make([]layerWeights, mc.Layers)},
			baseOnly: true,
		}
		for l := range s.w.layers {
			for i := range s.w.layers[l].proj {
				s.w.layers[l].proj[i] = projection{out: 1152, in: 1152, dense: dense}
			}
		}
		if edit != nil {
			edit(s)
		}
		return s
	}
	allNF4 := func(s *session) {
		for l := range s.w.layers {
			for i := range s.w.layers[l].proj {
				s.w.layers[l].proj[i].nf4 = true
			}
		}
	}
	if sh, err := build(nil).tokenShape(256); err != nil || sh.NF4 {
		t.Errorf("a dense base without an adapter: NF4 %v, %v", sh.NF4, err)
	}
	if sh, err := build(allNF4).tokenShape(256); err != nil || !sh.NF4 || sh.LoRARank != 0 {
		t.Errorf("an NF4 base (with a dense copy beside it) without an adapter: NF4 %v, rank %d, %v", sh.NF4, sh.LoRARank, err)
	}
	withAdapter := func(s *session) {
		s.baseOnly = false
		s.cfg.LoRA = trainer.LoRAConfig{R: 16, Alpha: 32, Targets: trainer.AllModules}
	}
	if sh, err := build(withAdapter).tokenShape(256); err != nil || sh.LoRARank != 16 || sh.LoRAScale != 2 {
		t.Errorf("an adapter of rank 16, alpha 32: rank %d, scale %v, %v (decode_token_lora)", sh.LoRARank, sh.LoRAScale, err)
	}
	for _, c := range []struct {
		what, want string
		edit       func(s *session)
	}{
		{"one NF4 projection among dense ones", "neither", func(s *session) { s.w.layers[3].proj[5].nf4 = true }},
		{"no dense weights", "neither", func(s *session) { s.w.layers[0].proj[0].dense = cuda.Buffer{} }},
		{"NF4 in the float32 test mode", "bf16", func(s *session) { allNF4(s); s.k.Prec = kernels.F32 }},
		{"an offloading session", "offload", func(s *session) { s.off = &offloader{} }},
	} {
		_, err := build(c.edit).tokenShape(256)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want an error naming %q", c.what, err, c.want)
		}
	}
}

// TestLoRAFewChoice: which steps add their adapter's updates with
// kernels.LoRAFew rather than two GEMMs a projection: the few tokens of a
// step in a session that infers with an adapter, at a rank whose x·Aᵀ fits
// the kernel's shared memory. A training pass (and its dropout) keeps the
// GEMMs its backward pass reads x·Aᵀ from.
func TestLoRAFewChoice(t *testing.T) {
	drop := trainer.NewDropout(0.05, 1)
	for _, c := range []struct {
		what      string
		inference bool
		baseOnly  bool
		rank      int
		tokens    int
		d         *trainer.Dropout
		want      bool
	}{
		{"decoding step of one", true, false, 16, 1, nil, true},
		{"decoding step of sixteen", true, false, 16, kernels.LoRAFewTokens, nil, true},
		{"decoding step of seventeen", true, false, 16, kernels.LoRAFewTokens + 1, nil, false},
		{"a prompt's prefill", true, false, 16, 128, nil, false},
		{"rank 256", true, false, 256, kernels.LoRAFewTokens, nil, true},
		{"rank 512", true, false, 512, kernels.LoRAFewTokens, nil, false},
		{"no adapter", true, true, 1, 1, nil, false},
		{"training forward pass", false, false, 16, 8, nil, false},
		{"training with dropout", false, false, 16, 8, &drop, false},
	} {
		s := &session{cfg: trainer.SessionConfig{Inference: c.inference, LoRA: trainer.LoRAConfig{R: c.rank}}, baseOnly: c.baseOnly,
			ws: &workspace{loraPart: cuda.Buffer{Ptr: 1 << 20, Size: 1 << 20}}}
		if got := s.loraFew(c.tokens, c.d); got != c.want {
			t.Errorf("%s: LoRAFew %v, want %v", c.what, got, c.want)
		}
	}
}

// TestRopeTablesGrow: the rotary tables extended a few positions at a
// time, as prefill and then each decoding step extend them, hold the
// values trainer.RopeTables gives for all positions at once, and a step
// computes only its new position's.
func TestRopeTablesGrow(t *testing.T) {
	mc, err := trainer.Preset("1b")
	if err != nil {
		t.Fatal(err)
	}
	s := &session{info: trainer.ModelInfo{Config: mc}}
	for _, lt := range layerTypes {
		for _, p := range []int32{4, 5, 6, 11} { // a prompt's last position, then steps
			s.ropeTables(lt, []int32{0, p})
		}
		cos, sin := s.ropeTables(lt, []int32{3})
		all := make([]int32, 12)
		for i := range all {
			all[i] = int32(i)
		}
		wantCos, wantSin := trainer.RopeTables(all, trainer.RopeInvFreq(mc.Rope[lt], mc.HeadDim))
		if fmt.Sprint(cos) != fmt.Sprint(wantCos) || fmt.Sprint(sin) != fmt.Sprint(wantSin) {
			t.Errorf("%s: tables grown by steps differ from the tables of all 12 positions", lt)
		}
		// A step computes its own position's values only: the positions
		// before it are kept as they are, not computed again (a rebuild
		// from position 0 each step cost ~25 ms a step at 2k positions).
		cos[0] = 42
		if cos, _ = s.ropeTables(lt, []int32{12}); cos[0] != 42 {
			t.Errorf("%s: a step's growth computed the earlier positions again", lt)
		}
	}
}
