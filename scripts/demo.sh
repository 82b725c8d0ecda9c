#!/usr/bin/env bash
# Runs the demo DAG (dags/demo.yaml) on the embedded data; extra arguments go
# to `pipeline run`, e.g. scripts/demo.sh --until pack. Then writes the HTML
# report of the demo's runs to bin/demo-report.html.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/npm-deps.sh
export CGO_ENABLED=0
mkdir -p bin
go build -o bin/pipeline ./cmd/pipeline
status=0
bin/pipeline run dags/demo.yaml "$@" || status=$?
bin/pipeline report dags/demo.yaml --out bin/demo-report.html || true
exit "$status"
