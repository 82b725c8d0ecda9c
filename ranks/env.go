// Package ranks describes and connects the ranks of a data-parallel
// training run. Launchers start one process per GPU and tell each its
// place in environment variables: torchrun and Kubernetes training
// operators set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
// MASTER_PORT; Slurm sets SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID and
// the job's node list. FromEnv reads either; Join connects the ranks over
// TCP through rank 0 (the rendezvous, and small collectives such as the
// loss and the token counts); the gradients themselves go through NCCL on
// the GPU.
package ranks

import (
	"fmt"
	"net"
	"strconv"
	"strings"
)

// DefaultPort is the rendezvous port when the launcher names none, as
// torchrun's.
const DefaultPort = 29500

// Rank is one process's place in a run.
type Rank struct {
	Rank, Size int
	// LocalRank is the rank among the processes of its machine: the GPU
	// it takes.
	LocalRank int
	// Addr is rank 0's rendezvous address, host:port.
	Addr string
	// Launcher says which variables described the rank: torchrun or slurm.
	Launcher string
}

func (r Rank) String() string {
	return fmt.Sprintf("rank %d of %d (local %d, rendezvous %s, from %s)", r.Rank, r.Size, r.LocalRank, r.Addr, r.Launcher)
}

// FromEnv reads the rank from the launcher's variables through getenv
// (os.Getenv). ok is false when none are set: a run of one process.
// torchrun's variables win over Slurm's, as torchrun run under srun sets
// its own. Under torchrun (TORCHELASTIC_RUN_ID set), whose agent holds
// MASTER_PORT, the rendezvous is on MASTER_PORT + 1.
func FromEnv(getenv func(string) string) (r Rank, ok bool, err error) {
	one := func(v string) bool { return v == "" || v == "1" }
	first := func(v string) bool { return v == "" || v == "0" }
	switch {
	case one(getenv("WORLD_SIZE")) && first(getenv("RANK")) && one(getenv("SLURM_NTASKS")):
		// A world of one, or variables left in a shell by an earlier
		// launch: one process, with no rendezvous to wait for.
		return Rank{Size: 1}, false, nil
	case getenv("WORLD_SIZE") != "" || getenv("RANK") != "":
		r.Launcher = "torchrun"
		if r.Rank, err = intVar(getenv, "RANK"); err != nil {
			return r, true, err
		}
		if r.Size, err = intVar(getenv, "WORLD_SIZE"); err != nil {
			return r, true, err
		}
		r.LocalRank = r.Rank
		if getenv("LOCAL_RANK") != "" {
			if r.LocalRank, err = intVar(getenv, "LOCAL_RANK"); err != nil {
				return r, true, err
			}
		}
		host := getenv("MASTER_ADDR")
		if host == "" {
			return r, true, fmt.Errorf("RANK and WORLD_SIZE are set but MASTER_ADDR is not: set it to rank 0's host")
		}
		port, err := portVar(getenv)
		if err != nil {
			return r, true, err
		}
		if getenv("TORCHELASTIC_RUN_ID") != "" {
			// torchrun's agent serves its own store on MASTER_PORT; the
			// ranks meet on the port after it.
			port++
		}
		r.Addr = net.JoinHostPort(host, strconv.Itoa(port))
	case getenv("SLURM_NTASKS") != "" && getenv("SLURM_PROCID") != "":
		r.Launcher = "slurm"
		if r.Rank, err = intVar(getenv, "SLURM_PROCID"); err != nil {
			return r, true, err
		}
		if r.Size, err = intVar(getenv, "SLURM_NTASKS"); err != nil {
			return r, true, err
		}
		if getenv("SLURM_LOCALID") != "" {
			if r.LocalRank, err = intVar(getenv, "SLURM_LOCALID"); err != nil {
				return r, true, err
			}
		}
		host := getenv("MASTER_ADDR")
		if host == "" {
			// The job step's nodes: an srun -N1 step within a larger
			// allocation has its rank 0 on the step's first node.
			name := "SLURM_STEP_NODELIST"
			for _, v := range []string{"SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"} {
				if getenv(v) != "" {
					name = v
					break
				}
			}
			if host, err = FirstHost(getenv(name)); err != nil {
				return r, true, fmt.Errorf("%s: %w", name, err)
			}
		}
		port, err := portVar(getenv)
		if err != nil {
			return r, true, err
		}
		r.Addr = net.JoinHostPort(host, strconv.Itoa(port))
	default:
		return Rank{Size: 1}, false, nil
	}
	switch {
	case r.Size < 1:
		return r, true, fmt.Errorf("%s: a world size of %d; it must be at least 1", r.Launcher, r.Size)
	case r.Rank < 0 || r.Rank >= r.Size:
		return r, true, fmt.Errorf("%s: rank %d is outside a world of %d ranks", r.Launcher, r.Rank, r.Size)
	case r.LocalRank < 0:
		return r, true, fmt.Errorf("%s: local rank %d is negative", r.Launcher, r.LocalRank)
	}
	return r, true, nil
}

func intVar(getenv func(string) string, name string) (int, error) {
	v := getenv(name)
	if v == "" {
		return 0, fmt.Errorf("%s is not set", name)
	}
	n, err := strconv.Atoi(strings.TrimSpace(v))
	if err != nil {
		return 0, fmt.Errorf("%s=%q is not a whole number", name, v)
	}
	return n, nil
}

func portVar(getenv func(string) string) (int, error) {
	if getenv("MASTER_PORT") == "" {
		return DefaultPort, nil
	}
	p, err := intVar(getenv, "MASTER_PORT")
	if err != nil || p < 1 || p > 65535 {
		return 0, fmt.Errorf("MASTER_PORT=%q is not a port number", getenv("MASTER_PORT"))
	}
	return p, nil
}

// FirstHost is the first host of a Slurm node list: "gpu[07-10,12],login1"
// gives gpu07, keeping the zero padding of the range, as `scontrol show
// hostnames` prints it.
func FirstHost(list string) (string, error) {
	list = strings.TrimSpace(list)
	if list == "" {
		return "", fmt.Errorf("empty node list")
	}
	// The first comma outside brackets ends the first entry.
	depth, end := 0, len(list)
	for i, c := range list {
		if c == '[' {
			depth++
		} else if c == ']' {
			depth--
		} else if c == ',' && depth == 0 {
			end = i
			break
		}
	}
	entry := list[:end]
	open := strings.IndexByte(entry, '[')
	if open < 0 {
		return entry, nil
	}
	closing := strings.IndexByte(entry, ']')
	if closing < open {
		return "", fmt.Errorf("node list %q: unbalanced brackets", list)
	}
	first := entry[open+1 : closing]
	if i := strings.IndexByte(first, ','); i >= 0 {
		first = first[:i]
	}
	if i := strings.IndexByte(first, '-'); i >= 0 {
		first = first[:i]
	}
	if first == "" {
		return "", fmt.Errorf("node list %q: an empty range", list)
	}
	return entry[:open] + first + entry[closing+1:], nil
}
