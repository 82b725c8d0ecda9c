package ranks

import (
	"strings"
	"testing"
)

func envOf(kv ...string) func(string) string {
	m := map[string]string{}
	for i := 0; i < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	return func(k string) string { return m[k] }
}

func TestFromEnv(t *testing.T) {
	for _, c := range []struct {
		name string
		env  func(string) string
		want Rank
		ok   bool
		err  string
	}{
		{"none", envOf(), Rank{Size: 1}, false, ""},
		{"torchrun", envOf("RANK", "3", "WORLD_SIZE", "8", "LOCAL_RANK", "1", "MASTER_ADDR", "node07", "MASTER_PORT", "29400"),
			Rank{Rank: 3, Size: 8, LocalRank: 1, Addr: "node07:29400", Launcher: "torchrun"}, true, ""},
		{"torchrun, default port and local rank", envOf("RANK", "1", "WORLD_SIZE", "2", "MASTER_ADDR", "127.0.0.1"),
			Rank{Rank: 1, Size: 2, LocalRank: 1, Addr: "127.0.0.1:29500", Launcher: "torchrun"}, true, ""},
		{"torchrun's agent holds MASTER_PORT", envOf("RANK", "1", "WORLD_SIZE", "2", "MASTER_ADDR", "h", "MASTER_PORT", "29500", "TORCHELASTIC_RUN_ID", "none"),
			Rank{Rank: 1, Size: 2, LocalRank: 1, Addr: "h:29501", Launcher: "torchrun"}, true, ""},
		{"torchrun under srun wins", envOf("RANK", "0", "WORLD_SIZE", "2", "MASTER_ADDR", "a", "SLURM_PROCID", "5", "SLURM_NTASKS", "9"),
			Rank{Rank: 0, Size: 2, Addr: "a:29500", Launcher: "torchrun"}, true, ""},
		{"slurm", envOf("SLURM_PROCID", "5", "SLURM_NTASKS", "8", "SLURM_LOCALID", "1", "SLURM_JOB_NODELIST", "gpu[07-10,12],login1", "MASTER_PORT", "12345"),
			Rank{Rank: 5, Size: 8, LocalRank: 1, Addr: "gpu07:12345", Launcher: "slurm"}, true, ""},
		{"slurm with MASTER_ADDR", envOf("SLURM_PROCID", "0", "SLURM_NTASKS", "2", "SLURM_NODELIST", "n1,n2", "MASTER_ADDR", "10.0.0.5"),
			Rank{Rank: 0, Size: 2, Addr: "10.0.0.5:29500", Launcher: "slurm"}, true, ""},
		{"no master", envOf("RANK", "0", "WORLD_SIZE", "2"), Rank{}, true, "MASTER_ADDR is not"},
		{"rank outside", envOf("RANK", "2", "WORLD_SIZE", "2", "MASTER_ADDR", "a"), Rank{}, true, "outside a world of 2"},
		{"not a number", envOf("RANK", "one", "WORLD_SIZE", "2", "MASTER_ADDR", "a"), Rank{}, true, `RANK="one"`},
		{"bad port", envOf("RANK", "0", "WORLD_SIZE", "2", "MASTER_ADDR", "a", "MASTER_PORT", "70000"), Rank{}, true, "not a port"},
		{"world only", envOf("WORLD_SIZE", "2", "MASTER_ADDR", "a"), Rank{}, true, "RANK is not set"},
		{"slurm without nodes", envOf("SLURM_PROCID", "0", "SLURM_NTASKS", "2"), Rank{}, true, "empty node list"},
		{"slurm step within a larger allocation", envOf("SLURM_PROCID", "1", "SLURM_NTASKS", "2", "SLURM_JOB_NODELIST", "gpu[01-02]", "SLURM_STEP_NODELIST", "gpu02"),
			Rank{Rank: 1, Size: 2, Addr: "gpu02:29500", Launcher: "slurm"}, true, ""},
		// A world of one, or what an earlier launch left in a shell: one
		// process, no rendezvous.
		{"world of one", envOf("RANK", "0", "WORLD_SIZE", "1", "MASTER_ADDR", "a"), Rank{Size: 1}, false, ""},
		{"world of one, no master", envOf("RANK", "0", "WORLD_SIZE", "1"), Rank{Size: 1}, false, ""},
		{"rank 0 left alone", envOf("RANK", "0"), Rank{Size: 1}, false, ""},
		{"world of one left alone", envOf("WORLD_SIZE", "1"), Rank{Size: 1}, false, ""},
		{"slurm, one task", envOf("SLURM_PROCID", "0", "SLURM_NTASKS", "1", "SLURM_JOB_NODELIST", "n1"), Rank{Size: 1}, false, ""},
		{"rank 1 without a world", envOf("RANK", "1", "MASTER_ADDR", "a"), Rank{}, true, "WORLD_SIZE is not set"},
	} {
		t.Run(c.name, func(t *testing.T) {
			got, ok, err := FromEnv(c.env)
			if c.err != "" {
				if err == nil || !strings.Contains(err.Error(), c.err) {
					t.Fatalf("error %v, want one saying %q", err, c.err)
				}
				return
			}
			if err != nil || ok != c.ok || got != c.want {
				t.Errorf("got %+v, %v, %v; want %+v, %v", got, ok, err, c.want, c.ok)
			}
		})
	}
}

func TestFirstHost(t *testing.T) {
	for list, want := range map[string]string{
		"node1":                   "node1",
		"node1,node2":             "node1",
		"gpu[07-10,12],login1":    "gpu07",
		"gpu[3,5-6]":              "gpu3",
		"rack1-[001-004]-ib":      "rack1-001-ib",
		" a[1-2],b[3-4] ":         "a1",
		"login,gpu[1-4]":          "login",
		"x-[0002-0004,0010]-y,z1": "x-0002-y",
	} {
		if got, err := FirstHost(list); err != nil || got != want {
			t.Errorf("FirstHost(%q) = %q, %v; want %q", list, got, err, want)
		}
	}
	for _, bad := range []string{"", "a]1[", "n[]"} {
		if got, err := FirstHost(bad); err == nil {
			t.Errorf("FirstHost(%q) = %q, want an error", bad, got)
		}
	}
}
