#!/usr/bin/env python3
"""Compares package cuda with PyTorch on the same GPU, in one process tree.

Runs PyTorch, then our Go benchmarks (the cuda test binary), then PyTorch
again, so the two PyTorch runs show the spread between identical runs.
Targets: a bf16 8192x8192x8192 GEMM through our cuBLASLt path at >= 95% of
torch.matmul's TFLOP/s (against the better PyTorch run), a 1 GiB
device-to-device copy at >= 90% of PyTorch's bandwidth (bytes read plus
bytes written). Kernel launch cost from Go is reported as measured: the
host's time per cuLaunchKernel through purego, and the device's time per
empty kernel launched back to back and replayed as a CUDA graph.

Every device timing is the median of per-iteration CUDA event intervals
after a warm-up, on random data (never zeros). Exit status 1 when a target
is missed.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

import torch

N = 8192
COPY_BYTES = 1 << 30


def median_ms(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(iters + 1)]
    events[0].record()
    for i in range(1, iters + 1):
        fn()
        events[i].record()
    events[-1].synchronize()
    ms = sorted(events[i - 1].elapsed_time(events[i]) for i in range(1, iters + 1))
    return ms[iters // 2]


def torch_run(iters):
    a = torch.rand(N, N, device="cuda", dtype=torch.bfloat16) * 2 - 1
    b = torch.rand(N, N, device="cuda", dtype=torch.bfloat16) * 2 - 1
    c = torch.empty(N, N, device="cuda", dtype=torch.bfloat16)
    ms = median_ms(lambda: torch.matmul(a, b, out=c), 5, iters)
    gemm = 2 * N**3 / (ms * 1e-3) / 1e12
    del a, b, c
    src = torch.randint(1, 255, (COPY_BYTES,), device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), 3, iters)
    copy = 2 * COPY_BYTES / (ms * 1e-3) / 1e9
    del src, dst
    x = torch.ones(1, device="cuda")
    for _ in range(100):
        x.add_(1)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(1000):
        x.add_(1)
    host_us = (time.perf_counter() - start) / 1000 * 1e6
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return {"gemm_tflops": gemm, "copy_gbs": copy, "host_us_per_op": host_us}


METRIC = re.compile(r"([0-9.eE+-]+) ([A-Za-z/_-]+)")


def go_run(binary, iters):
    out = subprocess.run(
        [binary, "-test.run", "^$", "-test.bench", "Matmul|Copy|Launch|Do$", "-test.benchtime", f"{iters}x"],
        capture_output=True, text=True, check=False)
    sys.stdout.write(out.stdout[-4000:])
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-4000:])
        raise SystemExit(f"{binary} exited {out.returncode}")
    res = {}
    for line in out.stdout.splitlines():
        if not line.startswith("Benchmark"):
            continue
        name = line.split()[0].split("-")[0]
        res[name] = {unit: float(v) for v, unit in METRIC.findall(line)}
    return res


def c_launch_ns():
    """Host ns per cuLaunchKernel from C (bench-launch.cu), or None without nvcc."""
    here = os.path.dirname(os.path.abspath(__file__))
    src = os.path.join(here, "bench-launch.cu")
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    if not nvcc or not os.path.exists(src):
        return None
    exe = "/tmp/bench-launch"
    try:
        subprocess.run([nvcc, "-O2", "-arch=sm_90", src, "-lcuda", "-o", exe], check=True)
        out = subprocess.run([exe], capture_output=True, text=True, check=True).stdout
        return float(out.split()[-1])
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError) as e:
        print(f"C launch baseline failed: {e}")
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--go-test", required=True, help="the cuda package's test binary")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--json", help="write the numbers here")
    args = ap.parse_args()

    dev = torch.cuda.get_device_name()
    t1 = torch_run(args.iters)
    ours = go_run(args.go_test, args.iters)
    t2 = torch_run(args.iters)
    c_ns = c_launch_ns()

    gemm = ours["BenchmarkMatmulBF16_8192"]["TFLOP/s"]
    copy = ours["BenchmarkCopyDtoD_1GiB"]["GB/s"]
    launch = ours["BenchmarkLaunch"]
    graph = ours["BenchmarkLaunchGraph"]
    torch_gemm = max(t1["gemm_tflops"], t2["gemm_tflops"])
    torch_copy = max(t1["copy_gbs"], t2["copy_gbs"])
    checks = [
        ("bf16 GEMM 8192^3", "TFLOP/s", gemm, t1["gemm_tflops"], t2["gemm_tflops"], gemm / torch_gemm, 0.95),
        ("D2D copy 1 GiB", "GB/s", copy, t1["copy_gbs"], t2["copy_gbs"], copy / torch_copy, 0.90),
    ]
    print(f"\ndevice: {dev}, torch {torch.__version__}")
    print(f"{'measure':<20} {'ours':>10} {'torch #1':>10} {'torch #2':>10} {'ratio':>7} {'target':>7}")
    ok = True
    for name, unit, o, a, b, ratio, target in checks:
        verdict = "ok" if ratio >= target else "MISSED"
        ok &= ratio >= target
        print(f"{name:<20} {o:>10.1f} {a:>10.1f} {b:>10.1f} {ratio:>7.3f} {'>=' + str(target):>7} {unit} {verdict}")
    print(f"launch from Go: {launch['host-ns/launch']:.0f} ns host time per cuLaunchKernel; "
          f"empty kernels back to back {launch['device-us/kernel']:.2f} us each on the device, "
          f"{graph['device-us/kernel']:.2f} us each replayed as a CUDA graph "
          f"(PyTorch eager: {min(t1['host_us_per_op'], t2['host_us_per_op']):.1f} us host time per tiny op)")
    if "BenchmarkDo" in ours:
        print(f"Device.Do hand-off to the device thread and back: {ours['BenchmarkDo']['ns/Do']:.0f} ns")
    if c_ns is not None:
        print(f"cuLaunchKernel from C, same kernel and stream: {c_ns:.0f} ns host time per launch "
              f"(purego and the Go side add {launch['host-ns/launch'] - c_ns:.0f} ns)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": dev, "torch": [t1, t2], "ours": ours, "c_launch_ns": c_ns}, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
