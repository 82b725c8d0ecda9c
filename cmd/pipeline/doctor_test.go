package main

import (
	"bytes"
	"encoding/json"
	"strings"
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
	if bytes.Contains(out.Bytes(), []byte(`"devices": null`)) { // a list to iterate, even empty
		t.Errorf("devices is null:\n%s", out.String())
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

// TestDoctorSaysTheSearchOnce: missing libraries are listed with the file
// looked for, and where they were looked for is said once, not on every
// line.
func TestDoctorSaysTheSearchOnce(t *testing.T) {
	const search = "searched PIPELINE_CUDA_LIBS, the system loader, CUDA's folders and pip nvidia-* wheels"
	rep := doctorReport{Platform: "linux/amd64", GPU: "unavailable", Trainer: "cpu",
		GPUReason:     "CUDA unavailable: CUDA driver not found (" + search + "; set PIPELINE_CUDA_LIBS to a folder holding libcuda.so.1)",
		TrainerReason: "the GPU is not usable (CUDA unavailable: CUDA driver not found (" + search + "; set PIPELINE_CUDA_LIBS to a folder holding libcuda.so.1)); training on the CPU"}
	for _, l := range [][2]string{{"CUDA driver", "libcuda.so.1"}, {"NVRTC", "libnvrtc.so.13"}} {
		rep.Libraries = append(rep.Libraries, doctorLibrary{Name: l[0], File: l[1],
			Error: "CUDA unavailable: " + l[0] + " not found (" + search + "; set PIPELINE_CUDA_LIBS to a folder holding " + l[1] + ")"})
	}
	var out bytes.Buffer
	rep.print(&out)
	text := out.String()
	for _, want := range []string{"CUDA driver  missing  (libcuda.so.1)\n", "NVRTC        missing  (libnvrtc.so.13)\n",
		"gpu            unavailable: CUDA driver not found\n", "training       cpu: the GPU is not usable (CUDA unavailable: CUDA driver not found); training on the CPU\n"} {
		if !strings.Contains(text, want) {
			t.Errorf("no %q in\n%s", want, text)
		}
	}
	if n := strings.Count(text, search); n != 1 {
		t.Errorf("the search said %d times:\n%s", n, text)
	}
}
