# Ratchet service image.
#
# Build it with images/build.sh, which first puts the wheels this file installs under
# images/.wheels (app/: the ratchet wheel, deps/: the locked dependency set of
# requirements/service.txt for the image's Python, and that file, whose hashes are checked
# again here; deps-ray/: the same of requirements/ray.txt, with DEPS=deps-ray, for
# `images/build.sh --with-ray`). The build itself needs no network: nothing is downloaded inside it.
#
# BASE_IMAGE: python:3.11-slim by default; images/build.sh passes
# ratchet/base:bookworm (Debian's python3 3.11, made from Debian packages) when no
# registry is reachable. Any base with python3 and the venv module works as long as its
# Python version matches the downloaded wheels.
#
# Running it: the service drives the host's container engine through its socket, so
# mount /var/run/docker.sock and give the container the socket's group, e.g.
#   docker run -d -p 127.0.0.1:8080:8080 -v ratchet-data:/data \
#     -v /var/run/docker.sock:/var/run/docker.sock \
#     --group-add "$(stat -c %g /var/run/docker.sock)" ratchet/service:latest
# (compose.yaml does the same.) Access to that socket is root-equivalent on the host:
# publish the port only where the API callers are trusted to that degree.
ARG BASE_IMAGE=python:3.11-slim
ARG DEPS=deps

# Stage 1: a virtual environment with the dependencies (changes rarely, stays cached).
FROM ${BASE_IMAGE} AS deps
ARG DEPS
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
RUN set -eu; \
    if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then \
        apt-get update; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    python3 -m venv /opt/ratchet; \
    /opt/ratchet/bin/python -m pip uninstall -q -y setuptools
COPY images/.wheels/${DEPS}/ /tmp/wheels/deps/
RUN /opt/ratchet/bin/pip install -q --no-index --find-links /tmp/wheels/deps --require-hashes --no-deps \
        -r /tmp/wheels/deps/requirements.txt

# Stage 2: the runtime image; only the last layers change when the service code does.
FROM ${BASE_IMAGE}
ARG RATCHET_VERSION=dev
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN set -eu; \
    # git builds the loops' history bundles (GET /v1/loops/{id}/history.bundle)
    if ! command -v python3 >/dev/null 2>&1 || ! command -v git >/dev/null 2>&1; then \
        apt-get update; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 git; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    groupadd --system --gid 10001 ratchet; \
    useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/ratchet \
        --shell /usr/sbin/nologin ratchet; \
    install -d -o 10001 -g 10001 -m 0750 /data
COPY --from=deps /opt/ratchet /opt/ratchet
COPY images/.wheels/app/ /tmp/wheels/app/
RUN set -eu; \
    /opt/ratchet/bin/pip install -q --no-index --no-deps /tmp/wheels/app/*.whl; \
    /opt/ratchet/bin/pip check; \
    /opt/ratchet/bin/python -c 'import litestar, msgspec, aiosqlite, docker, prometheus_client, uvicorn, httpx, service, sandbox, client, nodeagent'; \
    git --version >/dev/null; \
    rm -rf /tmp/wheels

ENV PATH=/opt/ratchet/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RATCHET_HOST=0.0.0.0 \
    RATCHET_PORT=8080 \
    RATCHET_DATA_DIR=/data

LABEL org.opencontainers.image.title="ratchet-service" \
      org.opencontainers.image.description="Ratchet: autoresearch loops as a service" \
      org.opencontainers.image.version="${RATCHET_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

USER 10001:10001
WORKDIR /home/ratchet
VOLUME ["/data"]
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]
STOPSIGNAL SIGTERM
CMD ["ratchet", "serve", "--host", "0.0.0.0", "--port", "8080", "--data-dir", "/data"]
