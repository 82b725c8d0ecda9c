package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"gemmaft/hub"
	"gemmaft/pipeline"
	"gemmaft/trainer"
)

// What an hf:// argument of a command names.
type argKind int

const (
	argFolder       argKind = iota // a checkpoint or adapter folder: the repository
	argTokenizer                   // a tokenizer.json (the repository's own when no path is given)
	argTokenizerDir                // a folder holding a tokenizer's files: the repository
	argShapes                      // a checkpoint of which only the shapes are read: its config and weight index
)

// localArg returns arg as a local path: an hf:// reference is resolved and
// fetched into the Hugging Face cache (with progress on stderr) and its
// local file or folder returned; anything else is returned as it is.
func localArg(ctx context.Context, flag, arg string, kind argKind) (string, error) {
	if !hub.IsRef(arg) {
		return arg, checkLocalArg(flag, arg, kind)
	}
	ref, err := hub.ParseRef(arg)
	if err != nil {
		return "", usageErr(fmt.Errorf("--%s: %w", flag, err))
	}
	var only []string
	switch kind {
	case argFolder, argTokenizerDir, argShapes:
		switch kind {
		case argTokenizerDir:
			only = trainer.TokenizerFiles
		case argShapes:
			only = []string{"config.json", "model.safetensors.index.json"}
		}
		if ref.Path != "" {
			return "", usageErr(fmt.Errorf("--%s %s: name the repository (hf://ORG/NAME@REVISION), not a file in it", flag, arg))
		}
	case argTokenizer:
		var one bool
		if ref, one = ref.OneFile("tokenizer.json"); !one {
			return "", usageErr(fmt.Errorf("--%s %s names several files; name one", flag, arg))
		}
	}
	_, paths, err := fetchRef(ctx, ref, only)
	if err != nil {
		return "", hubErr(fmt.Errorf("--%s: %w", flag, err))
	}
	if len(paths) != 1 {
		return "", usageErr(fmt.Errorf("--%s %s names %d files; name one", flag, arg, len(paths)))
	}
	if _, err := os.Stat(filepath.Join(paths[0], "model.safetensors.index.json")); kind == argShapes && err != nil {
		// One weights file and no index: its header holds the tensor names.
		if _, paths, err = fetchRef(ctx, ref, []string{"model.safetensors"}); err != nil {
			return "", hubErr(fmt.Errorf("--%s: %w", flag, err))
		}
	}
	return paths[0], nil
}

// hubErr is a failed hf:// argument's error with its exit code: a
// repository, revision or file the Hub does not have is the argument's
// fault (2, as a missing local path and a spec's reference are); a Hub
// that cannot be reached, a gated repository or a broken download, a
// failure (1).
func hubErr(err error) error {
	for _, named := range []error{hub.ErrRepoNotFound, hub.ErrRevisionNotFound, hub.ErrEntryNotFound} {
		if errors.Is(err, named) {
			return usageErr(err)
		}
	}
	return failErr(err)
}

// hubHint is how a missing path written as a Hub repository's id is
// given on the Hub, or "".
func hubHint(flag, arg, file string) string {
	if ref := hub.RefFor(arg, file); ref != "" {
		return fmt.Sprintf("; on the Hugging Face Hub that is --%s %s", flag, ref)
	}
	return ""
}

// checkLocalArg says, before anything is loaded, that a local path given
// for flag does not exist (a failure, as for any input file) or is a file
// where a folder is wanted or the reverse (a usage error), rather than
// letting the first file opened inside it fail.
func checkLocalArg(flag, arg string, kind argKind) error {
	if arg == "" {
		return nil
	}
	fi, err := os.Stat(arg)
	wantDir := kind != argTokenizer
	switch {
	case errors.Is(err, fs.ErrNotExist) && wantDir:
		return usageErr(fmt.Errorf("--%s %s: no such folder%s", flag, arg, hubHint(flag, arg, "")))
	case errors.Is(err, fs.ErrNotExist):
		return usageErr(fmt.Errorf("--%s %s: no such file%s", flag, arg, hubHint(flag, arg, "tokenizer.json")))
	case err != nil:
		return failErr(fmt.Errorf("--%s: %w", flag, err))
	case wantDir && !fi.IsDir():
		return usageErr(fmt.Errorf("--%s %s is a file, not a folder", flag, arg))
	case !wantDir && fi.IsDir():
		return usageErr(fmt.Errorf("--%s %s is a folder, not a tokenizer.json file", flag, arg))
	}
	return nil
}

// fetchRef resolves and fetches ref, showing the download as progress the
// way runs show their stages, and logging how the revision was resolved
// when that is worth saying (offline).
func fetchRef(ctx context.Context, ref hub.Ref, only []string) (*hub.Resolved, []string, error) {
	if !watchesSignals(ctx) {
		// A command that handles no signals itself (fetch, merge, eval's
		// arguments) still stops a download with a word and status 130.
		var stop func()
		ctx, stop = signalContextFrom(ctx, 5*time.Second)
		defer stop()
	}
	log, err := newLogger()
	if err != nil {
		return nil, nil, err
	}
	var res *hub.Resolved
	var paths []string
	err = showProgress(ref.RepoRef(), "fetch", func(tr *pipeline.Tracker) error {
		tr.Report(0, -1, "bytes", "resolving")
		res, paths, err = hub.FromEnv().Local(ctx, ref, hub.FetchOptions{
			Log:      log,
			Only:     only,
			Progress: func(done, total int64) { tr.Report(done, total, "bytes", "") },
		})
		return err
	})
	if errors.Is(err, context.Canceled) {
		return nil, nil, fmt.Errorf("%s: %w; the bytes downloaded so far are kept, and the next download of it resumes from there", ref, err)
	}
	if err != nil {
		return nil, nil, err
	}
	if res.Note != "" {
		log.Warn(res.Note)
	}
	return res, paths, nil
}

// showProgress runs work, which reports to its tracker, with the progress
// shown as runs show their stages: a live line on a terminal, log lines
// every 30 s elsewhere.
func showProgress(name, kind string, work func(tr *pipeline.Tracker) error) error {
	log, err := newLogger()
	if err != nil {
		return err
	}
	tr := pipeline.NewTracker(name, kind)
	var display pipeline.Display = pipeline.LogDisplay{Log: log, Every: 30 * time.Second}
	if stderrIsTerminal() {
		display = pipeline.TTYDisplay{W: os.Stderr, Logs: logSink}
	}
	tr.Start()
	stop := display.Start([]*pipeline.Tracker{tr})
	err = work(tr)
	tr.Finish(err == nil)
	stop()
	return err
}

func init() {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "fetch REF...",
		Short: "Download hf:// references into the Hugging Face cache and print where they are",
		Long: `fetch resolves each hf:// reference to a commit and downloads what it names into
the Hugging Face cache ($HF_HUB_CACHE, else $HF_HOME/hub, else
~/.cache/huggingface/hub), where huggingface_hub and transformers find it too:

  hf://ORG/NAME[@REV]                 a model: its configs, tokenizer files and
                                      safetensors weights
  hf://ORG/NAME[@REV]/PATH            a file, or the files a glob matches
  hf://datasets/ORG/NAME[@REV][/PATH] a dataset: every file, or PATH's

It prints, for each, the commit and the local paths. Files already in the
cache are checked against their hashes and kept; a damaged one is fetched
again; an interrupted download resumes. With HF_HUB_OFFLINE=1 nothing is
downloaded: fetch then checks that the cache holds everything, by the file list
this tool keeps beside a snapshot it fetched; a snapshot huggingface_hub wrote
has none, and there a model must hold config.json and safetensors weights.`,
		Example: `  pipeline fetch hf://google/gemma-3-12b-it
  pipeline fetch 'hf://datasets/malhajar/alpaca-gpt4-tr@main/data/train-*.parquet'`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) == 0 {
				return usageErr(fmt.Errorf("%s wants one or more hf:// references (see --help)", cmd.CommandPath()))
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			type out struct {
				Ref    string   `json:"ref"`
				Commit string   `json:"commit"`
				Paths  []string `json:"paths"`
				Note   string   `json:"note,omitempty"`
			}
			var results []out
			for _, a := range args {
				ref, err := hub.ParseRef(a)
				if err != nil {
					return usageErr(err)
				}
				res, paths, err := fetchRef(cmd.Context(), ref, nil)
				if err != nil {
					return hubErr(err)
				}
				results = append(results, out{Ref: ref.String(), Commit: res.Commit, Paths: paths, Note: res.Note})
			}
			if asJSON {
				enc := json.NewEncoder(stdout)
				enc.SetIndent("", "  ")
				return enc.Encode(results)
			}
			w := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
			for _, r := range results {
				fmt.Fprintf(w, "%s\t%s\t%s\n", r.Ref, r.Commit, strings.Join(r.Paths, " "))
			}
			return w.Flush()
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	root.AddCommand(cmd)
}
