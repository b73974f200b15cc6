# syntax=docker/dockerfile:1
#
# Two images from one Dockerfile (see docs/kubernetes.md):
#   docker build --target proxy        -t edge-eval/proxy:0.1.0 .
#   docker build --target model-server -t edge-eval/model-server:0.1.0 .
#
# The install steps live in docker/install-*.sh; CI (tests/test_deploy_docker.py) runs the same
# scripts in a fresh venv and lints this file with hadolint, since no Docker engine runs there.

# One plain Python base for both images: the Python version CI tests with (3.11). No CUDA base
# image: torch 2.13.0's default Linux wheel is a CUDA 13.0 build that brings its CUDA libraries as
# wheels (kernels for sm_75 / T4 up to sm_120, Hopper included), so a CUDA base would ship them
# twice. The NVIDIA container runtime mounts the driver (libcuda, NVML) at run time; it needs a
# driver >= 580.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- proxy
FROM ${PYTHON_IMAGE} AS proxy-build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH VIRTUAL_ENV=/opt/venv
WORKDIR /src
COPY docker/install-proxy.sh docker/requirements-proxy.txt docker/
RUN bash docker/install-proxy.sh deps
COPY pyproject.toml README.md ./
COPY edge_proxy ./edge_proxy
COPY model_server ./model_server
RUN bash docker/install-proxy.sh app /src

FROM ${PYTHON_IMAGE} AS proxy
LABEL org.opencontainers.image.title="edge-proxy" \
      org.opencontainers.image.description="edge-eval serving-side instrumentation proxy (no torch)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 edge \
 && useradd --system --uid 10001 --gid edge --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin edge
COPY --from=proxy-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH VIRTUAL_ENV=/opt/venv PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    EDGE_PROXY_PROXY_HOST=0.0.0.0
USER 10001:10001
WORKDIR /tmp
# 8080: the proxied API; 9464: /metrics and the proxy's own health route.
EXPOSE 8080 9464
# The proxy's own liveness (not the backend's): /healthz on the metrics port.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('EDGE_PROXY_PROXY_METRICS_PORT', '9464'), timeout=2)"]
ENTRYPOINT ["edge-proxy"]
CMD ["serve"]

# ---------------------------------------------------------------- model server
FROM ${PYTHON_IMAGE} AS model-server-build
ARG WITH_GPTQ=0
# GPTQ builds (and, at run time, JIT-compiles) C++/CUDA extensions: a compiler, pinned to the
# Debian 12 release's version.
RUN if [ "$WITH_GPTQ" = 1 ]; then \
      apt-get update \
      && apt-get install -y --no-install-recommends build-essential=12.9 \
      && rm -rf /var/lib/apt/lists/*; \
    fi
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH VIRTUAL_ENV=/opt/venv
WORKDIR /src
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=""
COPY docker/install-model-server.sh docker/requirements-proxy.txt docker/requirements-model-server.txt docker/requirements-gptq.txt docker/
RUN TORCH_VERSION="$TORCH_VERSION" TORCH_INDEX_URL="$TORCH_INDEX_URL" WITH_GPTQ="$WITH_GPTQ" \
    bash docker/install-model-server.sh deps
COPY pyproject.toml README.md ./
COPY edge_proxy ./edge_proxy
COPY model_server ./model_server
RUN bash docker/install-model-server.sh app /src

FROM ${PYTHON_IMAGE} AS model-server
ARG WITH_GPTQ=0
LABEL org.opencontainers.image.title="model-server" \
      org.opencontainers.image.description="edge-eval INT4 transformers model server (TGI + OpenAI APIs)" \
      org.opencontainers.image.licenses="Apache-2.0"
# With GPTQ the kernels compile at run time: the compiler ships in this image too.
RUN if [ "$WITH_GPTQ" = 1 ]; then \
      apt-get update \
      && apt-get install -y --no-install-recommends build-essential=12.9 \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
 && groupadd --system --gid 10001 edge \
 && useradd --system --uid 10001 --gid edge --create-home --home-dir /home/edge --shell /usr/sbin/nologin edge \
 && mkdir -p /models \
 && chown edge:edge /models
COPY --from=model-server-build /opt/venv /opt/venv
# A compile cache filled on the target card type (model-server compile-cache fill; docker/compile-cache/README.md):
# the first start copies it into its writable cache and skips those compiles. Unfilled, only a README ships.
COPY docker/compile-cache/ /opt/edge-eval/compile-cache-seed/
ENV PATH=/opt/venv/bin:$PATH VIRTUAL_ENV=/opt/venv PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/home/edge/.cache/huggingface XDG_CACHE_HOME=/home/edge/.cache GPTQMODEL_CPU_WORKERS=2 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility MODEL_SERVER_COMPILE_CACHE_SEED=/opt/edge-eval/compile-cache-seed
USER 10001:10001
WORKDIR /home/edge
EXPOSE 8000
# Healthy = model loaded and ready (/health is 503 while loading, warming or draining).
HEALTHCHECK --interval=15s --timeout=3s --start-period=600s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"]
ENTRYPOINT ["model-server"]
CMD ["serve", "/models/model", "--host", "0.0.0.0", "--port", "8000"]
