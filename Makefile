# Two commands do all set-up on a fresh machine:
#   make run    -- the main job: a WASH simulation through `flwr run` on its defaults
#                  (4 SuperNodes, CPU is fine, Fashion-MNIST)
#   make test   -- the test suite, both lanes (make test-fast: the unit lane alone)
# Both create the virtual environment, install the project and prepare the data as needed.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision pair installed first (override for another platform or CUDA build).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DATASET ?= fashion-mnist
# Two test processes: the deployment tests spend much of their time waiting on Flower's
# polls, so a second process roughly uses the idle core (PYTEST_ARGS="-n 0": one process).
PYTEST_ARGS ?= -n 2 --dist worksteal

# Simulated federation: one SuperNode per member (num-members in pyproject.toml).
SUPERNODES ?= 4
CPUS_PER_CLIENT ?= 1
GPUS_PER_CLIENT ?= 0

export FLWR_TELEMETRY_ENABLED = 0
export FLWR_DISABLE_UPDATE_CHECK = 1
# The app's dependencies are installed in the venv; Flower must not build its own.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION = 1
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install data federation run stop population test test-fast lint docs bench compare \
	compose-up compose-down clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -e '.[dev]'
	touch $@

# Debian packages, installed when missing and the machine has apt and we are root:
# Fashion-MNIST's files (no internet needed beyond the package mirror; elsewhere torchvision
# downloads them), and for the tests a real Prometheus, a compose implementation, nginx (the
# compose stack's proxy), openssl and ssh-keygen (the key scripts). Packages are installed
# without starting their services (policy-rc.d): the tests run their own instances. apt waits
# for another package manager's lock (unattended upgrades) instead of failing.
APT_RUN := dataset-fashion-mnist
APT_TEST := prometheus docker-compose nginx-light openssl openssh-client

define apt_install
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    if [ ! -e /usr/sbin/policy-rc.d ]; then \
	      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d; \
	      trap 'rm -f /usr/sbin/policy-rc.d' EXIT; fi; \
	    apt-get -o DPkg::Lock::Timeout=600 update -q && \
	      apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends $$missing; \
	  else echo "note: missing Debian packages:$$missing"; fi; fi
endef

data: install
	$(call apt_install,$(APT_RUN))
	$(PY) -m wash_fed.data prepare $(DATASET)

# Size Flower's local simulation federation once, so that a plain `flwr run .` has one
# SuperNode per member (this starts Flower's local SuperLink if it is not running).
federation: install
	flwr federation simulation-config @none/default local --num-supernodes $(SUPERNODES) \
	  --client-resources-num-cpus $(CPUS_PER_CLIENT) --client-resources-num-gpus $(GPUS_PER_CLIENT)

# The launcher checks the run configuration first and exits non-zero unless the run
# finished completed (`flwr run` itself exits 0 whatever became of the run).
RUN_CONFIG ?=
run: data federation
	$(PY) -m simulations.launch --run-config "$(RUN_CONFIG)"

# `flwr run` leaves Flower's local SuperLink running in the background, with the environment
# of the run that started it (Flower 1.42 has no command to stop it); stop it after
# reinstalling or changing the venv. Its SuperExec child exits with it.
FLWR_HOME ?= $(HOME)/.flwr
stop:
	pkill -f -- '[-]-database $(FLWR_HOME)/local-superlink/state.db' || true

population: data
	$(PY) -m wash_fed.population

compare: data federation
	$(PY) -m simulations.compare

# The compose deployment all on this machine (docs/deployment.md): the server host's services
# and a node host of MEMBERS members, from the same pieces as the roles on several machines
# (deploy/roles.py): an engine (podman + docker-compose installed when root and none runs),
# base images (local stand-ins only where no registry answers), wash-fed:latest from the
# Dockerfile, certificates and node keys, the SuperNodes registered and online (one GPU each
# where nvidia-smi lists GPUs). Then: flwr run . wash-fed-compose --stream
MEMBERS ?= 4
compose-up: data
	$(PY) -m deploy.roles all-in-one --members $(MEMBERS)

compose-down: install
	$(PY) -m deploy.roles down all-in-one

# Two lanes: tests/unit needs no Flower process (minutes), tests/e2e runs real Flower,
# Prometheus, nginx and containers; `make test` runs both.
test: data
	$(call apt_install,$(APT_TEST))
	$(PY) -m pytest $(PYTEST_ARGS) tests

test-fast: data
	$(PY) -m pytest $(PYTEST_ARGS) tests/unit

# The docs site (MkDocs, offline): every page, link and anchor checked (--strict).
docs: install
	$(VENV)/bin/mkdocs build --strict --quiet

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: install
	$(PY) benchmarks/shuffle_throughput.py

clean: stop
	rm -rf $(VENV) runs site
