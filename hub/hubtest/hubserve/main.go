// Command hubserve runs the test Hub of package hubtest on loopback
// addresses, serving folders as repositories, for checks that drive other
// Hugging Face clients (huggingface_hub, transformers) against it on
// machines without Go:
//
//	hubserve -repo model/ORG/NAME=DIR -repo dataset/ORG/NAME=DIR
//
// Each folder's files (recursively) become the first commit of its
// repository's main. It prints one JSON line, {"endpoint": URL, "commits":
// {"model/ORG/NAME": SHA, ...}}, then serves until standard input closes or
// it is interrupted.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"gemmaft/hub/hubtest"
)

type repoFlags []string

func (r *repoFlags) String() string     { return strings.Join(*r, ",") }
func (r *repoFlags) Set(v string) error { *r = append(*r, v); return nil }

func main() {
	var repos repoFlags
	var gated repoFlags
	flag.Var(&repos, "repo", "TYPE/ORG/NAME=DIR: serve DIR's files as a repository (repeatable)")
	flag.Var(&gated, "gated", "TYPE/ORG/NAME: make a repository gated (repeatable)")
	flag.Parse()
	srv := hubtest.New()
	defer srv.Close()
	commits := map[string]string{}
	for _, spec := range repos {
		name, dir, ok := strings.Cut(spec, "=")
		typ, id, ok2 := strings.Cut(name, "/")
		if !ok || !ok2 || strings.Count(id, "/") != 1 {
			fail(fmt.Errorf("-repo %q: want TYPE/ORG/NAME=DIR", spec))
		}
		files := map[string][]byte{}
		err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
			if err != nil || d.IsDir() {
				return err
			}
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			rel, _ := filepath.Rel(dir, p)
			files[filepath.ToSlash(rel)] = b
			return nil
		})
		if err != nil {
			fail(err)
		}
		r := srv.AddRepo(typ, id)
		for _, g := range gated {
			if g == name {
				r.SetGated(true)
			}
		}
		commits[name] = r.Commit("main", files)
	}
	json.NewEncoder(os.Stdout).Encode(map[string]any{"endpoint": srv.URL, "commits": commits})
	done := make(chan struct{})
	go func() { io.Copy(io.Discard, os.Stdin); close(done) }()
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	select {
	case <-done:
	case <-sig:
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "hubserve:", err)
	os.Exit(2)
}
