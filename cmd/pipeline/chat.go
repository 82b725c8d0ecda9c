package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"time"

	"github.com/mattn/go-isatty"
	"github.com/spf13/cobra"

	"gemmaft/chat"
	"gemmaft/converse"
	"gemmaft/tokenizer"
	"gemmaft/trainer"
)

// defaultMaxNewTokens caps an answer when neither the flag nor the
// model's generation_config.json says otherwise.
const defaultMaxNewTokens = 1024

func init() {
	var modelDir, adapterDir, quantize, system, prompt, tokPath, backend string
	var otherBase bool
	var maxNew, topK int
	var temperature, topP float64
	var seed uint64
	cmd := &cobra.Command{
		Use:   "chat --model DIR [--adapter DIR] [--quantize nf4] [--system TEXT] [--prompt TEXT|-]",
		Short: "Talk with a model, or have it answer one prompt",
		Long: `chat talks with a Gemma 3 checkpoint (--model), with a PEFT LoRA adapter
applied when --adapter is given: each turn is rendered with the Gemma 3 chat
template, the whole conversation so far included, and the answer is printed as
it is generated. --system puts a system text before the first turn, as the
template does. An answer ends at <end_of_turn> or <eos> (or another id the
model folder's generation_config.json lists as eos_token_id), or after
--max-new-tokens, or where the conversation fills the model's context; a cut
answer says so (on stderr without a terminal).

On a terminal, type a message and press Enter; /reset starts a new
conversation, /exit (or Ctrl-D) leaves, Ctrl-C stops an answer. Without a
terminal, each line of stdin is the next turn of one conversation (/reset
and /exit too). --prompt TEXT answers TEXT alone and exits (--prompt - reads
it from stdin): for scripts. The answer goes to stdout, white space stripped
as the template strips a turn. For a script, Ctrl-C or SIGTERM ends the
command once the answer so far is printed, with status 130 or 143.

Sampling: --temperature 0 decodes greedily (the same answer every time);
otherwise tokens are drawn at that temperature from the --top-k most likely,
then from the smallest set whose probability reaches --top-p, with --seed
(a new one each run unless given).
Where a flag is not given, the model folder's generation_config.json decides
(Gemma 3 ships do_sample with top_k 64 and top_p 0.95 at temperature 1), and
without one decoding is greedy; where --temperature samples and the file does
not, top_k and top_p are the file's, else transformers' 50 and 1.

--quantize nf4 passes the base's projections through NF4 and back first: the
weights a QLoRA adapter was trained against. An adapter given as a qlora stage's
entry (its adapter/ folder) that trained on NF4 gets it by default, as the
generate stage does, and its base is checked where the cache knows it (another
model stage's checkpoint, or a merge that holds the adapter already, is refused). The tokenizer is the model
folder's tokenizer.json unless --tokenizer names one. --model, --adapter and
--tokenizer may be hf://ORG/NAME[@REVISION] references, fetched into the
Hugging Face cache. The model runs on the GPU in bf16 when one is usable
(--backend auto, the default; cuda insists on it), else on the CPU reference
in float32 (--backend cpu).`,
		Example: `  pipeline chat --model hf://google/gemma-3-1b-it
  pipeline chat --model models/gemma-3-12b-it --adapter run/adapter --quantize nf4 --system "Kısa cevap ver."
  pipeline chat --model merged --temperature 0 --prompt "Türkiye'nin başkenti neresidir?"
  echo "Bir haiku yaz." | pipeline chat --model merged --prompt -`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) > 0 {
				return usageErr(fmt.Errorf("chat takes no arguments: to ask one question, --prompt %q", strings.Join(args, " ")))
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, _ []string) error {
			if modelDir == "" {
				return usageErr(errors.New("chat: --model is required"))
			}
			switch quantize {
			case "", "none", "nf4":
			default:
				return usageErr(fmt.Errorf("chat: --quantize %q: want nf4 or none", quantize))
			}
			switch backend {
			case "auto", "cpu", "cuda":
			default:
				return usageErr(fmt.Errorf("chat: --backend %q: want auto, cpu or cuda", backend))
			}
			f := cmd.Flags()
			if err := checkSamplingFlags(f.Changed, maxNew, temperature, topK, topP); err != nil {
				return usageErr(fmt.Errorf("chat: %w", err))
			}
			var err error
			for _, a := range []struct {
				flag string
				v    *string
				kind argKind
			}{{"model", &modelDir, argFolder}, {"adapter", &adapterDir, argFolder}, {"tokenizer", &tokPath, argTokenizer}} {
				if *a.v, err = localArg(cmd.Context(), a.flag, *a.v, a.kind); err != nil {
					return err
				}
			}
			cfg, err := trainer.LoadConfig(modelDir)
			if err != nil {
				return usageErr(fmt.Errorf("chat: --model: %w", err))
			}
			gc, err := converse.ReadGenerationConfig(modelDir)
			if err != nil {
				return failErr(err)
			}
			opts := trainer.GenerateOptions{MaxNewTokens: defaultMaxNewTokens}
			opts.Temperature, opts.TopK, opts.TopP = gc.Sampling()
			if gc != nil && gc.MaxNewTokens > 0 {
				opts.MaxNewTokens = gc.MaxNewTokens
			}
			if f.Changed("temperature") {
				if opts.Temperature == 0 {
					// Sampling the file does not: its filters, or
					// transformers' defaults (top_k 50), not every token.
					opts.TopK, opts.TopP = gc.Filters()
				}
				opts.Temperature = temperature
			}
			if f.Changed("top-k") {
				opts.TopK = topK
			}
			if f.Changed("top-p") {
				opts.TopP = topP
			}
			if f.Changed("max-new-tokens") {
				opts.MaxNewTokens = maxNew
			}
			opts.TopK, opts.TopP = converse.TopPZero(opts.TopK, opts.TopP) // the file's top_p 0, after the flags
			if opts.Temperature == 0 {
				for _, name := range []string{"top-k", "top-p", "seed"} {
					switch {
					case !f.Changed(name):
					case f.Changed("temperature"):
						return usageErr(fmt.Errorf("chat: --%s applies only when sampling, and --temperature 0 decodes greedily", name))
					default:
						fmt.Fprintf(os.Stderr, "chat: --%s is unused: decoding is greedy, as the model folder has no generation_config.json that samples; --temperature samples\n", name)
					}
				}
				opts.TopK, opts.TopP = 0, 0 // greedy reads neither, whatever the file sets
			}
			if err := opts.Validate(); err != nil { // the flags passed: the file's value
				return failErr(fmt.Errorf("chat: %s: %w (--temperature, --top-k, --top-p and --max-new-tokens override what it sets)", filepath.Join(modelDir, "generation_config.json"), err))
			}
			opts.Seed = seed
			if !f.Changed("seed") {
				opts.Seed = rand.Uint64() // a new answer each run, as transformers samples
			}
			if tokPath == "" {
				tokPath = filepath.Join(modelDir, "tokenizer.json")
				if _, err := os.Stat(tokPath); err != nil {
					return usageErr(fmt.Errorf("chat: %s has no tokenizer.json; give one with --tokenizer", modelDir))
				}
			}
			var question string
			if prompt == "-" {
				if isatty.IsTerminal(os.Stdin.Fd()) {
					fmt.Fprintln(os.Stderr, "chat: reading the prompt from the terminal; Ctrl-D ends it")
				}
				b, err := io.ReadAll(cmd.InOrStdin())
				if err != nil {
					return failErr(err)
				}
				question = string(b)
			} else {
				question = prompt
			}
			if f.Changed("prompt") && chat.Strip(question) == "" {
				if prompt == "-" {
					return usageErr(errors.New("chat: --prompt -: standard input held no text"))
				}
				return usageErr(errors.New("chat: --prompt is empty"))
			}

			// A --tokenizer that is not this model's is a bad argument; the
			// model folder's own, a broken download.
			badTokenizer := func(err error) error { return failErr(fmt.Errorf("chat: %w", err)) }
			if f.Changed("tokenizer") {
				badTokenizer = func(err error) error { return usageErr(fmt.Errorf("chat: --tokenizer: %w", err)) }
			}
			tok, err := tokenizer.LoadFile(tokPath)
			if err != nil {
				return badTokenizer(err)
			}
			if err := converse.CheckTokenizer(tok, cfg.VocabSize); err != nil {
				return badTokenizer(fmt.Errorf("%s: %w", tokPath, err))
			}
			tty := isatty.IsTerminal(os.Stdin.Fd()) && !f.Changed("prompt")
			// On a terminal Ctrl-C stops an answer and the conversation goes
			// on; for a script it stops the command, the answer so far
			// printed, with 130 as its status.
			ctx := cmd.Context()
			if !tty {
				var stop func()
				ctx, stop = signalContext(2 * time.Second)
				defer stop()
			}
			if adapterDir != "" {
				trainedOn, err := checkAdapterArg("chat", modelDir, adapterDir, otherBase)
				if err != nil {
					return err
				}
				if trainedOn == "nf4" && quantize == "" {
					quantize = "nf4"
					fmt.Fprintln(os.Stderr, "chat: the adapter was trained on the NF4 base (a qlora stage's quantize: nf4); decoding through NF4 as generate does (--quantize none for the original weights)")
				}
			}
			began := time.Now()
			dec, err := trainer.OpenDecoder(trainer.DecoderConfig{Model: modelDir, Adapter: adapterDir, Quantize: quantize, Backend: backend})
			if err != nil {
				return failErr(err)
			}
			defer dec.Close()
			var eos []int32 // what transformers' generate stops at, beside Gemma 3's own
			if gc != nil {
				eos = gc.EOS
			}
			gen, err := converse.New(dec, tok, eos...)
			if err != nil {
				return failErr(err)
			}
			s := &chatSession{gen: gen, opts: opts, out: &checkedWriter{w: cmd.OutOrStdout()}, tty: tty, once: f.Changed("prompt"), conv: converse.Conversation{System: system}}
			switch {
			case tty:
				c := dec.Info().Config
				fmt.Fprintf(os.Stderr, "loaded %s (%d layers, hidden %d) in %.1fs; %s. /reset starts over, /exit leaves.\n",
					modelDir, c.Layers, c.Hidden, time.Since(began).Seconds(), samplingNote(opts))
			case opts.Temperature > 0 && !f.Changed("seed"):
				// A script's sampled answer can be had again.
				fmt.Fprintf(os.Stderr, "chat: sampling with seed %d (--seed %d draws the same again)\n", opts.Seed, opts.Seed)
			}
			if f.Changed("prompt") {
				end, err := s.answer(ctx, question)
				if err == nil && end != answerDone {
					fmt.Fprintln(os.Stderr, s.cutNote(end))
				}
				return err
			}
			return s.loop(ctx, cmd.InOrStdin())
		},
	}
	f := cmd.Flags()
	f.StringVar(&modelDir, "model", "", "Gemma 3 checkpoint folder (config.json, safetensors), or hf://ORG/NAME[@REV]")
	f.StringVar(&adapterDir, "adapter", "", "PEFT LoRA adapter folder for --model, or hf://ORG/NAME[@REV]")
	f.BoolVar(&otherBase, "other-base", false, "apply an adapter of the cache to --model even where that is not the checkpoint it was trained on")
	f.StringVar(&quantize, "quantize", "", "nf4: the base's projections through NF4 and back, as QLoRA trained; none: the checkpoint's weights (default: nf4 for a qlora entry's adapter that trained on NF4, else none)")
	f.StringVar(&backend, "backend", "auto", "auto (the GPU when one is usable), cuda (the GPU, bf16) or cpu (float32)")
	f.StringVar(&system, "system", "", "system text before the first turn")
	f.StringVar(&prompt, "prompt", "", "answer this text and exit (- reads it from stdin)")
	f.StringVar(&tokPath, "tokenizer", "", "tokenizer.json, or hf://ORG/NAME[@REV][/FILE] (default: the model folder's)")
	f.IntVar(&maxNew, "max-new-tokens", 0, "most tokens in an answer (default: generation_config.json's max_new_tokens, else 1024)")
	f.Float64Var(&temperature, "temperature", 0, "sampling temperature; 0 decodes greedily (default: generation_config.json's; greedy without one)")
	f.IntVar(&topK, "top-k", 0, "sample from the k most likely tokens; 0 keeps all (default: generation_config.json's, else 50 as transformers)")
	f.Float64Var(&topP, "top-p", 0, "then from the smallest set whose probability reaches p, in (0, 1]; 1 keeps all (default: generation_config.json's)")
	f.Uint64Var(&seed, "seed", 0, "seed of the draws when sampling (default: a new one each run, shown on a terminal)")
	root.AddCommand(cmd)
}

// checkSamplingFlags checks the decoding flags that were given, by their
// names, before anything loads.
func checkSamplingFlags(changed func(flag string) bool, maxNew int, temperature float64, topK int, topP float64) error {
	switch {
	case changed("max-new-tokens") && maxNew < 1:
		return fmt.Errorf("--max-new-tokens %d: must be at least 1", maxNew)
	case changed("temperature") && !(temperature >= 0 && !math.IsInf(temperature, 0)):
		return fmt.Errorf("--temperature %v: must be 0 (greedy) or a positive finite number", temperature)
	case changed("top-k") && topK < 0:
		return fmt.Errorf("--top-k %d: must not be negative (0 keeps every token)", topK)
	case changed("top-p") && topP == 0:
		// transformers keeps the most likely token alone at top_p 0.
		return errors.New("--top-p 0 would keep only the most likely token: that is --top-k 1 (or --temperature 0, greedy); 1 keeps all")
	case changed("top-p") && !(topP > 0 && topP <= 1):
		return fmt.Errorf("--top-p %v: must be in (0, 1]", topP)
	}
	return nil
}

func samplingNote(o trainer.GenerateOptions) string {
	if o.Temperature == 0 {
		return fmt.Sprintf("greedy, at most %d new tokens", o.MaxNewTokens)
	}
	return fmt.Sprintf("sampling at temperature %g, top_k %d, top_p %g, seed %d, at most %d new tokens",
		o.Temperature, o.TopK, o.TopP, o.Seed, o.MaxNewTokens)
}

// chatSession is one conversation with the model.
type chatSession struct {
	gen  *converse.Generator
	opts trainer.GenerateOptions
	out  *checkedWriter
	tty  bool // a conversation on a terminal, rather than a script's input
	once bool // --prompt: one question, no conversation to start over
	conv converse.Conversation
	// asked counts the answers asked for in the session, /reset or not:
	// each draws with its own seed, so that asking again after /reset
	// gives another answer, and the same input with --seed the same ones.
	asked uint64
}

// How an answer ended.
type answerEnd int

const (
	answerDone    answerEnd = iota // at <end_of_turn> or <eos>
	answerCut                      // at the most new tokens
	answerFull                     // at the end of the model's context
	answerStopped                  // by Ctrl-C
)

// resetHint says how to start over when the conversation fills the
// model's context: the same /reset on a terminal and in a script's input.
func (s *chatSession) resetHint() string {
	switch {
	case s.once:
		return ""
	case s.tty:
		return "; /reset starts a new conversation"
	}
	return "; a line /reset in the input starts a new conversation"
}

// cutNote says that an answer ran into a limit, and what to do about it:
// a cut answer otherwise reads like a finished one.
func (s *chatSession) cutNote(end answerEnd) string {
	switch end {
	case answerFull:
		note := fmt.Sprintf("(cut at the end of the model's context, %d positions", s.gen.Context())
		return note + s.resetHint() + ")"
	case answerStopped:
		return "(stopped)"
	}
	return fmt.Sprintf("(cut at %d new tokens; --max-new-tokens allows more)", s.opts.MaxNewTokens)
}

// answer asks text as the conversation's next turn, prints the answer as
// it comes and keeps it in the conversation. On a terminal Ctrl-C stops
// the answer and what was said so far stays; otherwise a canceled ctx is
// the command's end, the answer so far printed.
func (s *chatSession) answer(ctx context.Context, text string) (end answerEnd, err error) {
	conv := s.conv
	conv.Turns = append(conv.Turns[:len(conv.Turns):len(conv.Turns)], text)
	if s.tty {
		var cancel func()
		ctx, cancel = signal.NotifyContext(ctx, os.Interrupt)
		defer cancel()
	}
	o := s.opts
	o.Seed += s.asked
	s.asked++
	// The answer is printed stripped as the template strips it, so that
	// what a script reads is what the next turn's prompt holds.
	var raw strings.Builder
	printed := 0
	emit := func(_ int, piece string) {
		raw.WriteString(piece)
		now := chat.Strip(raw.String())
		if len(now) > printed {
			io.WriteString(s.out, now[printed:])
			printed = len(now)
		}
	}
	convs := []converse.Conversation{conv}
	replies, err := s.gen.Reply(ctx, convs, o, emit)
	// An answer may take what the context has left, as transformers'
	// generate does: Reply refuses, before decoding, one that might not
	// fit, and says how long the prompt is.
	var ce *converse.ContextError
	if errors.As(err, &ce) && ce.PromptTokens < ce.Context {
		o.MaxNewTokens = ce.Context - ce.PromptTokens
		replies, err = s.gen.Reply(ctx, convs, o, emit)
	}
	var reply string
	switch {
	case err == nil:
		reply = replies[0].Text
		if printed < len(reply) {
			io.WriteString(s.out, reply[printed:])
		}
		if !replies[0].Stopped {
			end = answerCut
			if o.MaxNewTokens < s.opts.MaxNewTokens {
				end = answerFull
			}
		}
	case ctx.Err() != nil && errors.Is(err, context.Canceled):
		end, reply = answerStopped, chat.Strip(raw.String())
		if !s.tty {
			if printed > 0 {
				fmt.Fprintln(s.out)
			}
			return end, context.Cause(ctx) // the command's end: 130 or 143
		}
	case errors.As(err, &ce):
		return answerDone, failErr(errors.New("chat: " + ce.Error() + s.resetHint()))
	default:
		return answerDone, failErr(err)
	}
	fmt.Fprintln(s.out)
	if s.out.err != nil {
		return end, failErr(fmt.Errorf("chat: writing the answer: %w", s.out.err))
	}
	s.conv.Turns = conv.Turns
	s.conv.Answers = append(s.conv.Answers, reply)
	return end, nil
}

// loop reads turns from in until it ends: typed at a prompt on a terminal,
// else one a line.
func (s *chatSession) loop(ctx context.Context, in io.Reader) error {
	const longest = 16 << 20
	sc := bufio.NewScanner(in)
	sc.Buffer(make([]byte, 64<<10), longest)
	for {
		if s.tty {
			fmt.Fprint(s.out, "\n> ")
		}
		if !sc.Scan() {
			if s.tty {
				fmt.Fprintln(s.out)
			}
			if errors.Is(sc.Err(), bufio.ErrTooLong) {
				return failErr(fmt.Errorf("chat: a line of input is longer than %d MiB", longest>>20))
			}
			return sc.Err()
		}
		line := sc.Text()
		switch strings.TrimSpace(line) {
		case "":
			continue
		case "/exit", "/quit":
			return nil
		case "/reset":
			s.conv = converse.Conversation{System: s.conv.System}
			if s.tty {
				fmt.Fprintln(s.out, "(a new conversation)")
			}
			continue
		}
		end, err := s.answer(ctx, line)
		if err != nil {
			if s.tty && s.out.err == nil {
				fmt.Fprintln(os.Stderr, "pipeline:", err)
				continue
			}
			return err
		}
		switch {
		case end == answerDone:
		case s.tty:
			fmt.Fprintln(s.out, s.cutNote(end))
		default:
			fmt.Fprintln(os.Stderr, s.cutNote(end))
		}
	}
}
