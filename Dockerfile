# CPU image by default. CUDA image:
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t promptserve:cuda .
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# CUDA base images carry no Python; the slim Python image already has one. The distribution's python3 is
# whatever that base ships, so its version is not pinned here.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv && \
      rm -rf /var/lib/apt/lists/*; \
    fi
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY scripts ./scripts
COPY app ./app
COPY prompt_store ./prompt_store
COPY training ./training
COPY fine_tuning ./fine_tuning
COPY benchmarks ./benchmarks
# The same install script as `make install`: one procedure, no drift.
RUN VENV=/opt/venv EXTRAS="" EDITABLE=0 TORCH_SPEC="${TORCH_SPEC}" TORCH_INDEX_URL="${TORCH_INDEX_URL}" \
    bash scripts/install.sh
# Bake the embedded model in: convert the GGUF to the safetensors cache once, at build time.
ENV PROMPTSERVE_CACHE_DIR=/opt/promptserve/cache
RUN /opt/venv/bin/promptserve prepare-model
# The native kernels, built here for each x86 level (AVX-512 BF16, AVX-512, AVX2) against this torch: the
# runtime image has no compiler, and loads the best level its CPU allows (app/engine/kernels). On a CUDA
# image they are built too (the CPU fallback), and unused on the GPU.
# hadolint ignore=DL3008
RUN if ! command -v g++ >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*; \
    fi && \
    /opt/venv/bin/python -m app.engine.kernels.prebuild /opt/promptserve/kernels

FROM ${BASE_IMAGE} AS runtime
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 && \
      rm -rf /var/lib/apt/lists/*; \
    fi && \
    groupadd --system --gid 10001 promptserve && \
    useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/promptserve promptserve && \
    mkdir -p /data/prompt-store && chown 10001:10001 /data/prompt-store
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/promptserve/cache /opt/promptserve/cache
COPY --from=build /opt/promptserve/kernels /opt/promptserve/kernels
# the demo data, so `promptserve train --demo NAME` and `eval` work in the container too
COPY demo/datasets /opt/promptserve/demo/datasets
COPY demo/data /opt/promptserve/demo/data
COPY deploy/docker-entrypoint.sh /usr/local/bin/promptserve-entrypoint
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/promptserve \
    PYTHONUNBUFFERED=1 \
    PROMPTSERVE_CACHE_DIR=/opt/promptserve/cache \
    PROMPTSERVE_KERNELS_PREBUILT=/opt/promptserve/kernels \
    PROMPTSERVE_STORE_DIR=/data/prompt-store \
    PROMPTSERVE_DEMO_DIR=/opt/promptserve/demo \
    PROMPTSERVE_HOST=0.0.0.0 \
    PROMPTSERVE_PORT=8000 \
    PROMPTSERVE_DRAIN_GRACE=8
# SIGTERM starts the drain: in-flight requests get PROMPTSERVE_DRAIN_GRACE seconds, then exit 0. The grace
# here fits `docker stop`'s default 10 s; raise both together (`--stop-timeout`, compose stop_grace_period).
STOPSIGNAL SIGTERM
# No USER line: the entrypoint starts as root only to make a secret file of any host mode readable and the
# store writable, then drops to uid 10001 for good (setpriv, no new privileges) before the server starts.
VOLUME ["/data/prompt-store"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python3", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=4).status == 200 else 1)"]
ENTRYPOINT ["promptserve-entrypoint"]
CMD ["serve"]
