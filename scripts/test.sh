#!/usr/bin/env bash
# Runs the whole test suite: installs the npm packages the tests need, then
# runs every Go test with the build kept cgo-free.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/npm-deps.sh
export CGO_ENABLED=0
go vet ./...
go test -count=1 -timeout 60m "$@" ./...
