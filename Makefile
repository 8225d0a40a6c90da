# memcluster developer commands. Every target that needs the tools installs them first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# apt-get needs root: sudo unless we are root already.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install test test-fast verify fix bench etcd up clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP) etcd
	$(BIN)/python -m pytest

test-fast: $(STAMP) etcd
	$(BIN)/python -m pytest -m "not slow"

verify: $(STAMP)
	$(BIN)/ruff format --check src tests bench
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

fix: $(STAMP)
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

bench: $(STAMP) etcd
	$(BIN)/python -m bench.engine
	$(BIN)/python -m bench.server
	$(BIN)/python -m bench.agents
	$(BIN)/python -m bench.cluster --json bench/out/cluster.json
	$(BIN)/python -m bench.replication --json bench/out/replication.json

# etcd (Debian's etcd-server): the cluster's tests run it, bench.agents measures beside it.
etcd:
	command -v etcd >/dev/null || ($(SUDO) apt-get update && $(SUDO) apt-get install -y etcd-server)

up: $(STAMP) etcd
	$(BIN)/memcluster up --nodes 3 --data ./memcluster-cluster

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
