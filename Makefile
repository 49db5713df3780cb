# Two commands do all set-up on a fresh machine:
#   make run    -- the main job: a WASH simulation through `flwr run` on its defaults
#                  (4 SuperNodes, CPU is fine, Fashion-MNIST)
#   make test   -- the test suite
# Both create the virtual environment, install the project and prepare the data as needed.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision pair installed first (override for another platform or CUDA build).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DATASET ?= fashion-mnist
PYTEST_ARGS ?=

# Simulated federation: one SuperNode per member (num-members in pyproject.toml).
SUPERNODES ?= 4
CPUS_PER_CLIENT ?= 1
GPUS_PER_CLIENT ?= 0

export FLWR_TELEMETRY_ENABLED = 0
export FLWR_DISABLE_UPDATE_CHECK = 1
# The app's dependencies are installed in the venv; Flower must not build its own.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION = 1
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install data federation run population test lint bench compare clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -e '.[dev]'
	touch $@

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package when the machine has
# apt (no internet needed beyond the package mirror), else torchvision downloads it.
data: install
	@if [ "$(DATASET)" = fashion-mnist ] && [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ] \
	    && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -q && apt-get install -y -q dataset-fashion-mnist; fi
	$(PY) -m wash_fed.data prepare $(DATASET)

# Size Flower's local simulation federation once, so that a plain `flwr run .` has one
# SuperNode per member (this starts Flower's local SuperLink if it is not running).
federation: install
	flwr federation simulation-config @none/default local --num-supernodes $(SUPERNODES) \
	  --client-resources-num-cpus $(CPUS_PER_CLIENT) --client-resources-num-gpus $(GPUS_PER_CLIENT)

run: data federation
	flwr run . --stream

population: data
	$(PY) -m wash_fed.population

compare: data federation
	$(PY) -m simulations.compare

test: data
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: install
	$(PY) benchmarks/shuffle_throughput.py

clean:
	rm -rf $(VENV) runs
