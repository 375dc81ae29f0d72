# segpipe image: runs a Prefect worker, `dvc repro`, or the tests.
# The CUDA user-space libraries come with the pinned torch wheels (nvidia-* packages in requirements.lock),
# so a slim Python base plus the host's NVIDIA driver (nvidia-container-toolkit, `--gpus all`) is enough.

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY requirements.lock pyproject.toml ./
RUN /opt/venv/bin/pip install -r requirements.lock
COPY segpipe ./segpipe
COPY pipelines ./pipelines
COPY flows ./flows
RUN /opt/venv/bin/pip install --no-deps .

FROM python:3.11-slim-bookworm
RUN apt-get update \
    && apt-get install -y --no-install-recommends git=1:2.39.* libgl1=1.6.* libglib2.0-0=2.74.* \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 segpipe
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
WORKDIR /home/segpipe/project
COPY --chown=1000:1000 . .
USER 1000:1000
CMD ["prefect", "worker", "start", "--pool", "segpipe"]
