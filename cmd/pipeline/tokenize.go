package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"

	"github.com/spf13/cobra"

	"gemmaft/tokenizer"
)

// tokenizeBatch is how many lines are encoded together on all cores.
const tokenizeBatch = 2048

func init() {
	var (
		tokPath, inPath, outPath string
		addSpecial, offsets      bool
	)
	cmd := &cobra.Command{
		Use:   "tokenize --tokenizer FILE [--add-special-tokens] [--in FILE] [--out FILE]",
		Short: "Tokenize JSON lines of text with a Hugging Face tokenizer.json",
		Long: `tokenize reads JSON lines {"text": "..."} (from --in or standard input) and
writes one {"ids": [...]} line for each, in the same order (to --out or
standard output). The ids are those Hugging Face tokenizers gives for the
same tokenizer.json. --add-special-tokens adds the post-processor's tokens
(Gemma 3: <bos>); --offsets adds each token's [start, end) byte offsets in
the text.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if tokPath == "" {
				return usageErr(errors.New("tokenize: --tokenizer is required"))
			}
			tokPath, err := localArg(cmd.Context(), "tokenizer", tokPath, argTokenizer)
			if err != nil {
				return err
			}
			tk, err := tokenizer.LoadFile(tokPath)
			if err != nil {
				return failErr(err)
			}
			in := io.Reader(os.Stdin)
			if inPath != "" && inPath != "-" {
				f, err := os.Open(inPath)
				if err != nil {
					return failErr(err)
				}
				defer f.Close()
				in = f
			}
			out := io.Writer(os.Stdout)
			var outFile *os.File
			if outPath != "" && outPath != "-" {
				if outFile, err = os.Create(outPath); err != nil {
					return failErr(err)
				}
				defer outFile.Close()
				out = outFile
			}
			if err := tokenizeLines(tk, in, out, addSpecial, offsets); err != nil {
				return failErr(err)
			}
			if outFile != nil {
				if err := outFile.Close(); err != nil {
					return failErr(err)
				}
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&tokPath, "tokenizer", "", "tokenizer.json to use, or hf://ORG/NAME[@REV][/tokenizer.json]")
	cmd.Flags().StringVar(&inPath, "in", "", "input JSON lines (default standard input)")
	cmd.Flags().StringVar(&outPath, "out", "", "output JSON lines (default standard output)")
	cmd.Flags().BoolVar(&addSpecial, "add-special-tokens", false, "add the post-processor's special tokens")
	cmd.Flags().BoolVar(&offsets, "offsets", false, "also write each token's byte offsets")
	root.AddCommand(cmd)
}

// tokenizeLines encodes JSON lines from r to w, a batch at a time.
func tokenizeLines(tk *tokenizer.Tokenizer, r io.Reader, w io.Writer, addSpecial, withOffsets bool) error {
	br := bufio.NewReaderSize(r, 1<<20)
	bw := bufio.NewWriterSize(w, 1<<20)
	texts := make([]string, 0, tokenizeBatch)
	line := 0
	var buf []byte
	flush := func() error {
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
	for {
		raw, err := br.ReadBytes('\n')
		if len(raw) > 0 {
			line++
			var rec struct {
				Text *string `json:"text"`
			}
			if jerr := json.Unmarshal(raw, &rec); jerr != nil {
				return fmt.Errorf("input line %d: %w", line, jerr)
			}
			if rec.Text == nil {
				return fmt.Errorf("input line %d: no \"text\" string", line)
			}
			texts = append(texts, *rec.Text)
			if len(texts) == tokenizeBatch {
				if err := flush(); err != nil {
					return err
				}
			}
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return err
		}
	}
	if err := flush(); err != nil {
		return err
	}
	return bw.Flush()
}
