# syntax=docker/dockerfile:1
# CustomLLM Server image. CPU by default:
#   docker build -t customllm-server .
# CUDA (PyPI's torch wheels carry their CUDA libraries; the host needs the NVIDIA driver + toolkit):
#   docker build -t customllm-server:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.4.1-runtime-ubuntu22.04 --build-arg TORCH_INDEX= .
# Run: docker run -p 8000:8000 -v "$PWD/models:/models:ro" customllm-server --model /models/my-model

ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS base
ARG PYTHON=python3.11
# A CUDA base image comes without Python; python:3.11-slim already has it.
RUN if ! command -v "${PYTHON}" >/dev/null 2>&1; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            "${PYTHON}" "${PYTHON}-venv" ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

FROM base AS builder
ARG PYTHON=python3.11
# The CPU extension's compiler (model/csrc, built below): in the builder only. The runtime stage gets the built
# library and no compiler. First in the stage, so that a change of the code keeps this layer and torch's.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends g++ "${PYTHON}-dev" \
    && rm -rf /var/lib/apt/lists/*
# Where torch comes from: the CPU-only index by default (about 200 MB instead of several GB);
# empty = PyPI, whose Linux wheels are CUDA builds.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC=torch==2.13.0
RUN "${PYTHON}" -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# Same two installs as `make install`: torch pinned first, then the package (which needs torch>=2.4).
RUN pip install ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "${TORCH_SPEC}"
COPY pyproject.toml LICENSE NOTICE ./src/
COPY model ./src/model
COPY server ./src/server
RUN pip install ./src && rm -rf ./src
# Prebuilt for every ISA level (AVX2, AVX-512, AVX-512-BF16), so that the image runs its fast paths on whatever
# x86 CPU it lands on, not only the build machine's; a CPU below AVX2 gets the torch paths (logged).
# Only the libraries are kept, not the objects.
ENV CUSTOMLLM_EXTENSION_DIR=/opt/customllm/extension
RUN python -m model.ops.extension build --isa all \
    && find "${CUSTOMLLM_EXTENSION_DIR}" -type f ! -name '*.so' -delete

FROM base AS runtime
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/customllm/extension /opt/customllm/extension
RUN useradd --system --uid 10001 --create-home --home-dir /home/customllm customllm \
    && mkdir -p /models && chown customllm /models
USER customllm
WORKDIR /home/customllm
# The server binds 127.0.0.1 by default; inside the container it must listen on all interfaces.
ENV PATH=/opt/venv/bin:$PATH \
    CUSTOMLLM_EXTENSION_DIR=/opt/customllm/extension \
    CUSTOMLLM_HOST=0.0.0.0 \
    CUSTOMLLM_PORT=8000
VOLUME /models
EXPOSE 8000
# No curl in slim images: ask /health with the venv's Python (urlopen raises on 503, exit 1).
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/health' % os.environ.get('CUSTOMLLM_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["customllm-server"]
