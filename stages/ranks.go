package stages

import (
	"context"
	"os"

	"gemmaft/dist"
	"gemmaft/pipeline"
	"gemmaft/trainer"
)

// ranks is this process's part in a training run over several processes,
// nil when it trains alone.
type ranks struct{ g *dist.Group }

// joinRanks joins the other ranks of the run when the launcher's variables
// say there are some (see package dist). Every rank must be computing the
// same stage (its key) with the same program.
func joinRanks(ctx context.Context, t *pipeline.Task) (*ranks, error) {
	r, ok, err := dist.FromEnv(os.Getenv)
	if err != nil || !ok || r.Size == 1 {
		return nil, err
	}
	t.Log.Info("training with other ranks", "rank", r.Rank, "ranks", r.Size, "rendezvous", r.Addr, "launcher", r.Launcher)
	g, err := dist.Join(ctx, r, dist.Options{Token: "stage " + pipeline.ShortKey(t.Key) + ", program " + pipeline.Version()})
	if err != nil {
		return nil, err
	}
	return &ranks{g}, nil
}

func (r *ranks) trainer() trainer.Group {
	if r == nil {
		return nil
	}
	return r.g
}

func (r *ranks) rank() int {
	if r == nil {
		return 0
	}
	return r.g.Rank()
}

// rank0Path is path as rank 0 names it, so that every rank reads the same
// folder (the checkpoints).
func (r *ranks) rank0Path(path string) (string, error) {
	if r == nil {
		return path, nil
	}
	b, err := r.g.Broadcast(0, []byte(path))
	return string(b), err
}

func (r *ranks) Close() error {
	if r == nil {
		return nil
	}
	return r.g.Close()
}
