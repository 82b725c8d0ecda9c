#!/usr/bin/env bash
# Installs Debian's Chromium for the browser checks of the HTML report
# (report/reporttest), when it is not there yet. Idempotent: does nothing when
# a Chromium is on the PATH or $PIPELINE_CHROMIUM names one. Needs root (or
# sudo without a password) and apt-get; exits 1, saying why, when it cannot
# install, so that callers may go on without the browser checks.
set -euo pipefail
if [ -n "${PIPELINE_CHROMIUM:-}" ] && [ -x "$PIPELINE_CHROMIUM" ]; then
	exit 0
fi
for b in chromium chromium-browser google-chrome google-chrome-stable; do
	if command -v "$b" >/dev/null 2>&1; then
		exit 0
	fi
done
if ! command -v apt-get >/dev/null 2>&1; then
	echo "chromium-deps: no apt-get here; install Chromium and set PIPELINE_CHROMIUM" >&2
	exit 1
fi
sudo=()
if [ "$(id -u)" -ne 0 ]; then
	if sudo -n true 2>/dev/null; then
		sudo=(sudo -n)
	else
		echo "chromium-deps: not root; run: sudo apt-get install chromium" >&2
		exit 1
	fi
fi
echo "chromium-deps: installing Debian's chromium for the report's browser checks" >&2
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
if ! { timeout 300 "${sudo[@]}" apt-get update -qq && timeout 600 "${sudo[@]}" apt-get install -y -qq --no-install-recommends chromium; } >"$log" 2>&1; then
	tail -5 "$log" >&2
	rm -f "$log"
	echo "chromium-deps: could not install chromium" >&2
	exit 1
fi
rm -f "$log"
