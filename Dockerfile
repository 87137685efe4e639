# dalle-ds for GPU clusters: build once, pull on every node.
#
#   scripts/build_image.sh            # docker build -t dalle-ds:<version> .
#   docker run --gpus all --rm dalle-ds:0.1.0                     # prints ds_report
#
# Base: NVIDIA's CUDA image with PyTorch from PyPI in a virtualenv, not a pytorch/pytorch tag. The
# project is tested with torch 2.13 (TORCH below is the range in setup.py and scripts/env.sh), and
# pip installs exactly that range here, whereas a pytorch/pytorch tag fixes its own torch and
# CUDA pairing, which no check in this repository can see before a build pulls it. PyPI's torch
# 2.13 wheels are CUDA 13.0 builds that bring their own CUDA runtime, cuDNN and NCCL, so nodes
# need an NVIDIA driver >= 580; CUDA below is the toolkit for compiling DeepSpeed ops, and its
# major version must match torch's (13).
#
# DeepSpeed's ops: only CPUAdam is prebuilt (DS_BUILD_CPU_ADAM). The trainers use torch's AdamW,
# and DeepSpeedCPUAdam only when a config offloads optimizer states to CPU (ds_configs/*offload*);
# FusedAdam is never used (the trainers refuse an `optimizer` section), and DeepSpeed 0.19's ZeRO
# flattens with torch's own helpers, not the utils op. DeepSpeed ships an sdist whose setup.py
# imports torch to build ops, so the wheel is built with --no-build-isolation against the torch
# installed first; DS_ACCELERATOR=cuda, because `docker build` sees no GPU and DeepSpeed would
# otherwise record the op for its CPU accelerator and JIT-rebuild it on the GPU nodes. CPUAdam is
# compiled with -march=native: build the image on a CPU like the cluster's (or rebuild there).
# Other ops JIT-build at first use, which needs the devel flavour (BASE_FLAVOUR=devel).
# Multi-node: openssh + pdsh are installed; run the worker containers with sshd
# (`--user root ... /usr/sbin/sshd -D`), the launcher as user dalle.
ARG CUDA=13.0.0
ARG UBUNTU=ubuntu24.04
ARG BASE_FLAVOUR=base

FROM nvidia/cuda:${CUDA}-devel-${UBUNTU} AS build
ARG TORCH="torch>=2.13,<2.14"
ARG DEEPSPEED="deepspeed>=0.19.8,<0.20"
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;9.0"
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev python3-venv g++ \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH} VIRTUAL_ENV=/opt/venv
# Build requirements of the two wheels below (no build isolation: they come from this venv), and
# torch in the tested range (hadolint cannot see that ${TORCH} is pinned).
# hadolint ignore=DL3013
RUN pip install --no-cache-dir "setuptools>=77" "wheel>=0.42" "packaging>=24" "ninja>=1.11" "${TORCH}"
ENV TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} DS_ACCELERATOR=cuda DS_BUILD_OPS=0 DS_BUILD_CPU_ADAM=1
WORKDIR /src
COPY setup.py README.md ./
COPY dalle_ds ./dalle_ds
RUN pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /wheels "${DEEPSPEED}" . \
    && pip install --no-cache-dir /wheels/*.whl \
    && python -c "from deepspeed.git_version_info import installed_ops as ops, accelerator_name as a; \
assert ops.get('cpu_adam') and a == 'cuda', (a, ops)"

FROM nvidia/cuda:${CUDA}-${BASE_FLAVOUR}-${UBUNTU}
ARG BASE_FLAVOUR
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# python3 is the interpreter the build stage's venv links to (same Ubuntu release); JIT builds
# (devel flavour) also need its headers. Ubuntu 24.04 images have a user `ubuntu` with uid 1000.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 openssh-server openssh-client pdsh \
    && if [[ "${BASE_FLAVOUR}" == devel ]]; then apt-get install -y --no-install-recommends python3-dev; fi \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /run/sshd \
    && (userdel --remove ubuntu 2>/dev/null || true) \
    && useradd --create-home --uid 1000 --shell /bin/bash dalle
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH} VIRTUAL_ENV=/opt/venv
USER 1000:1000
WORKDIR /home/dalle/dalle-ds
COPY --chown=dalle:dalle ds_configs ./ds_configs
COPY --chown=dalle:dalle hostfiles ./hostfiles
COPY --chown=dalle:dalle scripts ./scripts
ENV TORCH_EXTENSIONS_DIR=/home/dalle/.cache/torch_extensions PDSH_RCMD_TYPE=ssh
HEALTHCHECK --interval=5m --timeout=60s CMD ["python", "-c", "import dalle_ds, deepspeed"]
CMD ["ds_report"]
