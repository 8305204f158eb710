# syntax=docker/dockerfile:1
# steerserve: one model server process per container (see deploy/README.md for scaling).
#
#   docker build -t steerserve:0.1.0 .                                  # CPU image (the default)
#   docker build -t steerserve:0.1.0-cuda --build-arg TORCH_VARIANT=cu128 .   # CUDA (+ Triton kernels)
#   docker run -p 8000:8000 -v steerserve-data:/data steerserve:0.1.0 --model random:gpt2
#
# Arguments after the image name are `steerserve serve` flags. The registry (SQLite unless
# --registry-url postgresql://... is given) and SAE/vector blobs live in the /data volume.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtual environment with torch and steerserve ------------------------------------
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
# cpu, or a CUDA variant of PyTorch's wheel index (cu126, cu128, ...)
ARG TORCH_VARIANT=cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
# torch first, from the index of the chosen variant: the project's own `torch>=` range then adds nothing
RUN python -m venv /opt/venv \
 && pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kernels ./kernels
COPY server ./server
SHELL ["/bin/bash", "-euo", "pipefail", "-c"]
# NOTE: the CPU attention kernel's C++ source (runner/csrc) is compiled on first use: it is copied
# next to the installed package where the wheel's package data leaves it out.
RUN extras=postgres,s3; \
    if [ "${TORCH_VARIANT}" != "cpu" ]; then extras=postgres,s3,triton; fi; \
    pip install --no-cache-dir "/src[${extras}]"; \
    runner="$(python -c 'import os, steerserve.runner as r; print(os.path.dirname(r.__file__))')"; \
    if [ ! -d "${runner}/csrc" ]; then cp -r /src/server/steerserve/runner/csrc "${runner}/csrc"; fi; \
    python -c "import steerserve.cli, steerkernels"

# ---- runtime: the environment, a C++ compiler for the CPU kernel, a non-root user ---------------
FROM ${PYTHON_IMAGE} AS runtime
# NOTE: g++ and libgomp build the CPU decode-attention and steering kernels on first start (about
# 3 s); without them the server falls back to PyTorch attention and the torch steering references. Versions follow the base image's Debian release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --create-home --home-dir /home/steerserve steerserve \
 && mkdir -p /data \
 && chown steerserve:steerserve /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    STEERSERVE_DATA_DIR=/data \
    HF_HOME=/home/steerserve/.cache/huggingface
VOLUME ["/data"]
USER 10001:10001
WORKDIR /home/steerserve
EXPOSE 8000
# /health answers 200 once the model is loaded (503 while loading or after an engine failure).
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request as u; sys.exit(u.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"]
ENTRYPOINT ["steerserve", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD []
