# posttrain GPU training worker: the project on a CUDA build of torch, for the GPU accelerate
# profiles (single_gpu, multi_gpu, fsdp, deepspeed_zero3, multi_node; training/accelerate/).
# It runs either a Prefect worker that picks up flow runs (the default command) or one
# `accelerate launch` job:
#
#   docker build -f docker/training-worker.Dockerfile -t posttrain/training-worker .   # repo root
#   docker run --gpus all --shm-size 16g posttrain/training-worker                      # a worker
#   docker run --gpus all --shm-size 16g -v "$PWD/runs:/data/runs" posttrain/training-worker \
#     accelerate launch --config_file training/accelerate/multi_gpu.yaml --num_processes 8 \
#     -m training.sft --config /data/runs/job/sft_config.json
#
# torch==2.13.0 from PyPI is the CUDA 13.0 build (it brings its own CUDA runtime, cuDNN and
# NCCL as pip packages): the host needs an NVIDIA driver that supports CUDA 13.0 (>= 580)
# and the NVIDIA Container Toolkit. The base image provides the driver hooks, not the CUDA libraries
# torch uses. DeepSpeed is not installed: build with --build-arg EXTRA_PACKAGES=deepspeed
# (its JIT-compiled ops also need a -devel base image with nvcc).
FROM nvidia/cuda:13.0.0-runtime-ubuntu24.04

ARG TORCH_VERSION=2.13.0
ARG EXTRA_PACKAGES=""

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=1 \
    PREFECT_HOME=/data/prefect \
    NCCL_DEBUG=WARN

# Ubuntu 24.04's Python 3.12 in a venv (the system Python is externally managed, PEP 668).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV"
# DL3008 (pin apt versions) is ignored above: Ubuntu's archive drops superseded versions, so a
# pinned python3 would break the build at the next security update; the Python packages,
# which decide behaviour, are pinned by constraints.txt.

WORKDIR /app

# torch first (PyPI's default Linux wheel is the CUDA build), then the dependencies under
# constraints.txt, which holds torch==2.13.0 so nothing can swap it
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}"
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" > /tmp/requirements.txt \
    && pip install --no-cache-dir -c constraints.txt -r /tmp/requirements.txt ${EXTRA_PACKAGES} \
    && rm /tmp/requirements.txt

# the code, editable, so training.launch finds training/accelerate/ and skills/ under /app
COPY . .
RUN pip install --no-cache-dir --no-deps -c constraints.txt -e .

RUN useradd --create-home --uid 10001 --user-group posttrain \
    && mkdir -p /data/runs /data/prefect \
    && chown -R posttrain:posttrain /data
# numeric, so Kubernetes `runAsNonRoot` can verify it
USER 10001:10001

# unhealthy when the GPU is gone (driver reset, device unplugged, container started without GPUs)
HEALTHCHECK --interval=60s --timeout=10s --start-period=30s --retries=3 \
    CMD ["nvidia-smi", "-L"]

# the worker's health endpoint (--with-healthcheck); torch.distributed rendezvous (multi_node)
EXPOSE 8080 29500

CMD ["prefect", "worker", "start", "--pool", "posttrain-gpu", "--type", "process", "--with-healthcheck"]
