# The vision-bridge worker image: the code, its pinned wheels and the Debian packages the stages need, installed
# by the same scripts CI runs (scripts/setup.sh -> scripts/setup_system.sh), without the test-only parts.
#
#   docker build -t registry.example.com/vision-bridge:$(git rev-parse --short HEAD) .
#   docker run --gpus all --env-file s3.env IMAGE prefect worker start --pool gpu --type process --limit 1
#
# No CUDA base image is needed: torch's PyPI wheels carry the CUDA runtime (the nvidia-* wheels). torch 2.14.1's
# default PyPI wheel is a CUDA 13.0 build: the host needs NVIDIA driver R580 or newer (older drivers: build with a
# CUDA 12.x wheel from download.pytorch.org, see scripts/fetch_gpu_wheels.sh) and the container toolkit (`--gpus`,
# or `nvidia.com/gpu` on Kubernetes). Weights are not baked in: mount a model folder at /models (HF_HOME; the
# Kubernetes template mounts the claim `vision-bridge-models` there, read-only: set HF_HUB_OFFLINE=1 for workers
# that must never download) or let the first run download them (a writable mount, owned by uid 10001).
# Pin the base by digest in your registry mirror (`docker buildx imagetools inspect python:3.11-slim-bookworm`) and
# pass it as BASE; the tag alone is the default so that a fresh checkout builds.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ENV VISION_BRIDGE_CODE_DIR=/opt/vision-bridge \
    VISION_BRIDGE_RUNTIME_ONLY=1 \
    PYTHON=/usr/local/bin/python3.11 \
    HF_HUB_CACHE=/models \
    PYTHONUNBUFFERED=1 \
    PREFECT_LOGGING_EXTRA_LOGGERS=bridgecore \
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY=60

WORKDIR /opt/vision-bridge
# the installers and the dependency list first: code changes do not reinstall torch
COPY pyproject.toml README.md ./
COPY scripts/ scripts/
RUN mkdir -p bridgecore flows tasks vision_bridge && touch bridgecore/__init__.py flows/__init__.py \
        tasks/__init__.py vision_bridge/__init__.py vision_bridge/cli.py \
    && bash scripts/setup.sh \
    && rm -rf /root/.cache/pip /var/lib/apt/lists/*
COPY . .
# the install is editable: the sources just copied are what runs (checked here, at build time)
RUN .venv/bin/python -c "import bridgecore.batch.pipeline, flows.bulk_edit, vision_bridge.cli"

ENV PATH=/opt/vision-bridge/.venv/bin:$PATH
# not root: the worker writes only its home, /models (a mounted volume) and its temporary folders
RUN useradd --create-home --uid 10001 vision && mkdir -p /models && chown vision /models
USER vision
HEALTHCHECK --interval=60s --timeout=20s --retries=3 \
    CMD python -c "import bridgecore.batch.pipeline, flows.process_shards" || exit 1
CMD ["vision-bridge", "--help"]
