#!/usr/bin/env bash
# Creates .venv (if missing) and installs vision-bridge with its test tools; on a later run it installs only
# when pyproject.toml changed (or the install is broken), quietly. Safe to rerun.
# torch 2.14.1 / torchvision 0.29.1 are pinned in pyproject.toml; pip must not pick another torch.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_system.sh
PYTHON=${PYTHON:-python3}
STAMP=.venv/.vision-bridge-installed
# the Docker image (VISION_BRIDGE_RUNTIME_ONLY=1) installs the project without the test tools (with fp8's torchao)
EXTRAS="[dev]"
[ "${VISION_BRIDGE_RUNTIME_ONLY:-0}" = "1" ] && EXTRAS="[fp8]"
wanted="$(sha256sum pyproject.toml | cut -d' ' -f1)$EXTRAS"
if [ -x .venv/bin/python ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$wanted" ] \
   && .venv/bin/python -c "import bridgecore, flows, vision_bridge.cli" 2>/dev/null; then
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  echo "setting up .venv (first time: a few minutes)"
  "$PYTHON" -m venv .venv
fi
# pip's own exit status decides (pipefail); only the local index's "Location ... ignored" noise is dropped.
log=$(mktemp)
if ! { .venv/bin/python -m pip install --quiet --upgrade pip && .venv/bin/python -m pip install --quiet -e ".$EXTRAS"; } >"$log" 2>&1; then
  grep -v "^WARNING: Location" "$log" >&2 || true
  rm -f "$log"
  echo "error: installing vision-bridge into .venv failed (pip's output above)" >&2
  exit 1
fi
rm -f "$log"
.venv/bin/python -c "import torch, torchvision; assert torch.__version__.startswith('2.14.1'), torch.__version__"
echo "$wanted" > "$STAMP"
