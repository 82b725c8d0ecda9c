package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"runtime"
	"runtime/debug"
	"strings"

	"github.com/spf13/cobra"

	"gemmaft/cuda"
	"gemmaft/trainer"
)

func init() {
	var asJSON, requireGPU bool
	cmd := &cobra.Command{
		Use:   "doctor",
		Short: "Show the GPUs, the CUDA libraries and whether they are usable",
		Long: `doctor reports what this machine offers for training: the CUDA libraries
(driver, NVRTC, cuBLASLt) and where each was found or looked for, their
versions, the GPUs with their memory and compute capability, whether the GPU
is usable, and which backend the qlora stage trains with. With a GPU it also
compiles a kernel and runs a small matrix product as a self-test.

Libraries are searched in ` + cuda.LibsEnv + ` (folders separated by colons),
the system loader's path, CUDA's default folders and the lib folders of
pip-installed nvidia-* wheels.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			rep := diagnose()
			if asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				if err := enc.Encode(rep); err != nil {
					return failErr(err)
				}
			} else {
				rep.print(cmd.OutOrStdout())
			}
			if requireGPU && rep.GPU != "usable" {
				return failErr(fmt.Errorf("no usable GPU: %s", rep.GPUReason))
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the report as JSON")
	cmd.Flags().BoolVar(&requireGPU, "require-gpu", false, "exit 1 unless a GPU is usable")
	root.AddCommand(cmd)
}

type doctorLibrary struct {
	Name    string   `json:"name"`
	Found   bool     `json:"found"`
	Path    string   `json:"path,omitempty"`
	Via     string   `json:"via,omitempty"`
	Version string   `json:"version,omitempty"`
	Tried   []string `json:"tried,omitempty"`
	Error   string   `json:"error,omitempty"`
	File    string   `json:"file,omitempty"` // looked for and not found
}

type doctorDevice struct {
	cuda.DeviceInfo
	FreeMemory int64 `json:"FreeMemory,omitempty"`
}

type doctorReport struct {
	Platform      string          `json:"platform"`
	CgoEnabled    bool            `json:"cgo_enabled"`
	DriverVersion string          `json:"driver_cuda_version,omitempty"`
	Libraries     []doctorLibrary `json:"libraries"`
	Devices       []doctorDevice  `json:"devices"`
	KernelCache   string          `json:"kernel_cache,omitempty"`
	SelfTest      []string        `json:"self_test,omitempty"`
	GPU           string          `json:"gpu"` // "usable" or "unavailable"
	GPUReason     string          `json:"gpu_reason"`
	// Trainer is the backend the qlora stage trains with.
	Trainer       string `json:"trainer"`
	TrainerReason string `json:"trainer_reason"`
}

// diagnose gathers the report; it never fails, it says what is missing.
func diagnose() doctorReport {
	rep := doctorReport{Platform: runtime.GOOS + "/" + runtime.GOARCH + ", " + runtime.Version(), GPU: "unavailable"}
	// The qlora stage's backend: auto resolves here exactly as it does there.
	if b, note, err := trainer.ResolveBackend("auto"); err != nil {
		rep.Trainer, rep.TrainerReason = "none", err.Error()
	} else {
		rep.Trainer, rep.TrainerReason = b.Name(), strings.TrimPrefix(note, "auto: ")
	}
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			if s.Key == "CGO_ENABLED" {
				rep.CgoEnabled = s.Value == "1"
			}
		}
	}
	found := cuda.Discover()
	if found.DriverVersion > 0 {
		rep.DriverVersion = fmt.Sprintf("%d.%d", found.DriverVersion/1000, found.DriverVersion%1000/10)
	}
	// NCCL matters only for training on several GPUs: missing, it is
	// reported, and the GPU stays usable.
	for _, l := range append(found.Libraries(), *cuda.LoadNCCL()) {
		dl := doctorLibrary{Name: l.Name, Found: l.Found(), Path: l.Path, Via: l.Via, Version: l.Version, Tried: l.Tried}
		if l.Err != nil {
			dl.Error = l.Err.Error()
		}
		var nf *cuda.NotFoundError
		if errors.As(l.Err, &nf) {
			dl.File = nf.File
		}
		rep.Libraries = append(rep.Libraries, dl)
	}
	rep.Devices = []doctorDevice{} // [] in the JSON where there is none, not null
	for _, d := range found.Devices {
		rep.Devices = append(rep.Devices, doctorDevice{DeviceInfo: d})
	}
	if dir, err := cuda.DefaultKernelCacheDir(); err == nil {
		rep.KernelCache = dir
	}
	if found.Err != nil {
		rep.GPUReason = found.Err.Error()
		return rep
	}
	if err := selfTest(&rep); err != nil {
		rep.GPUReason = "the GPU self-test failed: " + err.Error()
		return rep
	}
	d := rep.Devices[0]
	rep.GPU = "usable"
	rep.GPUReason = fmt.Sprintf("device 0, %s (%s, %.1f GiB)", d.Name, d.ComputeCapLabel, gib(d.TotalMemory))
	return rep
}

// selfTest opens device 0, reads its free memory and runs cuda.SelfTest:
// a kernel compiles and runs, and cuBLASLt multiplies correctly, the three
// things training needs.
func selfTest(rep *doctorReport) error {
	dev, err := cuda.Open(0)
	if err != nil {
		return err
	}
	defer dev.Close()
	return dev.Do(func(c *cuda.Ctx) error {
		free, _, err := c.MemInfo()
		if err != nil {
			return err
		}
		rep.Devices[0].FreeMemory = free
		passed, err := cuda.SelfTest(c)
		rep.SelfTest = append(rep.SelfTest, passed...)
		return err
	})
}

func gib(b int64) float64 { return float64(b) / (1 << 30) }

func (r doctorReport) print(w io.Writer) {
	p := func(format string, args ...any) { fmt.Fprintf(w, format, args...) }
	cgo := "disabled"
	if r.CgoEnabled {
		cgo = "enabled"
	}
	p("platform       %s, cgo %s\n", r.Platform, cgo)
	if r.DriverVersion != "" {
		p("driver         supports CUDA %s\n", r.DriverVersion)
	}
	p("\nCUDA libraries\n")
	var hints []string // of the missing libraries: where the search went, said once
	for _, l := range r.Libraries {
		switch {
		case l.Found:
			p("  %-12s %-8s %s (%s)\n", l.Name, l.Version, l.Path, l.Via)
		case l.File != "":
			p("  %-12s missing  (%s)\n", l.Name, l.File)
			hints = append(hints, cuda.SearchHint(l.File))
		default:
			p("  %-12s missing  %s\n", l.Name, strings.TrimPrefix(l.Error, cuda.ErrUnavailable.Error()+": "))
		}
		for _, t := range l.Tried {
			p("  %-12s          skipped %s\n", "", t)
		}
	}
	if len(hints) > 0 {
		p("  searched %s; set %s to the folder holding the missing ones\n", cuda.Searched, cuda.LibsEnv)
	}
	brief := func(reason string) string { // the search is said above
		reason = strings.TrimPrefix(reason, cuda.ErrUnavailable.Error()+": ")
		for _, h := range hints {
			reason = strings.ReplaceAll(reason, h, "")
		}
		return reason
	}
	p("\nDevices\n")
	if len(r.Devices) == 0 {
		p("  none\n")
	}
	for _, d := range r.Devices {
		mem := fmt.Sprintf("%.1f GiB", gib(d.TotalMemory))
		if d.FreeMemory > 0 {
			mem = fmt.Sprintf("%.1f GiB (%.1f GiB free)", gib(d.TotalMemory), gib(d.FreeMemory))
		}
		p("  %d  %s  compute %d.%d (%s), %d SMs, %s, L2 %d MiB\n",
			d.Ordinal, d.Name, d.Major, d.Minor, d.ComputeCapLabel, d.SMs, mem, d.L2Bytes>>20)
	}
	if r.KernelCache != "" {
		p("\nkernel cache   %s (compiled kernels; $%s moves it)\n", r.KernelCache, cuda.KernelCacheEnv)
	}
	if len(r.SelfTest) > 0 {
		p("self-test\n")
		for _, s := range r.SelfTest {
			p("  %s\n", s)
		}
	}
	if r.GPU == "usable" {
		p("\ngpu            usable: %s\n", r.GPUReason)
	} else {
		p("\ngpu            unavailable: %s\n", brief(r.GPUReason))
	}
	p("training       %s: %s\n", r.Trainer, brief(r.TrainerReason))
}
