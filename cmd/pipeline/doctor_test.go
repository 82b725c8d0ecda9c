package main

import (
	"bytes"
	"encoding/json"
	"testing"

	"gemmaft/cuda"
)

// doctor must report and exit 0 whatever the machine has; --require-gpu
// turns "no GPU" into exit 1.
func TestDoctor(t *testing.T) {
	var out bytes.Buffer
	root.SetOut(&out)
	defer root.SetOut(nil)
	if code := execute([]string{"doctor", "--json"}); code != exitOK {
		t.Fatalf("doctor exited %d", code)
	}
	var rep doctorReport
	if err := json.Unmarshal(out.Bytes(), &rep); err != nil {
		t.Fatalf("doctor --json printed invalid JSON: %v\n%s", err, out.String())
	}
	if len(rep.Libraries) != 4 || rep.Libraries[3].Name != "NCCL" || rep.GPUReason == "" || rep.Trainer != "cpu" {
		t.Errorf("incomplete report: %+v", rep)
	}
	gpu := cuda.Discover().Err == nil
	if gpu != (rep.GPU == "usable") {
		t.Errorf("gpu %q, but Discover says GPU usable = %v (%s)", rep.GPU, gpu, rep.GPUReason)
	}
	want := exitOK
	if rep.GPU != "usable" {
		want = exitFailed
	}
	out.Reset()
	if code := execute([]string{"doctor", "--require-gpu"}); code != want {
		t.Errorf("doctor --require-gpu exited %d, want %d", code, want)
	}
}
