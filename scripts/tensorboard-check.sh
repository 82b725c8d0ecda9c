#!/usr/bin/env bash
# Proves the qlora stage's event files with TensorBoard's own readers, on a
# machine whose python3 has the tensorboard package (the GPU machine has 2.21):
#
#   scripts/tensorboard-check.sh            # runs dags/demo.yaml (CPU, about a minute) into a fresh cache, then checks
#   scripts/tensorboard-check.sh CACHE...   # checks the entries with tb/ of existing caches or entries
#
# The pipeline binary is bin/gpu/pipeline (scripts/gpu-build.sh) or
# bin/pipeline, built here when Go is on the PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c 'import tensorboard' 2>/dev/null; then
	echo "tensorboard-check: python3 has no tensorboard package" >&2
	exit 1
fi
if [ $# -eq 0 ]; then
	bin=""
	for b in bin/gpu/pipeline bin/pipeline; do
		[ -x "$b" ] && bin=$b && break
	done
	if command -v go >/dev/null 2>&1; then
		CGO_ENABLED=0 go build -o bin/pipeline ./cmd/pipeline
		bin=bin/pipeline
	fi
	[ -n "$bin" ] || { echo "tensorboard-check: no pipeline binary; run scripts/gpu-build.sh first" >&2; exit 1; }
	[ -d npm/node_modules ] || scripts/npm-deps.sh
	cache=$(mktemp -d)
	"$bin" run dags/demo.yaml --cache "$cache" --progress none
	set -- "$cache"
fi
python3 scripts/check-tensorboard.py "$@"
