package main

import (
	"fmt"
	"golang.org/x/term"
	"log/slog"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode"

	"github.com/mattn/go-isatty"
	"github.com/spf13/cobra"

	"gemmaft/pipeline"
	"gemmaft/ranks"
	"gemmaft/stages"
	"gemmaft/trainer"
)

// Flags shared by the commands that use the cache.
var (
	cacheFlag string
	logLevel  string
	logFormat string
)

func init() {
	pf := root.PersistentFlags()
	pf.StringVar(&cacheFlag, "cache", "", "cache folder (default: $"+pipeline.CacheEnv+", else the spec's cache:, else $XDG_CACHE_HOME/pipeline, else ~/.cache/pipeline)")
	pf.StringVar(&logLevel, "log-level", "info", "log level: debug, info, warn or error")
	pf.StringVar(&logFormat, "log-format", "text", "log format: text or json")
}

// cacheCommands are the commands that read or write the cache. --cache is
// a flag of the root (scripts write `pipeline --cache DIR run ...`); the
// other commands leave it out of their help and say that it does nothing.
var cacheCommands = []string{"run", "plan", "status", "report", "verify", "gc", "inspect", "export"}

func usesCache(cmd *cobra.Command) bool {
	return cmd == root || (cmd.Parent() == root && slices.Contains(cacheCommands, cmd.Name()))
}

func init() {
	help := root.HelpFunc()
	root.SetHelpFunc(func(cmd *cobra.Command, args []string) {
		if f := root.PersistentFlags().Lookup("cache"); !usesCache(cmd) {
			f.Hidden = true
			defer func() { f.Hidden = false }()
		}
		help(cmd, args)
	})
}

// warnCacheUnused says that a --cache given to a command that uses no
// cache does nothing.
func warnCacheUnused(cmd *cobra.Command) {
	if !usesCache(cmd) && cmd.Flags().Changed("cache") {
		notice(slog.LevelWarn, fmt.Sprintf("pipeline: %s uses no cache: --cache does nothing here", cmd.CommandPath()))
	}
}

// logSink carries the log to stderr, around a live progress display.
var logSink = pipeline.NewLogSink(os.Stderr)

// newLogger writes timestamped log lines to stderr.
func newLogger() (*slog.Logger, error) {
	var level slog.Level
	if err := level.UnmarshalText([]byte(logLevel)); err != nil {
		return nil, usageErr(fmt.Errorf("--log-level %q: want debug, info, warn or error", logLevel))
	}
	opts := &slog.HandlerOptions{Level: level}
	var h slog.Handler
	switch logFormat {
	case "text":
		h = slog.NewTextHandler(logSink, opts)
	case "json":
		h = slog.NewJSONHandler(logSink, opts)
	default:
		return nil, usageErr(fmt.Errorf("--log-format %q: want text or json", logFormat))
	}
	// The ranks of a run on several GPUs share a terminal or a job log:
	// each line says whose it is.
	if r, ok, err := ranks.FromEnv(os.Getenv); err == nil && ok && r.Size > 1 {
		h = h.WithAttrs([]slog.Attr{slog.Int("rank", r.Rank)})
	}
	return slog.New(h), nil
}

// stderrIsTerminal decides between live progress lines and log lines: a
// terminal that reports no size (a pseudo-terminal of `script` or a CI
// runner, say) would show no live line, so it gets the log lines.
func stderrIsTerminal() bool {
	if !isatty.IsTerminal(os.Stderr.Fd()) && !isatty.IsCygwinTerminal(os.Stderr.Fd()) {
		return false
	}
	w, h, err := term.GetSize(int(os.Stderr.Fd()))
	return err == nil && w > 0 && h > 0
}

// loadSpec loads a DAG with every stage kind; spec problems exit 2.
func loadSpec(path string) (*pipeline.DAG, error) {
	dag, err := pipeline.Load(path, stages.Registry())
	if err != nil {
		return nil, usageErr(err)
	}
	return dag, nil
}

func openStore(dag *pipeline.DAG) (*pipeline.Store, error) {
	root, err := pipeline.CacheRoot(cacheFlag, dag)
	if err != nil {
		return nil, usageErr(err)
	}
	st, err := pipeline.OpenStore(root)
	if err != nil {
		if fi, serr := os.Stat(root); serr == nil && !fi.IsDir() { // a slip in the naming, not a failure
			return nil, usageErr(fmt.Errorf("cache %s is a file, not a folder: check --cache, $%s or the spec's cache:", root, pipeline.CacheEnv))
		}
		return nil, failErr(err)
	}
	return st, nil
}

// specArgs is how a command suggested to the user names the spec: its
// path, and the --cache given to this command, so that the suggestion acts
// on the same cache.
func specArgs(spec string) string {
	if cacheFlag != "" {
		return shellQuote(spec) + " --cache " + shellQuote(cacheFlag)
	}
	return shellQuote(spec)
}

// shellQuote writes s as a POSIX shell word, so that a suggested command
// pastes as it is: quoted when it holds a space or another character the
// shell would read (letters of any script are fine).
func shellQuote(s string) string {
	plain := func(r rune) bool {
		return unicode.IsLetter(r) || unicode.IsDigit(r) || strings.ContainsRune("_-./:=@%+,", r)
	}
	if s != "" && strings.IndexFunc(s, func(r rune) bool { return !plain(r) }) < 0 {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// keyColumn is a key as tables show it: short, or "-" for a stage the
// plan did not key.
func keyColumn(key string) string {
	if key == "" {
		return "-"
	}
	return pipeline.ShortKey(key)
}

// warnUnselectedForce says which --force stages a run with opts does not
// select (--until, --only), whose --force then does nothing.
func warnUnselectedForce(dag *pipeline.DAG, opts pipeline.Options) {
	selected := map[string]bool{}
	for _, n := range dag.Selected(opts) {
		selected[n.Name] = true
	}
	for _, name := range opts.Force {
		if name != "all" && dag.Node(name) != nil && !selected[name] {
			notice(slog.LevelWarn, fmt.Sprintf("pipeline: --force %s does nothing: stage %s is not part of this run", name, name))
		}
	}
}

// lookAtStore opens the cache for a command that shows what it holds (plan,
// status, report): a cache that does not exist is shown empty, with a
// note, and not created.
func lookAtStore(dag *pipeline.DAG) (*pipeline.Store, error) {
	root, err := pipeline.CacheRoot(cacheFlag, dag)
	if err != nil {
		return nil, usageErr(err)
	}
	st, exists, err := pipeline.LookAtStore(root)
	if err != nil {
		return nil, usageErr(err)
	}
	if !exists {
		state := "does not exist yet"
		if fi, err := os.Stat(st.Root); err == nil && fi.IsDir() {
			state = "is an empty folder"
		}
		notice(slog.LevelWarn, fmt.Sprintf("pipeline: cache %s %s: nothing has run with it (check --cache, $%s or the spec's cache:)", st.Root, state, pipeline.CacheEnv))
	}
	return st, nil
}

// openExistingStore opens the cache for a command that only looks at it:
// a cache that does not exist is a usage error (a mistyped --cache), not a
// new empty cache.
func openExistingStore(dag *pipeline.DAG) (*pipeline.Store, error) {
	root, err := pipeline.CacheRoot(cacheFlag, dag)
	if err != nil {
		return nil, usageErr(err)
	}
	st, err := pipeline.OpenExistingStore(root)
	if err != nil {
		return nil, usageErr(err)
	}
	return st, nil
}

// specOrFailErr gives an error of Store.Plan or Store.Status its exit code:
// a problem of the spec (an unknown stage name, --until with --only) exits 2,
// anything else 1.
func specOrFailErr(err error) error {
	if pipeline.IsSpecError(err) {
		return usageErr(err)
	}
	return failErr(err)
}

// parseAge reads a duration that may also be given in days or weeks
// ("30d", "2w"), as people write cache ages.
func parseAge(s string) (time.Duration, error) {
	for suffix, unit := range map[string]time.Duration{"d": 24 * time.Hour, "w": 7 * 24 * time.Hour} {
		if n, ok := strings.CutSuffix(s, suffix); ok {
			f, err := strconv.ParseFloat(n, 64)
			if err != nil || f < 0 {
				return 0, fmt.Errorf("bad age %q: want e.g. 12h, 30d or 2w", s)
			}
			return time.Duration(f * float64(unit)), nil
		}
	}
	d, err := time.ParseDuration(s)
	if err != nil || d < 0 {
		return 0, fmt.Errorf("bad age %q: want e.g. 12h, 30d or 2w", s)
	}
	return d, nil
}

// exactArgs is cobra.ExactArgs with a usage error that says what is wanted.
func exactArgs(n int, what string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) != n {
			return usageErr(fmt.Errorf("%s wants %s (see --help)", cmd.CommandPath(), what))
		}
		return nil
	}
}

// checkAdapterArg checks a command's --adapter before any model loads: a
// PEFT adapter folder, and for a qlora stage's adapter in the cache, one
// trained on --model's checkpoint unless otherBase (--other-base). Both
// are the arguments' fault: exit 2. trainedOn is the qlora stage's
// quantize (nf4 or none), "" for an adapter the cache does not know.
func checkAdapterArg(command, modelDir, adapterDir string, otherBase bool) (trainedOn string, err error) {
	if err := trainer.CheckAdapterDir(adapterDir); err != nil {
		return "", usageErr(fmt.Errorf("%s: --adapter: %w", command, err))
	}
	if trainedOn, err = stages.CheckCachedAdapter(modelDir, adapterDir, otherBase); err != nil {
		return "", usageErr(fmt.Errorf("%s: %w", command, err))
	}
	return trainedOn, nil
}
