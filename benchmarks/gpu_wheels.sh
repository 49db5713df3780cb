#!/usr/bin/env bash
# Download, into .whl/, the wheels a GPU machine that has torch but no Flower needs for
# benchmarks/gpu_check.sh (Python 3.12, x86-64 Linux; set PY_VERSION for another): Flower
# 1.42 and those of its dependencies that such an image commonly lacks, at the versions
# this project's environment was tested with. Ray is left out
# (its wheel alone is larger than what can be carried), so the check's simulation step is
# skipped there. Nothing here runs on the GPU machine; gpu_check.sh installs .whl/ itself.
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION=${PY_VERSION:-3.12}
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d .whl \
  flwr==1.42.0 alembic==1.20.1 mako==1.4.3 sqlalchemy==2.1.9 greenlet==3.5.6 \
  cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 fastapi==0.138.2 starlette==1.3.1 \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  uvicorn==0.49.0 iterators==0.0.2 prompt-toolkit==3.0.53 wcwidth==0.9.4 \
  pycryptodome==3.24.1 tomli==2.5.0 tomli-w==1.2.0 grpcio-health-checking==1.81.1 \
  protobuf==6.33.6
du -sh .whl
