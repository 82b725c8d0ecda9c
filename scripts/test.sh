#!/usr/bin/env bash
# Runs the whole test suite: installs the npm packages the tests need (and,
# where it can, Debian's Chromium for the report's browser checks, which
# skip without it; PIPELINE_NO_CHROMIUM=1 leaves it out), then runs every
# Go test with the build kept cgo-free.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/npm-deps.sh
if [ -z "${PIPELINE_NO_CHROMIUM:-}" ]; then
	scripts/chromium-deps.sh || echo "test: no Chromium; the report's browser checks will skip" >&2
fi
export CGO_ENABLED=0
go vet ./...
go test -count=1 -timeout 60m "$@" ./...
# The k-quant encoders give llama.cpp's bytes only if no a*b+c is fused into
# one rounding, which Go does on arm64 and for GOAMD64=v3: checked again in
# such a build where the CPU has FMA.
if grep -qw fma /proc/cpuinfo 2>/dev/null; then
	GOAMD64=v3 go test -count=1 -run 'TestQuantizeAsLlamaCpp/kq/q[456]_k' ./gguf
fi
