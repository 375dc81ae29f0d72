# segpipe image: runs a Prefect worker (the default command), a Ray node of the train fan-out, SeaweedFS
# (docker-compose.yml) or `dvc repro`. It installs requirements.lock only: segpipe with its `ray` and `stack`
# extras, no test tools (those are requirements-dev.lock's, and the tests run on the host: `make test`).
#
#   docker build -t segpipe:dev .
#   docker run --gpus all --network host --env-file .segpipe/credentials.env segpipe:dev   # a worker for `stack up`
#   docker run --gpus all --network host --env-file .segpipe/credentials.env --user "$(id -u):$(id -g)" \
#       -v "$PWD:/home/segpipe/project" segpipe:dev dvc repro                           # in this checkout
# (docker-compose.yml runs the whole stack in containers instead.)
#
# Why a CUDA base when the pinned torch wheel already ships its CUDA 13.0 user-space libraries
# (nvidia-cublas, nvidia-cudnn-cu13, ... in requirements.lock)?
#  - nvidia-container-toolkit acts on the image's environment: NVIDIA_VISIBLE_DEVICES and
#    NVIDIA_DRIVER_CAPABILITIES=compute,utility make it mount the host's libcuda and nvidia-smi, and
#    NVIDIA_REQUIRE_CUDA=cuda>=13.0 makes it refuse to start on a host driver too old for CUDA 13 with a
#    clear message, instead of torch failing later with "CUDA driver version is insufficient".
#  - the image carries the cuda-compat forward-compatibility libraries (/usr/local/cuda/compat), which let a
#    data-centre GPU on an older long-term-support driver run CUDA 13 code.
#  - the CUDA runtime libraries sit at the system path (libnvjpeg among them) for anything that does not load
#    them from the wheels.
# To stay small it is the plain `runtime` flavour, not `cudnn-runtime`: cuDNN comes with torch
# (nvidia-cudnn-cu13), and a second copy would add about a gigabyte. The CUDA minor version matches the
# wheels' (nvidia-cuda-runtime 13.0.x).
#
# Python 3.11 is not an Ubuntu 24.04 package, so the build stage installs a standalone CPython with uv
# (python-build-standalone: relocatable, no compiler needed) and copies it, with the virtualenv, into the
# final stage. The final stage has no compiler, no uv and no package caches.

ARG CUDA_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04

FROM ghcr.io/astral-sh/uv:0.13.8 AS uv

FROM ${CUDA_IMAGE} AS build
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1
RUN uv python install 3.11.18 \
    && uv venv --python 3.11.18 /opt/venv
WORKDIR /src
COPY requirements.lock pyproject.toml ./
# `pip sync`: exactly the pinned set, nothing resolved afresh; it fails if the lock is incomplete
RUN uv pip sync --python /opt/venv/bin/python --strict requirements.lock
COPY segpipe ./segpipe
COPY pipelines ./pipelines
COPY flows ./flows
RUN uv pip install --python /opt/venv/bin/python --no-deps . \
    && find /opt/venv -name __pycache__ -type d -prune -exec rm -rf {} +

FROM ${CUDA_IMAGE}
# git: DVC in a mounted checkout reads its history; ca-certificates: HTTPS to S3, the leaderboard and the Hub
RUN apt-get update \
    && apt-get install -y --no-install-recommends git=1:2.43.* ca-certificates=20240203* \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 --user-group segpipe \
    && install -d -o 10001 -g 10001 /home/segpipe/project/runs /home/segpipe/project/data \
        /home/segpipe/.segpipe/s3 /home/segpipe/.segpipe/prefect /home/segpipe/.segpipe/leaderboard
# ^ the user's own mount points: an empty named volume takes their owner (docker-compose.yml), and WORKDIR
#   alone would leave the project folder to root, where the worker could not write runs/
COPY --from=build /opt/python /opt/python
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SEGPIPE_HOME=/home/segpipe/.segpipe \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /home/segpipe/project
COPY --chown=10001:10001 . .
USER 10001:10001
# the image carries no git history (.dockerignore), so DVC runs without SCM; a mounted checkout has its own config
RUN printf '[core]\n    no_scm = true\n' > .dvc/config.local
CMD ["prefect", "worker", "start", "--pool", "segpipe", "--type", "process"]
