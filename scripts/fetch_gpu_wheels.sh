#!/usr/bin/env bash
# Downloads the wheels that scripts/gpu_check.sh installs on a GPU machine without network, into .whl/
# (ignored by git: add `/.whl/` to .git/info/exclude). Target: CPython 3.12, x86-64, torch 2.11 + CUDA 13.0.
#
#   bash scripts/fetch_gpu_wheels.sh            # ~28 MB: diffusers, transformers, a slimmed bitsandbytes, torchao (fp8)
#
# The device image has transformers 5.17 and no diffusers or bitsandbytes; everything these wheels need
# (huggingface-hub >= 1.32, tokenizers 0.23, safetensors 0.8, regex, requests, numpy, pillow, torch) is there.
# bitsandbytes ships kernels for every CUDA version (43 MB); only the CUDA 13.0 and CPU libraries are kept so
# the carried tree stays under the 64 MiB limit.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
mkdir -p .whl
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl diffusers==0.42.1 transformers==5.24.0 bitsandbytes==0.50.2 torchao==0.18.0

# Slim bitsandbytes in place: drop the native libraries of other CUDA/ROCm/XPU versions, fix RECORD.
"$PYTHON" - .whl/bitsandbytes-0.50.2-*.whl <<'PY'
import base64, hashlib, re, sys, zipfile
from pathlib import Path

path = Path(sys.argv[1])
keep = re.compile(r"libbitsandbytes_(cpu|cuda130)\.so$")
with zipfile.ZipFile(path) as source:
    entries = [(info, source.read(info)) for info in source.infolist()
               if not info.filename.endswith(".so") or keep.search(info.filename)]
record_name = next(info.filename for info, _ in entries if info.filename.endswith(".dist-info/RECORD"))
lines = []
for info, data in entries:
    if info.filename == record_name:
        continue
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    lines.append(f"{info.filename},sha256={digest},{len(data)}")
lines.append(f"{record_name},,")
slim = path.with_suffix(".slim")
with zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as target:
    for info, data in entries:
        target.writestr(info, "\n".join(lines) + "\n" if info.filename == record_name else data)
slim.replace(path)
print(f"slimmed {path.name}: {path.stat().st_size / 1e6:.1f} MB")
PY
ls -l .whl
du -sh .whl
