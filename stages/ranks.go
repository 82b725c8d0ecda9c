package stages

import (
	"context"
	"fmt"
	"os"
	"time"

	"gemmaft/pipeline"
	"gemmaft/ranks"
	"gemmaft/trainer"
)

// JoinTimeoutEnv names the variable that sets how long the ranks wait for
// each other to meet (5 minutes by default): longer where a rank's machine
// is slow to start (a container image still pulling).
const JoinTimeoutEnv = "PIPELINE_RANKS_JOIN_TIMEOUT"

// rankGroup is this process's part in a training run over several
// processes; nil when it trains alone.
type rankGroup struct{ g *ranks.Group }

// joinRanks joins the other ranks of the run when the launcher's variables
// say there are some (see package ranks). Every rank must be computing the
// same stage (its key) with the same program.
func joinRanks(ctx context.Context, t *pipeline.Task) (*rankGroup, error) {
	r, ok, err := ranks.FromEnv(os.Getenv)
	if err != nil || !ok || r.Size == 1 {
		return nil, err
	}
	t.Log.Info(fmt.Sprintf("training as rank %d of %d", r.Rank, r.Size), "rendezvous", r.Addr, "launcher", r.Launcher)
	opt := ranks.Options{Token: "stage " + pipeline.ShortKey(t.Key) + ", program " + pipeline.Version(), Log: t.Log}
	if v := os.Getenv(JoinTimeoutEnv); v != "" {
		if opt.JoinTimeout, err = time.ParseDuration(v); err != nil || opt.JoinTimeout <= 0 {
			return nil, fmt.Errorf("$%s=%q: want a duration such as 15m", JoinTimeoutEnv, v)
		}
	}
	g, err := ranks.Join(ctx, r, opt)
	if err != nil {
		return nil, err
	}
	return &rankGroup{g}, nil
}

func (r *rankGroup) trainer() trainer.Group {
	if r == nil {
		return nil
	}
	return r.g
}

func (r *rankGroup) rank() int {
	if r == nil {
		return 0
	}
	return r.g.Rank()
}

// rank0Path is path as rank 0 names it, so that every rank reads the same
// folder (the checkpoints).
func (r *rankGroup) rank0Path(path string) (string, error) {
	if r == nil {
		return path, nil
	}
	b, err := r.g.Broadcast(0, []byte(path))
	return string(b), err
}

func (r *rankGroup) Close() error {
	if r == nil {
		return nil
	}
	return r.g.Close()
}
