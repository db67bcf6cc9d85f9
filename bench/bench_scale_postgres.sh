#!/usr/bin/env bash
# Prefect at scale on PostgreSQL: the test's scale-out job with 500 one-sample shards (the suite runs 48).
# Prints the wall time and the Prefect overhead per shard.
set -euo pipefail
cd "$(dirname "$0")/.."
VISION_BRIDGE_SCALE_SHARDS=${VISION_BRIDGE_SCALE_SHARDS:-500} HF_HUB_OFFLINE=1 \
  exec .venv/bin/python -m pytest -q -s -p no:cacheprovider tests/flows/test_scale_postgres.py
