package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"time"

	"gemmaft/pipeline"
	"gemmaft/ranks"
)

// Training on several GPUs: one process per GPU, each running the same
// `pipeline run`. The launcher (torchrun, srun, a Kubernetes operator, or
// `pipeline run --gpus N` itself) tells each its rank; rank 0 runs the DAG
// as a single process does; the other ranks follow it over the same cache
// (pipeline.Engine.Collective): they wait for, or compute, the data the
// training stage needs under the entries' locks, train their share with
// rank 0, and stop there.

// rankPlan is what this process does as one rank of several.
type rankPlan struct {
	rank  ranks.Rank
	stage string // the training stage every rank runs
}

// follows says whether this rank follows rank 0.
func (p *rankPlan) follows() bool { return p != nil && p.rank.Rank != 0 }

// followerOptions turns the run's options into a follower's: up to the
// training stage, no report (rank 0 reports, records the run and writes
// the entry). A forced data stage is rank 0's to recompute: a follower
// replacing an entry rank 0 reads could pull it from under it. The
// training stage, forced, trains again on every rank.
func (p *rankPlan) followerOptions(opts pipeline.Options) pipeline.Options {
	forced := opts.Force
	opts.Until, opts.Only, opts.Force = p.stage, "", nil
	for _, f := range forced {
		if f == "all" || f == p.stage {
			opts.Force = []string{p.stage}
		}
	}
	return opts
}

// startRanks handles --gpus: with more than one it runs the command as
// that many ranks and reports true.
func startRanks(gpus int) (bool, error) {
	switch {
	case gpus < 1:
		return true, usageErr(fmt.Errorf("--gpus %d: give a number of GPUs, at least 1", gpus))
	case gpus > 1:
		return true, launchRanks(gpus, os.Args[1:])
	}
	return false, nil
}

// planRanks reads the launcher's variables; nil when this process runs
// alone.
func planRanks(dag *pipeline.DAG, opts pipeline.Options) (*rankPlan, error) {
	r, ok, err := ranks.FromEnv(os.Getenv)
	if err != nil {
		return nil, usageErr(fmt.Errorf("the launcher's variables: %w", err))
	}
	if !ok || r.Size == 1 {
		return nil, nil
	}
	stages := qloraStages(dag, opts)
	if len(stages) > 1 {
		return nil, usageErr(fmt.Errorf("%d ranks train one stage at a time, and this run selects %s: add --until or --only", r.Size, strings.Join(stages, ", ")))
	}
	p := &rankPlan{rank: r}
	if len(stages) == 1 {
		p.stage = stages[0]
	}
	return p, nil
}

// qloraStages names the training stages a run with opts selects.
func qloraStages(dag *pipeline.DAG, opts pipeline.Options) []string {
	var out []string
	for _, n := range dag.Selected(opts) {
		if n.KindName == "qlora" {
			out = append(out, n.Name)
		}
	}
	return out
}

// launchRanks runs this command as n ranks on this machine, as torchrun
// --nproc-per-node does: the same arguments less --gpus, the environment
// unchanged but for RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
// MASTER_PORT. Rank 0 prints to stdout; the others' output goes to stderr.
// When a rank fails, the others end through their group within moments;
// any left after a minute are killed. When the launcher itself dies, its
// ranks get SIGTERM (on Linux).
func launchRanks(n int, args []string) error {
	if _, ok, _ := ranks.FromEnv(os.Getenv); ok {
		return usageErr(errors.New("--gpus starts the ranks itself; under torchrun, srun or a training operator leave it out"))
	}
	exe, err := os.Executable()
	if err != nil {
		return failErr(err)
	}
	addr, err := freeLoopback()
	if err != nil {
		return failErr(fmt.Errorf("finding a port for the ranks' rendezvous: %w", err))
	}
	defer lockRankThread()() // until every rank has exited: see rankProcAttr
	cmds := make([]*exec.Cmd, n)
	for r := range cmds {
		c := exec.Command(exe, withoutGPUs(args)...)
		c.Env = rankEnv(os.Environ(), r, n, addr)
		c.SysProcAttr = rankProcAttr()
		c.Stdin, c.Stdout, c.Stderr = nil, os.Stderr, os.Stderr
		if r == 0 {
			c.Stdout = os.Stdout
		}
		if err := c.Start(); err != nil {
			for _, s := range cmds[:r] {
				s.Process.Kill()
			}
			return failErr(fmt.Errorf("starting rank %d: %w", r, err))
		}
		cmds[r] = c
	}
	// A signal to this process goes to every rank (a closed terminal's
	// SIGHUP too: the ranks would otherwise train on, orphaned).
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, stopSignals...)
	defer signal.Stop(sigs)
	go func() {
		for s := range sigs {
			for _, c := range cmds {
				c.Process.Signal(s)
			}
		}
	}()
	type exit struct {
		rank int
		err  error
	}
	exits := make(chan exit, n)
	for r, c := range cmds {
		go func() { exits <- exit{r, c.Wait()} }()
	}
	var first *exit
	var killer *time.Timer
	for range n {
		e := <-exits
		if e.err != nil && first == nil {
			first = &e
			killer = time.AfterFunc(time.Minute, func() {
				for _, c := range cmds {
					c.Process.Kill()
				}
			})
		}
	}
	if killer != nil {
		killer.Stop()
	}
	if first == nil {
		return nil
	}
	code := exitFailed
	var ee *exec.ExitError
	if errors.As(first.err, &ee) && ee.ExitCode() > 0 {
		code = ee.ExitCode()
	}
	return &exitError{code, fmt.Errorf("rank %d of %d failed (%v); the others stopped with it", first.rank, n, first.err)}
}

// rankEnv is env with rank r's variables set (replacing any of the same
// name); everything else passes unchanged, the NCCL settings included.
func rankEnv(env []string, r, n int, addr string) []string {
	host, port, _ := net.SplitHostPort(addr)
	set := map[string]string{"RANK": strconv.Itoa(r), "WORLD_SIZE": strconv.Itoa(n), "LOCAL_RANK": strconv.Itoa(r),
		"MASTER_ADDR": host, "MASTER_PORT": port}
	out := make([]string, 0, len(env)+len(set))
	for _, kv := range env {
		k, _, _ := strings.Cut(kv, "=")
		if _, ok := set[k]; !ok {
			out = append(out, kv)
		}
	}
	for _, k := range []string{"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"} {
		out = append(out, k+"="+set[k])
	}
	return out
}

// withoutGPUs drops --gpus and its value from a command line.
func withoutGPUs(args []string) []string {
	var out []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		switch {
		case a == "--gpus" || a == "-gpus":
			i++ // its value
		case strings.HasPrefix(a, "--gpus=") || strings.HasPrefix(a, "-gpus="):
		default:
			out = append(out, a)
		}
	}
	return out
}

func freeLoopback() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}
