#!/usr/bin/env bash
# Runs on a GPU machine: `pipeline bench generate` with each build that
# scripts/ab-build.sh packed beside this script, the builds alternating
# within each round so that the card's drift reaches all of them alike,
# and prints each build's tokens/s by run, their median, and the median's
# ratio to the first build's (the baseline). First, unless TESTS=0, the
# last build's decoding tests: its registers (TestTokenKernelRegisters),
# then TESTS_RUN's GPU tests (default: the one-launch step, NF4 and
# greedy decoding against transformers, greedy steps queued ahead), run from the repository's
# package folders as go test runs them.
#
#   bin/ab/ab-generate.sh
#   ROUNDS=3 BATCH=16 CONFIGS="--preset 12b --quantize nf4;--preset 1b" bin/ab/ab-generate.sh
#
# CONFIGS: bench generate flags per configuration, separated by ";"
# (default: 12B and 1B, NF4 and bf16 weights). ROUNDS (default 2): runs of
# each build a configuration. BATCH (default 1). Raw results go to
# $AB_LOG when it is set (one TSV line a run).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tar -C "$tmp" -xJf "$here/builds.tar.xz"
mapfile -t builds <"$tmp/builds/names.txt"
export PIPELINE_KERNEL_CACHE=${PIPELINE_KERNEL_CACHE:-$tmp/kernels} # shared: kernels that did not change compile once
log=${AB_LOG:-$tmp/runs.tsv}
: >"$log"
IFS=';' read -ra configs <<<"${CONFIGS:---preset 12b --quantize nf4;--preset 12b;--preset 1b --quantize nf4;--preset 1b}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,power.limit --format=csv,noheader
repo=$(cd "$here/../.." && pwd)
if [ "${TESTS:-1}" != 0 ] && [ -x "$tmp/builds/gpu.test" ]; then
	echo "tests of ${builds[-1]}:"
	(cd "$repo/trainer/gpu/kernels" && "$tmp/builds/kernels.test" -test.run '^TestTokenKernelRegisters$' -test.v 2>&1 | grep -E 'registers|^(--- |ok|FAIL|PASS)') || echo "registers: exit status $?"
	(cd "$repo/trainer/gpu" && timeout "${TESTS_TIMEOUT:-300}" "$tmp/builds/gpu.test" -test.v \
		-test.run "${TESTS_RUN:-^(TestTokenKernelOnGPU|TestNF4DecodingOnGPU|TestGreedyDecodingOnGPU|TestTokenStepsQueuedAhead)\$}" 2>&1 |
		grep -E 'relative RMS|new tokens as|^(--- |ok|FAIL|PASS|panic)|Error') || echo "tests: exit status $?"
fi
for config in "${configs[@]}"; do
	for round in $(seq "${ROUNDS:-2}"); do
		for b in "${builds[@]}"; do
			# shellcheck disable=SC2086 # the configuration's flags split on spaces
			if json=$("$tmp/builds/$b" bench generate --json --batch-size "${BATCH:-1}" $config 2>"$tmp/stderr"); then
				tps=$(printf '%s\n' "$json" | sed -n 's/.*"tokens_per_sec":\([0-9.eE+-]*\).*/\1/p')
			else
				tps=failed
				sed 's/^/  /' "$tmp/stderr" | tail -5 >&2
			fi
			printf '%s\t%s\t%s\t%s\n' "$config" "$b" "$round" "$tps" >>"$log"
		done
	done
done
python3 - "$log" "${builds[@]}" <<'PY'
import statistics, sys
log, builds = sys.argv[1], sys.argv[2:]
runs = {}  # configuration -> build -> tokens/s of each run ("failed" kept)
for line in open(log):
    config, build, _, tps = line.rstrip("\n").split("\t")
    runs.setdefault(config, {}).setdefault(build, []).append(tps)
print(f"{'configuration':34} {'build':28} {'tokens/s by run':30} {'median':>9} {'vs base':>8}")
for config, by in runs.items():
    medians = {b: statistics.median(ok) if (ok := [float(v) for v in by.get(b, []) if v != "failed"]) else None for b in builds}
    base = medians[builds[0]]
    for b in builds:
        shown = ", ".join(v if v == "failed" else f"{float(v):.1f}" for v in by.get(b, []))
        med = f"{medians[b]:.1f}" if medians[b] else "-"
        ratio = f"{medians[b] / base:.3f}" if medians[b] and base else "-"
        print(f"{config:34} {b:28} {shown:30} {med:>9} {ratio:>8}")
PY
