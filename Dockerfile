# dalle-ds for GPU clusters: build once, pull on every node.
#
#   scripts/build_image.sh            # docker build -t dalle-ds:<version> .
#   docker run --gpus all --rm dalle-ds:0.1.0                     # prints ds_report
#
# DeepSpeed's ops: FusedAdam, CPUAdam (ZeRO offload) and the utils op are prebuilt in the build
# stage for TORCH_CUDA_ARCH_LIST; any other op JIT-builds at first use, which needs the devel
# base (set BASE_FLAVOUR=devel). Multi-node: openssh + pdsh are installed; run the worker
# containers with sshd (`--user root ... /usr/sbin/sshd -D`), the launcher as user dalle.
ARG BASE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9
ARG BASE_FLAVOUR=runtime

FROM ${BASE}-devel AS build
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;9.0"
ARG DEEPSPEED="deepspeed>=0.19.8,<0.20"
ENV TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1 DS_BUILD_UTILS=1
WORKDIR /src
COPY setup.py README.md ./
COPY dalle_ds ./dalle_ds
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels "${DEEPSPEED}" .

FROM ${BASE}-${BASE_FLAVOUR}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends openssh-server openssh-client pdsh \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /run/sshd
COPY --from=build /wheels /wheels
# The base image's torch satisfies torch>=2.4: only the other requirements are fetched.
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
RUN useradd --create-home --uid 1000 --shell /bin/bash dalle
USER 1000:1000
WORKDIR /home/dalle/dalle-ds
COPY --chown=dalle:dalle ds_configs ./ds_configs
COPY --chown=dalle:dalle hostfiles ./hostfiles
COPY --chown=dalle:dalle scripts ./scripts
ENV TORCH_EXTENSIONS_DIR=/home/dalle/.cache/torch_extensions PDSH_RCMD_TYPE=ssh
HEALTHCHECK --interval=5m --timeout=60s CMD ["python", "-c", "import dalle_ds, deepspeed"]
CMD ["ds_report"]
