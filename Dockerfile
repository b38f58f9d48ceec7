# syntax=docker/dockerfile:1
# llama-horovod in a container, built by the same recipe as a machine: scripts/install.sh.
# torch comes from pip's index: PyPI's is the CUDA build (GBs), so for a CPU image name the CPU
# index; for CUDA, a CUDA devel base (the Horovod build needs nvcc and NCCL) and a CUDA index.
# scripts/container_test.sh (make image) builds and runs it with docker or podman.
#
#   docker build -t llama-horovod --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#   docker build -t llama-horovod:cu124 \
#       --build-arg BASE_IMAGE=nvidia/cuda:12.4.1-cudnn-devel-ubuntu22.04 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 \
#       --build-arg HOROVOD_GPU_OPERATIONS=NCCL .
#
# Entrypoint: scripts/launch.sh, so arguments are its options, then Hydra overrides. The
# working directory /workspace (owned by the non-root user llama) gets data/ and runs/:
#
#   docker run --rm llama-horovod                                  # the 2-rank smoke run
#   docker run --rm -v $PWD/work:/workspace llama-horovod -np 4 model=llama_small   # work/ owned by uid 1000
#
# Multi-host: each host mounts the same shared directory at /workspace and runs a worker sshd
# on port 2222 that admits the launcher's key; the image's ssh client (for user llama) uses
# port 2222 and skips host-key prompts, as containers come and go:
#
#   docker run -d --network host --user root -v /shared:/workspace \
#       -v ~/.ssh/id_ed25519.pub:/home/llama/.ssh/authorized_keys:ro \
#       --entrypoint /usr/sbin/sshd llama-horovod -D -p 2222          # on every worker host
#   docker run --network host -v /shared:/workspace -v ~/.ssh/id_ed25519:/home/llama/.ssh/id_ed25519:ro \
#       llama-horovod --launcher mpi -H node1:8,node2:8 --network-interface eth0 model=llama_small

# One base for both stages: the venv built in the first runs on the second's Python.
ARG BASE_IMAGE=debian:bookworm-slim

# --- build: Python headers here; install.sh adds OpenMPI, compilers, torch and Horovod --------
FROM ${BASE_IMAGE} AS build
ARG TORCH_INDEX_URL=
ARG HOROVOD_GPU_OPERATIONS=
ENV DEBIAN_FRONTEND=noninteractive
# Versions come with the base image's release; pinning them would tie the file to one base.
# hadolint ignore=DL3008
RUN apt-get update -q \
    && apt-get install -y -q --no-install-recommends python3 python3-venv python3-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/llama-horovod
COPY setup.cfg setup.py README.md ./
COPY scripts/ scripts/
COPY app/ app/
COPY conf/ conf/
COPY slurm/ slurm/
# The cache mount keeps pip's downloads and the built Horovod wheel between builds, out of the
# image. An empty HOROVOD_GPU_OPERATIONS must be unset, not empty, for Horovod's build.
# Two optional build secrets, for a network where pip needs them (scripts/container_test.sh
# passes the host's): ca-bundle, the CA certificates pip trusts (a TLS-inspecting proxy's), and
# pip-conf, a pip.conf (an index mirror, its credentials); secrets stay out of every layer.
#   docker build --secret id=ca-bundle,src=/etc/ssl/certs/ca-certificates.crt \
#       --secret id=pip-conf,src=$HOME/.config/pip/pip.conf -t llama-horovod .
# pip skips a PIP_CONFIG_FILE that does not exist, so the build is the same without them.
RUN --mount=type=cache,target=/root/.cache \
    --mount=type=secret,id=ca-bundle \
    --mount=type=secret,id=pip-conf \
    if [ -z "$HOROVOD_GPU_OPERATIONS" ]; then unset HOROVOD_GPU_OPERATIONS; fi \
    && if [ -f /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi \
    && PIP_CONFIG_FILE=/run/secrets/pip-conf TORCH_INDEX_URL="$TORCH_INDEX_URL" bash scripts/install.sh

# --- runtime: the venv and the code, OpenMPI and ssh; no compilers --------------------------
FROM ${BASE_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update -q \
    && apt-get install -y -q --no-install-recommends python3 openmpi-bin openssh-server openssh-client procps libjemalloc2 \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /run/sshd
RUN useradd --create-home --uid 1000 --shell /bin/bash llama \
    && mkdir -p /workspace /home/llama/.ssh \
    && printf 'Host *\n    Port 2222\n    StrictHostKeyChecking no\n    UserKnownHostsFile /dev/null\n    LogLevel ERROR\n' \
        >/home/llama/.ssh/config \
    && chmod 700 /home/llama/.ssh \
    && chown -R llama:llama /workspace /home/llama/.ssh
COPY --from=build /opt/llama-horovod /opt/llama-horovod
ENV VIRTUAL_ENV=/opt/llama-horovod/.venv \
    PATH=/opt/llama-horovod/.venv/bin:$PATH \
    PYTHONPATH=/opt/llama-horovod \
    PYTHONUNBUFFERED=1
# llama, by number: Kubernetes' runAsNonRoot can only check a numeric user.
USER 1000:1000
WORKDIR /workspace
ENTRYPOINT ["/opt/llama-horovod/scripts/launch.sh"]
CMD ["-np", "2", "experiment=smoke"]
