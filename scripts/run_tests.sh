#!/usr/bin/env bash
# Sets up and runs the test suite (CPU, offline). Extra arguments go to pytest.
# Tests run in parallel processes (pytest-xdist), one per core up to 4, one torch thread each; the tests on the
# S3 server share one process (SeaweedFS listens on fixed ports). TEST_WORKERS=1 runs them in this process, as
# does passing your own -n.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
workers=${TEST_WORKERS:-$(( $(nproc) < 4 ? $(nproc) : 4 ))}
parallel=()
if [ "$workers" -gt 1 ] && [[ " $* " != *" -n "* ]] && [[ " $* " != *" -n"[0-9a]* ]]; then
  parallel=(-n "$workers" --dist loadgroup)
fi
exec .venv/bin/python -m pytest -q "${parallel[@]}" "$@"
