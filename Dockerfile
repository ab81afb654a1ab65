# Three images from one file:
#   server: the service with its runtime dependencies only
#   load:   the same plus the `load` extra (locust, matplotlib) and loadtest/, for locust and compare
#   matrix: the load image plus the Docker CLI and wrk, to run `loop-lab matrix` (compose profile)
# All install the project with pip from pyproject.toml, as the Makefile does. Dependencies go in a
# layer of their own before the code is copied, so editing app/ rebuilds only a small layer.
# The server's stages come first: Docker's legacy builder (no BuildKit) builds every stage before
# the target, so `--target server` then builds no load stage, and `--target load` no matrix stage.
# No `# syntax=` line: under BuildKit it pulls a frontend image.
# The build stages run on BUILD_IMAGE (the full image of the same Python); the runtime stages stay
# slim, without a compiler, and copy the built venv. `make compose-test` builds and runs server and load;
# `make matrix-quick` builds matrix and runs it through the compose profile.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG BUILD_IMAGE=python:3.11-bookworm

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# ---- build stages: everything lands in the venv /opt/venv, which the runtime stages copy whole

FROM ${BUILD_IMAGE} AS build-base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

FROM build-base AS deps
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml deploy/docker/requirements.py ./
RUN python requirements.py > requirements.txt && pip install -r requirements.txt

FROM deps AS build
COPY README.md ./
COPY app ./app
RUN pip install --no-deps .

# ---- runtime stages: no compiler, no pip cache, no sources, a user without a login

FROM base AS runtime
RUN useradd --system --user-group --uid 10001 --no-create-home --shell /usr/sbin/nologin looplab
WORKDIR /app

FROM runtime AS server
COPY --from=build /opt/venv /opt/venv
# 0.0.0.0 so other containers reach it; an env var, so host networking can say 127.0.0.1
ENV LOOP_LAB_HOST=0.0.0.0
USER looplab
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('LOOP_LAB_PORT', '8080'), timeout=2)"]
CMD ["loop-lab", "serve"]

# ---- the load image: its own build stages, after the server's

FROM deps AS deps-load
RUN python requirements.py load > requirements-load.txt && pip install -r requirements-load.txt

FROM deps-load AS build-load
COPY README.md ./
COPY app ./app
RUN pip install --no-deps .

FROM runtime AS load
# compare finds the scenarios here; matplotlib wants a writable config dir, and compose may run
# this image as the host user (to write ./results), who has no home directory in it
ENV LOOP_LAB_LOADTEST_DIR=/app/loadtest \
    MPLCONFIGDIR=/tmp/matplotlib
COPY --from=build-load /opt/venv /opt/venv
COPY loadtest ./loadtest
USER looplab
EXPOSE 8089 5557
CMD ["locust", "-f", "loadtest/multiplex.py"]

# ---- the matrix image: drives the Docker engine it is given (its socket) to build one server image
# per interpreter and run each cell; wrk drives the saturated runs, locust the 10k load. The tools
# come first, so a change to app/ reuses their layer.

FROM runtime AS matrix
RUN apt-get update \
    && apt-get install -y --no-install-recommends docker.io wrk \
    && rm -rf /var/lib/apt/lists/*
ENV LOOP_LAB_LOADTEST_DIR=/app/loadtest \
    MPLCONFIGDIR=/tmp/matplotlib
COPY --from=build-load /opt/venv /opt/venv
COPY loadtest ./loadtest
CMD ["loop-lab", "matrix", "--help"]
