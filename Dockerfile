# The image that k8s/*.yaml run: PyTorch (its wheels carry their CUDA runtime) + DeepSpeed + this package (all
# extras), the `deepflow` command, the jobs/ shims and configs/ under /app, tini as PID 1, a non-root user.
#
#   docker build -t registry.example.com/deepflow/deepflow:0.1.0 .
#   docker run --rm --gpus all registry.example.com/deepflow/deepflow:0.1.0 deepflow train --help
#
# Two stages: the builder compiles what needs a compiler (DeepSpeed's sdist build, wheels without a binary) into
# /opt/venv; the runtime stage copies that venv onto the same plain Ubuntu base. No CUDA toolkit anywhere: nothing
# JIT-compiles CUDA (DeepSpeed gets a torch AdamW; Triton, used by torch.compile, brings its own ptxas). The GPU
# driver comes from the node (NVIDIA container toolkit / device plugin).
ARG BASE_IMAGE=ubuntu:24.04

# ------------------------------------------------------------------------------------------------------- builder
FROM ${BASE_IMAGE} AS builder
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    DS_BUILD_OPS=0
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential git ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && pip install --upgrade pip setuptools wheel

WORKDIR /src
# Dependencies first (a cached layer while only the code changes): the same order as scripts/setup.sh.
COPY constraints.txt ./
RUN pip install -c constraints.txt torch torchvision \
 && pip install -c constraints.txt --no-build-isolation deepspeed
COPY pyproject.toml README.md LICENSE ./
COPY deepflow ./deepflow
RUN pip install -c constraints.txt ".[all]" \
 && python -c "import deepflow, deepspeed, torch; print('deepflow', deepflow.__version__, 'torch', torch.__version__)"

# ------------------------------------------------------------------------------------------------------- runtime
FROM ${BASE_IMAGE} AS runtime
# python3 (the venv's interpreter), tini (PID 1: forwards SIGTERM to the job, e.g. the k8s_env supervisor that
# passes it to the ranks, and reaps orphans), and a C compiler + Python headers because Triton builds its small
# launcher modules with them when torch.compile first runs.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 tini gcc libc6-dev python3-dev ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=builder /opt/venv /opt/venv

# The paths the manifests use (WORKDIR-relative jobs/...; configs for users); the package itself is in the venv.
WORKDIR /app
COPY jobs ./jobs
COPY deepflow/configs ./configs

# Non-root user; caches and scratch go to /tmp (an emptyDir in the manifests, the root filesystem stays read-only).
RUN groupadd --gid 1000 deepflow && useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin deepflow
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HOME=/tmp/home \
    XDG_CACHE_HOME=/tmp/cache \
    HF_HOME=/tmp/cache/huggingface \
    TORCH_HOME=/tmp/cache/torch \
    TRITON_CACHE_DIR=/tmp/cache/triton \
    MPLCONFIGDIR=/tmp/cache/matplotlib
USER 1000:1000

# A Kubernetes `command:` replaces the ENTRYPOINT: manifests keep tini by starting their command with it.
ENTRYPOINT ["tini", "--"]
CMD ["deepflow", "--help"]
