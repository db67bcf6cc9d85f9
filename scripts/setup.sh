#!/usr/bin/env bash
# Creates .venv (if missing) and installs vision-bridge with its test tools. Safe to rerun.
# torch 2.14.1 / torchvision 0.29.1 are pinned in pyproject.toml; pip must not pick another torch.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_system.sh
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# pip's own exit status decides (pipefail); only the local index's "Location ... ignored" noise is dropped.
.venv/bin/python -m pip install --quiet --upgrade pip 2>&1 | { grep -v "^WARNING: Location" || true; }
.venv/bin/python -m pip install --quiet -e ".[dev]" 2>&1 | { grep -v "^WARNING: Location" || true; }
.venv/bin/python -c "import torch, torchvision; assert torch.__version__.startswith('2.14.1'), torch.__version__"
