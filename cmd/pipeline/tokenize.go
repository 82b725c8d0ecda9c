package main

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"time"

	"github.com/spf13/cobra"

	"gemmaft/dataset"
	"gemmaft/internal/atomicfile"
	"gemmaft/internal/lines"
	"gemmaft/pipeline"
	"gemmaft/tokenizer"
)

// tokenizeBatch is how many lines are encoded together on all cores.
const tokenizeBatch = 2048

func init() {
	var (
		tokPath, inPath, outPath string
		addSpecial, offsets      bool
		maxLine                  int
	)
	cmd := &cobra.Command{
		Use:   "tokenize --tokenizer FILE [--add-special-tokens] [--in FILE] [--out FILE]",
		Short: "Tokenize JSON lines of text with a Hugging Face tokenizer.json",
		Long: `tokenize reads JSON lines {"text": "..."} (from --in or standard input) and
writes one {"ids": [...]} line for each, in the same order (to --out or
standard output). The ids are those Hugging Face tokenizers gives for the
same tokenizer.json. --add-special-tokens adds the post-processor's tokens
(Gemma 3: <bos>); --offsets adds each token's [start, end) byte offsets in
the text.

--out appears only complete: on an error or an interrupt it is left as it
was. A line longer than --max-line-bytes is an error, and so is a blank line
before another (output line i answers input line i); blank lines at the end
are passed over.`,
		Args: func(_ *cobra.Command, args []string) error {
			if len(args) > 0 {
				return usageErr(fmt.Errorf("tokenize takes no arguments (got %q): read a file with --in FILE", args[0]))
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, _ []string) error {
			if tokPath == "" {
				return usageErr(errors.New("tokenize: --tokenizer is required"))
			}
			if maxLine < 1 {
				return usageErr(errors.New("tokenize: --max-line-bytes must be positive"))
			}
			tokPath, err := localArg(cmd.Context(), "tokenizer", tokPath, argTokenizer)
			if err != nil {
				return err
			}
			// A named pipe or a folder would block or fail obscurely.
			if err := pipeline.CheckReadableFile(tokPath); err != nil {
				return usageErr(fmt.Errorf("--tokenizer: %w", err))
			}
			if inPath != "" && inPath != "-" && sameFile(inPath, outPath) {
				return usageErr(fmt.Errorf("--out %s is --in: the ids would replace the texts; write them elsewhere", outPath))
			}
			// An --out that cannot be written is found out before the work.
			if outPath != "" && outPath != "-" {
				if err := checkWritable(outPath, "ids.jsonl"); err != nil {
					return usageErr(fmt.Errorf("--out: %w", err))
				}
			}
			tk, err := tokenizer.LoadFile(tokPath)
			if err != nil {
				return failErr(err)
			}
			in := io.Reader(os.Stdin)
			if inPath != "" && inPath != "-" {
				if err := pipeline.CheckReadableFile(inPath); err != nil && !isPipe(inPath) {
					return usageErr(fmt.Errorf("--in: %w", err))
				}
				f, err := os.Open(inPath)
				if err != nil {
					return failErr(err)
				}
				defer f.Close()
				in = f
			}
			// A blocked read (a terminal, a pipe) does not see the context:
			// the signal handler then removes the unfinished output itself.
			ctx, stop := signalContext(2 * time.Second)
			defer stop()
			if outPath == "" || outPath == "-" {
				if err := tokenizeLines(ctx, tk, in, stdout, addSpecial, offsets, maxLine); err != nil {
					return failErr(err)
				}
				return nil
			}
			out, err := atomicfile.CreateOutput(outPath)
			if err != nil {
				return failErr(fmt.Errorf("--out: %w", err))
			}
			if err := tokenizeLines(ctx, tk, in, out, addSpecial, offsets, maxLine); err != nil {
				out.Abort()
				return failErr(err)
			}
			if err := out.Commit(); err != nil {
				return failErr(err)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&tokPath, "tokenizer", "", "tokenizer.json to use, or hf://ORG/NAME[@REV][/tokenizer.json]")
	cmd.Flags().StringVar(&inPath, "in", "", "input JSON lines (default standard input)")
	cmd.Flags().StringVar(&outPath, "out", "", "output JSON lines (default standard output); written whole or not at all")
	cmd.Flags().BoolVar(&addSpecial, "add-special-tokens", false, "add the post-processor's special tokens")
	cmd.Flags().BoolVar(&offsets, "offsets", false, "also write each token's byte offsets")
	cmd.Flags().IntVar(&maxLine, "max-line-bytes", lines.DefaultMax, "longest input line accepted")
	root.AddCommand(cmd)
}

// sameFile reports whether a and b name one existing file.
func sameFile(a, b string) bool {
	fa, errA := os.Stat(a)
	fb, errB := os.Stat(b)
	return errA == nil && errB == nil && os.SameFile(fa, fb)
}

// isPipe reports whether path is a named pipe, which tokenize may read.
func isPipe(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.Mode()&os.ModeNamedPipe != 0
}

// tokenizeLines encodes JSON lines from r to w, a batch at a time, until
// the input ends or ctx is canceled.
func tokenizeLines(ctx context.Context, tk *tokenizer.Tokenizer, r io.Reader, w io.Writer, addSpecial, withOffsets bool, maxLine int) error {
	lr := lines.NewReader(r, maxLine)
	bw := bufio.NewWriterSize(w, 1<<20)
	texts := make([]string, 0, tokenizeBatch)
	var buf []byte
	flush := func() error {
		if err := ctx.Err(); err != nil {
			return err
		}
		var ids [][]int32
		var offs [][][2]int
		if withOffsets {
			ids, offs = tk.EncodeBatchOffsets(texts, addSpecial)
		} else {
			ids = tk.EncodeBatch(texts, addSpecial)
		}
		for i := range ids {
			buf = append(buf[:0], `{"ids":[`...)
			for k, id := range ids[i] {
				if k > 0 {
					buf = append(buf, ',')
				}
				buf = strconv.AppendInt(buf, int64(id), 10)
			}
			buf = append(buf, ']')
			if withOffsets {
				buf = append(buf, `,"offsets":[`...)
				for k, o := range offs[i] {
					if k > 0 {
						buf = append(buf, ',')
					}
					buf = append(buf, '[')
					buf = strconv.AppendInt(buf, int64(o[0]), 10)
					buf = append(buf, ',')
					buf = strconv.AppendInt(buf, int64(o[1]), 10)
					buf = append(buf, ']')
				}
				buf = append(buf, ']')
			}
			buf = append(buf, "}\n"...)
			if _, err := bw.Write(buf); err != nil {
				return err
			}
		}
		texts = texts[:0]
		return nil
	}
	blank := int64(0) // the first blank line: an error once a line follows it
	for {
		raw, err := lr.Next()
		if err == io.EOF {
			break // blank lines at the end (a file's last newline doubled) answer nothing
		}
		if err != nil {
			var tl *lines.TooLongError
			if errors.As(err, &tl) {
				return fmt.Errorf("input %w (--max-line-bytes raises the bound)", err)
			}
			return err
		}
		if len(bytes.TrimSpace(raw)) == 0 {
			blank = cmp.Or(blank, lr.Line())
			continue
		}
		if blank > 0 {
			return fmt.Errorf(`input line %d: blank; every line is a {"text": ...} object (output line i holds the ids of input line i)`, blank)
		}
		text, err := lineText(raw)
		if err != nil {
			return fmt.Errorf("input line %d: %w", lr.Line(), err)
		}
		texts = append(texts, text)
		if len(texts) == tokenizeBatch {
			if err := flush(); err != nil {
				return err
			}
		}
	}
	if err := flush(); err != nil {
		return err
	}
	return bw.Flush()
}

// lineText is the text of one input line, {"text": "..."}.
func lineText(raw []byte) (string, error) {
	var rec map[string]json.RawMessage
	if err := json.Unmarshal(raw, &rec); err != nil || rec == nil {
		return "", errors.New(`not a JSON object; want {"text": "..."}`)
	}
	v, ok := rec["text"]
	if !ok {
		return "", errors.New(`no "text" field`)
	}
	if v[0] != '"' {
		return "", fmt.Errorf(`"text" is %s, not a string`, dataset.JSONKind(v[0]))
	}
	// Invalid UTF-8 would be read as U+FFFD, and offsets past the line.
	var text string
	if err := dataset.DecodeJSONString(v, &text); err != nil {
		return "", fmt.Errorf(`"text": %w`, err)
	}
	return text, nil
}
