#!/usr/bin/env bash
# Build the IronCore CUDA image (Dockerfile) from the repository root; settings come from .env
# (see .env.example). Extra arguments go to `docker build`. Then:
#   docker run -it --gpus all -v "$(pwd)":/workspace ironcore:dev
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -f .env ]; then
    set -a && source .env && set +a
fi
BASE_IMAGE=${BASE_IMAGE:-pytorch/pytorch:2.5.1-cuda12.4-cudnn9-devel}
IMAGE=${IMAGE:-ironcore:dev}
export github_access_token=${github_access_token:-}
DOCKER_BUILDKIT=1 docker build \
    --build-arg BASE_IMAGE="$BASE_IMAGE" \
    --secret id=github_access_token,env=github_access_token \
    -t "$IMAGE" -f Dockerfile "$@" .
echo "built $IMAGE; run: docker run -it --gpus all -v \"\$(pwd)\":/workspace $IMAGE"
