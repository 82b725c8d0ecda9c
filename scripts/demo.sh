#!/usr/bin/env bash
# Runs the demo DAG (dags/demo.yaml) on the embedded data; extra arguments go
# to `pipeline run`, e.g. scripts/demo.sh --until pack.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/npm-deps.sh
export CGO_ENABLED=0
mkdir -p bin
go build -o bin/pipeline ./cmd/pipeline
exec bin/pipeline run dags/demo.yaml "$@"
