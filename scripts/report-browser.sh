#!/usr/bin/env bash
# Renders the HTML report in a real browser: installs Debian's Chromium when
# needed (scripts/chromium-deps.sh), runs a spec three times at three learning
# rates, writes its report, opens it in headless Chromium at a desktop width
# (1280 px) and a phone width (390 px, mobile emulation), checks with DOM
# queries that the charts and tables are there and that the console shows no
# error, and keeps full-page screenshots:
#
#   scripts/report-browser.sh [SCREENSHOT_DIR]     # default bin/report-screenshots
#
# scripts/test.sh runs the same tests; they skip when no Chromium is found.
set -euo pipefail
cd "$(dirname "$0")/.."
shots=$(mkdir -p "${1:-bin/report-screenshots}" && cd "${1:-bin/report-screenshots}" && pwd)
scripts/npm-deps.sh
scripts/chromium-deps.sh
export CGO_ENABLED=0 REPORT_SCREENSHOTS="$shots"
log=$(mktemp)
status=0
go test -count=1 -v -run 'TestReportThreeLearningRates|TestBrowseSeesErrors' ./cmd/pipeline ./report/reporttest >"$log" 2>&1 || status=$?
grep -E '^(=== RUN|--- |    |ok|FAIL|PASS)' "$log" || cat "$log"
if grep -q -- '--- SKIP' "$log"; then
	echo "report-browser: a browser test skipped (no Chromium?)" >&2
	status=1
fi
rm -f "$log"
echo "screenshots in $shots:"
ls -1 "$shots"
exit "$status"
