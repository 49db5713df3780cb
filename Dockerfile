# The wash-fed app image: Flower 1.42 (SuperLink, SuperNode, SuperExec) with the app and its
# dependencies, so that ServerApp and ClientApps run as subprocesses of the SuperLink and the
# SuperNodes (isolation "subprocess"). torch from PyPI is a CUDA build on x86_64: members use
# the GPU a container is given, and the CPU otherwise.
FROM python:3.11-slim

ARG TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"
# A package mirror for pip during the build only (not kept in the image), e.g. a company's
# index or, in `make compose-up` with podman, the wheel folders this machine's pip uses.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1 \
    WASH_FED_DATA=/data

RUN pip install ${TORCH_SPEC}

WORKDIR /app
COPY pyproject.toml README.md ./
COPY wash_fed wash_fed
COPY server server
COPY client client
RUN pip install . && useradd --uid 49999 --create-home app \
    && mkdir -p /data /app/runs /var/lib/wash-fed \
    && chown app /app/runs /var/lib/wash-fed
USER app
# make compose-up prunes earlier builds of this image by it once they are untagged.
LABEL io.wash-fed.image="app"
