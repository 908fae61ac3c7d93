# The image that k8s/*.yaml run: CUDA + PyTorch + DeepSpeed + this package, as a non-root user.
#
#   docker build -t registry.example.com/deepflow/deepflow:0.1.0 .
#
# The base must provide the CUDA toolkit (nvcc) so that DeepSpeed can JIT-build its fused ops on the cluster's GPUs;
# PyTorch itself comes from PyPI, pinned by constraints.txt (its wheels carry their own CUDA runtime libraries).
ARG BASE_IMAGE=nvidia/cuda:13.0.0-cudnn-devel-ubuntu24.04
FROM ${BASE_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential git ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && pip install --upgrade pip

WORKDIR /app
# Dependencies first (cached layer): the same order as scripts/setup.sh.
COPY constraints.txt pyproject.toml README.md ./
RUN pip install -c constraints.txt torch torchvision \
 && pip install setuptools wheel \
 && pip install -c constraints.txt --no-build-isolation deepspeed

COPY deepflow ./deepflow
RUN pip install -c constraints.txt . && python -c "import deepflow, deepspeed, torch; print('torch', torch.__version__)"
COPY jobs ./jobs
COPY configs ./configs

# Non-root user; caches and scratch go to /tmp (an emptyDir in the manifests, the root filesystem stays read-only).
RUN groupadd --gid 1000 deepflow && useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin deepflow
ENV HOME=/tmp/home \
    XDG_CACHE_HOME=/tmp/cache \
    HF_HOME=/tmp/cache/huggingface \
    TORCH_HOME=/tmp/cache/torch \
    TRITON_CACHE_DIR=/tmp/cache/triton \
    MPLCONFIGDIR=/tmp/cache/matplotlib
USER 1000:1000

CMD ["python", "jobs/train.py", "--help"]
