#!/usr/bin/env bash
# Runs on a GPU machine, in one call: `pipeline bench generate` and
# transformers' generate (scripts/bench-generate-hf.py) on the same shapes,
# bf16 weights, greedy, 128-token prompts and 128 new tokens, at batch 1 and
# 16, and prints both, their ratio, and ours against the memory-bandwidth
# bound (the weights read once a step).
#
#   scripts/bench-generate.sh [PIPELINE] [PRESETS...]      e.g. bin/gpu/pipeline 1b 12b
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
pipeline=${1:-bin/pipeline}
shift || true
presets=("${@:-1b 12b}")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
printf '%-6s %5s %12s %12s %8s %12s %8s %9s %9s\n' preset batch "ours tok/s" "HF tok/s" ratio "bound tok/s" "of bound" "ours GiB" "HF GiB"
for p in ${presets[@]}; do
	for b in 1 16; do
		"$pipeline" bench generate --preset "$p" --batch-size $b --json ${BENCH_FLAGS:-} >"$tmp/ours.json"
		python3 "$here/bench-generate-hf.py" --preset "$p" --batch-size $b >"$tmp/hf.json"
		python3 - "$tmp/ours.json" "$tmp/hf.json" <<'PY'
import json, sys
o, h = (json.loads(open(f).read().strip().splitlines()[-1]) for f in sys.argv[1:3])
of = o["decode_tokens_per_sec"] / o["bound_tokens_per_sec"] if o.get("bound_tokens_per_sec") else float("nan")
print(f"{o['preset']:<6} {o['batch_size']:5d} {o['tokens_per_sec']:12.1f} {h['tokens_per_sec']:12.1f} {o['tokens_per_sec']/h['tokens_per_sec']:7.1f}x "
      f"{o.get('bound_tokens_per_sec', 0):12.0f} {100*of:7.0f}% {o['peak_gib']:9.2f} {h['peak_gib']:9.2f}")
print("  ours:", json.dumps(o))
print("  HF:  ", json.dumps(h))
PY
	done
done
