#!/usr/bin/env bash
# Build and tag the cluster image: scripts/build_image.sh [TAG] [extra docker build args...]
# e.g. scripts/build_image.sh registry.example.com/dalle-ds:0.1.0 --build-arg TORCH_CUDA_ARCH_LIST=9.0
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(python3 -c "import re; print(re.search(r'version=\"([^\"]+)\"', open('setup.py').read()).group(1))")
tag=${1:-dalle-ds:$version}
shift || true
docker build -t "$tag" "$@" .
echo "built $tag"
