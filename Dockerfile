# syntax=docker/dockerfile:1
# IronCore on a CUDA PyTorch image. Build with ./scripts/docker/build.sh (settings in .env, see
# .env.example), then run from a checkout:
#   docker run -it --gpus all -v "$(pwd)":/workspace ironcore:dev
#   snakemake --cores 8          # inside the container, in /workspace
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-devel
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/workspace/data/cache

RUN apt-get update && apt-get install -y --no-install-recommends git && rm -rf /var/lib/apt/lists/*

# The package; torch comes from the base image (it satisfies torch>=2.4). A GitHub token, when
# given, is a BuildKit secret: used for private git dependencies, never stored in a layer.
WORKDIR /opt/ironcore
COPY pyproject.toml README.md ./
COPY ironcore ./ironcore
RUN --mount=type=secret,id=github_access_token \
    token=$(cat /run/secrets/github_access_token 2>/dev/null || true); \
    if [ -n "$token" ]; then export GIT_CONFIG_COUNT=1 GIT_CONFIG_KEY_0="url.https://${token}@github.com/.insteadOf" \
        GIT_CONFIG_VALUE_0="https://github.com/"; fi; \
    pip install --no-cache-dir ".[dev]"

WORKDIR /workspace
CMD ["bash"]
