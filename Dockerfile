# syntax=docker/dockerfile:1
# walstore image: `docker build -t walstore:0.1.0 .`
#
# Two stages. The build stage has the compiler and compiles the cffi extension with the
# same `pip install .` that `make install` runs (there editable, with the test extras);
# the runtime stage gets only the finished virtualenv, so no compiler, headers or pip
# cache ship. Both stages use the same base image on purpose: the venv's python is a
# symlink to the base image's /usr/local/bin/python3.11.
#
# Every Python package, the build tools included, comes at the version pinned in
# constraints.txt (tests/test_package.py checks the pins cover every dependency and that
# each pip command here uses them), so the same commit builds the same image.
#
# The base image should be pinned by digest, so that a rebuild gets the very same Debian
# and CPython bytes (tests/test_k8s_manifests.py accepts the tag with or without a well-formed digest). It is
# pinned by tag only for now: the digest has to be read from the registry, and the machine
# this was written on could not reach Docker Hub. Where it can, read the digest of the
# multi-arch index and put it here, tag kept for readers:
#   docker buildx imagetools inspect python:3.11-slim-bookworm   (the "Digest:" line)
#   or: docker pull python:3.11-slim-bookworm && docker images --digests python
# ARG PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:<that digest>
# A build can pin it without an edit: docker build --build-arg PYTHON_IMAGE=...@sha256:...
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/walstore
ENV PATH=/opt/walstore/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY constraints.txt setup.py pyproject.toml MANIFEST.in README.md ./
COPY native/ native/
COPY walstore/ walstore/
# The build tools first, pinned, then the package built with exactly those (no isolated
# build env that would fetch unpinned ones).
RUN pip install --no-cache-dir -c constraints.txt -U pip setuptools wheel cffi \
 && pip install --no-cache-dir -c constraints.txt --no-build-isolation .
# Fail the build, not the first pod, if the extension did not compile or the CLI cannot
# import. Run from / so the source tree in /src cannot shadow the installed package.
RUN cd / \
 && python -c 'import walstore._native as n; print("native module:", n.module_path())' \
 && walstore --help >/dev/null

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="walstore" \
      org.opencontainers.image.description="A replicated, durable event store on a write-ahead log"
# A fixed numeric uid/gid (10001) so Kubernetes can check runAsNonRoot and the pod's
# runAsUser/fsGroup match the owner of /data baked in here.
RUN groupadd --system --gid 10001 walstore \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin walstore \
 && mkdir -p /data/wal \
 && chown -R 10001:10001 /data \
 && chmod -R 0750 /data
COPY --from=build /opt/walstore /opt/walstore
# No .pyc writes: the root filesystem is read-only in Kubernetes. Unbuffered so log lines
# reach `kubectl logs` as they happen.
ENV PATH=/opt/walstore/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /data
# `docker run` without -v still keeps the WAL outside the container's writable layer.
VOLUME ["/data"]
# 8080: HTTP API, probes and /metrics (HTTP_PORT). 7070: the peer protocol (PEER_PORT).
EXPOSE 8080 7070
# walstore stops accepting, finishes the batch being synced and exits 0 on SIGTERM.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/live' % os.environ.get('HTTP_PORT', '8080'), timeout=2)"]
ENTRYPOINT ["walstore", "serve"]
