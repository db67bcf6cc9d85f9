#!/usr/bin/env bash
# The main job end to end on the embedded default: generated sample, local storage, tiny models when no
# real weights are present (it says so loudly). Extra arguments go to `vision-bridge quickstart`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/vision-bridge quickstart "$@"
