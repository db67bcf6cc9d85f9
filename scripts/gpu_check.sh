#!/usr/bin/env bash
# The whole GPU check as one command (about 6-8 minutes on one H100/H200, under 8.5 by construction):
#   1. installs the wheels carried in .whl/ (bash scripts/fetch_gpu_wheels.sh fetches them) into /tmp/site,
#   2. runs the real-dimension benchmark at full depth (bench/gpu_realdim.py --compile: exact edit, batched
#      CFG, profiles, compiled edits, FP8 and step-cache fast modes, images per GPU-hour),
#   3. runs the GPU tests (pytest -m gpu tests/model/test_gpu.py) in the time left.
# Logs and results go to $OUT (default out/gpu_check): env.txt, install.log, gpu_realdim.log,
# gpu_realdim.json, pytest_gpu.log, pytest_gpu.xml, summary.txt.
#
#   bash scripts/gpu_check.sh
#   BENCH_ARGS="--fp8 off" bash scripts/gpu_check.sh   # a second card: the whole-DiT compile and CUDA graphs
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_check}
BUDGET_S=${BUDGET_S:-500}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - start) )); }

{ date -u; nvidia-smi; free -g; df -hT . /tmp; } > "$OUT/env.txt" 2>&1
export PYTHONPATH=$PWD
if ls .whl/*.whl > /dev/null 2>&1; then
  if ! python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl > "$OUT/install.log" 2>&1; then
    echo "wheel install failed:"; cat "$OUT/install.log"; exit 1
  fi
  export PYTHONPATH=/tmp/site:$PWD
fi
python3 - >> "$OUT/env.txt" 2>&1 <<'PY'
import importlib.util, torch, transformers, diffusers
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")
print("transformers", transformers.__version__, "diffusers", diffusers.__version__,
      "bitsandbytes", "yes" if importlib.util.find_spec("bitsandbytes") else "no",
      "peft", "yes" if importlib.util.find_spec("peft") else "no")
PY
tail -3 "$OUT/env.txt"

# 1. benchmark (its JSON is written after every section: a timeout keeps what was measured)
mkdir -p .realdim-tmp
# --no-load: the load rate is measured (bench/results); the FP8, whole-compile and CUDA-graph sections skip
# themselves (saying so in the JSON) when --budget-s runs short, so the GPU tests keep their 2 minutes
# (each section is skipped when its estimate, from the edit and compile times measured before it, does not fit)
# BENCH_ARGS adds options (e.g. BENCH_ARGS="--fp8 off" leaves the time to the whole-DiT compile and CUDA graphs)
timeout $(( $(left) - 100 )) python3 bench/gpu_realdim.py --device cuda --compile --no-load --step-cache 0.08 \
  --repeats 2 --budget-s $(( $(left) - 160 )) --tmp .realdim-tmp --json "$OUT/gpu_realdim.json" ${BENCH_ARGS:-} \
  2>&1 | tee "$OUT/gpu_realdim.log"
bench_rc=${PIPESTATUS[0]}
rm -rf .realdim-tmp

# 2. GPU tests in the time left
timeout $(( $(left) > 60 ? $(left) : 60 )) python3 -m pytest -m gpu tests/model/test_gpu.py -q -rs -s -p no:cacheprovider \
  --junitxml="$OUT/pytest_gpu.xml" 2>&1 | tee "$OUT/pytest_gpu.log"
tests_rc=${PIPESTATUS[0]}

{
  echo "bench exit $bench_rc, gpu tests exit $tests_rc, $(( $(date +%s) - start )) s"
  grep -E "passed|failed|skipped|error" "$OUT/pytest_gpu.log" | tail -3
  tail -30 "$OUT/gpu_realdim.log"
} | tee "$OUT/summary.txt"
[ "$bench_rc" = 0 ] && [ "$tests_rc" = 0 ]
