#!/usr/bin/env bash
# Runs on a GPU machine, in one call: `pipeline bench train` and Hugging Face
# transformers + PEFT (scripts/bench-train-hf.py) on the same shapes and the
# same packed rows, one preset after the other, and prints both and their
# ratio. Both measure peak memory as the device memory in use at the end of
# their run (context included), tokens/s over the median step.
#
#   scripts/bench-train.sh [PIPELINE] [PRESETS...]      e.g. bin/gpu/pipeline 1b 12b
#
# Batch 2 at seq 4096 (27b: batch 1), one micro-batch a step, 2 warm-up and
# 5 timed steps. Ours plans within the device memory each preset is meant
# to fit in (--gpu-memory: 1b 4 GiB, 4b 8, 12b 13, 27b 20), so it lays
# itself out as it would on a card of that size, offloading what does not
# fit. Extra flags for pipeline go in BENCH_FLAGS (a --gpu-memory there
# wins).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
pipeline=${1:-bin/pipeline}
shift || true
presets=("${@:-1b 12b}")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
printf '%-6s %12s %12s %8s %10s %10s %10s %8s %6s\n' preset "ours tok/s" "HF tok/s" ratio "ours GiB" "planned" "HF GiB" MFU HFU
for p in ${presets[@]}; do
	batch=2
	[ "$p" = 27b ] && batch=1
	case $p in 1b) mem=4 ;; 4b) mem=8 ;; 12b) mem=13 ;; 27b) mem=20 ;; *) mem=0 ;; esac
	"$pipeline" bench train --preset "$p" --seq-len 4096 --batch-size $batch --steps 5 --warmup-steps 2 \
		--gpu-memory $mem --save-rows "$tmp/rows-$p.jsonl" --json ${BENCH_FLAGS:-} >"$tmp/ours-$p.json"
	python3 "$here/bench-train-hf.py" --preset "$p" --rows "$tmp/rows-$p.jsonl" --batch-size $batch --steps 5 \
		--warmup-steps 2 >"$tmp/hf-$p.json"
	python3 - "$tmp/ours-$p.json" "$tmp/hf-$p.json" <<'PY'
import json, sys
o, h = (json.loads(open(f).read().strip().splitlines()[-1]) for f in sys.argv[1:3])
print(f"{o['preset']:<6} {o['tokens_per_sec']:12.0f} {h['tokens_per_sec']:12.0f} {o['tokens_per_sec']/h['tokens_per_sec']:7.2f}x "
      f"{o['peak_gib']:10.2f} {o.get('planned_gib', 0):10.2f} {h['peak_gib']:10.2f} {100*o['mfu']:7.1f}% {100*o['hfu']:5.1f}%")
print("  ours:", json.dumps(o))
print("  HF:  ", json.dumps(h))
PY
done
