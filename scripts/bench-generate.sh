#!/usr/bin/env bash
# Runs on a GPU machine, in one call: transformers' generate
# (scripts/bench-generate-hf.py, bf16 weights) and `pipeline bench generate`
# with each base form in QUANTIZE (default "none nf4": bf16 weights, and an
# NF4 base as the generate stage holds a QLoRA one) on the same shapes,
# greedy, 128-token prompts and 128 new tokens, at each batch size in
# BATCHES (default "1 16"); prints a row per form with transformers' number
# of that shape, the ratio, and ours against the memory-bandwidth bound of
# the form the steps read. TOKEN_KERNEL="off on" runs each form both ways
# (PIPELINE_TOKEN_KERNEL: steps of one token as one launch, the pipeline's
# default, or a launch per operation). SAMPLE="TEMPERATURE TOP_K TOP_P"
# (e.g. "1 64 0.95", Gemma 3's generation_config.json) has both sides
# sample instead of decoding greedily. LORA_RANK=N puts an adapter of rank N on
# all seven projections on both sides (PEFT on transformers').
#
#   scripts/bench-generate.sh [PIPELINE] [PRESETS...]      e.g. bin/gpu/pipeline 1b 12b
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
pipeline=${1:-bin/pipeline}
shift || true
presets=("${@:-1b 12b}")
sample="" # both sides take the same flags
if [ -n "${SAMPLE:-}" ]; then
	read -r temperature top_k top_p <<<"$SAMPLE"
	sample="--temperature $temperature --top-k $top_k --top-p $top_p"
fi
if [ -n "${LORA_RANK:-}" ]; then
	sample="$sample --lora-rank $LORA_RANK"
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
printf '%-6s %5s %-7s %-6s %12s %12s %8s %12s %8s %9s %9s\n' preset batch weights launch "ours tok/s" "HF tok/s" ratio "bound tok/s" "of bound" "ours GiB" "HF GiB"
for p in ${presets[@]}; do
	for b in ${BATCHES:-1 16}; do
		python3 "$here/bench-generate-hf.py" --preset "$p" --batch-size $b $sample >"$tmp/hf.json"
		for q in ${QUANTIZE:-none nf4}; do
			for tk in ${TOKEN_KERNEL:-default}; do
				if [ "$tk" = default ]; then
					"$pipeline" bench generate --preset "$p" --batch-size $b --quantize "$q" --json $sample ${BENCH_FLAGS:-} >"$tmp/ours.json"
				else
					PIPELINE_TOKEN_KERNEL=$tk "$pipeline" bench generate --preset "$p" --batch-size $b --quantize "$q" --json $sample ${BENCH_FLAGS:-} >"$tmp/ours.json"
				fi
				python3 - "$tmp/ours.json" "$tmp/hf.json" <<'PY'
import json, sys
o, h = (json.loads(open(f).read().strip().splitlines()[-1]) for f in sys.argv[1:3])
of = o["decode_tokens_per_sec"] / o["bound_tokens_per_sec"] if o.get("bound_tokens_per_sec") else float("nan")
launch = "one" if o.get("token_kernel_steps") else "per-op"
print(f"{o['preset']:<6} {o['batch_size']:5d} {o['weights']:<7} {launch:<6} {o['tokens_per_sec']:12.1f} {h['tokens_per_sec']:12.1f} "
      f"{o['tokens_per_sec']/h['tokens_per_sec']:7.1f}x {o.get('bound_tokens_per_sec', 0):12.0f} {100*of:7.0f}% "
      f"{o['peak_gib']:9.2f} {h['peak_gib']:9.2f}")
print("  ours:", json.dumps(o))
PY
			done
		done
		echo "  HF:  " "$(tail -1 "$tmp/hf.json")"
	done
done
