# The dtrain image used by k8s/ (and usable under Slurm with enroot/pyxis or apptainer).
#
#   CPU:  docker build -t dtrain:0.1.0-cpu .
#   GPU:  docker build -t dtrain:0.1.0-cu128 --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#
# torch is installed first, pinned, from the index that matches the hardware: installing dtrain
# first would pull an unpinned torch (and GBs of CUDA wheels on a CPU image).
FROM python:3.11-slim-bookworm

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /app
# Dependencies change less often than the code: copy the project metadata first for layer caching.
COPY pyproject.toml README.md ./
COPY dtrain ./dtrain
RUN pip install ".[tensorboard]" && python -c "import torch, dtrain; print('torch', torch.__version__)"

COPY launch ./launch
COPY configs ./configs

# The manifests run launch/torchrun.sh as PID 1: it forwards SIGTERM from the kubelet to torchrun
# and exits with dtrain's code (0 done, 75 preempted with a checkpoint, 2 config error).
CMD ["launch/torchrun.sh"]
