# One command for each job; CI runs the same ones (.ci/run).
#   make run    set up a virtualenv, install Squall, serve on :8000 (embedded defaults)
#   make test   install what the tests need (system packages too) and run every test
#   make lint   ruff and mypy on server/ and handlers/

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: run test lint system-deps services clean bench bench-idle

$(STAMP): setup.cfg pyproject.toml
	@scripts/install-system-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,lint]'
	@touch $(STAMP)

# The demo room is on for local trying (127.0.0.1 only by default).
run: $(STAMP)
	SQUALL_SERVER_DEMO=1 $(BIN)/squall serve $(ARGS)

system-deps:
	@scripts/install-system-deps.sh

JS_STAMP := tests/js/node_modules/.installed

$(JS_STAMP): tests/js/package.json tests/js/package-lock.json
	cd tests/js && npm ci --no-audit --no-fund --silent
	@touch $(JS_STAMP)

# FerretDB (Go) and an OpenSearch node (Maven), built once into ~/.cache/squall.
services:
	@scripts/build-test-services.sh

test: system-deps $(STAMP) $(JS_STAMP) services
	$(BIN)/pytest --cov=server --cov=handlers --cov-report=term --cov-fail-under=80 $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check server handlers tests
	$(BIN)/ruff format --check server handlers tests
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

# Fan-out benchmark against peers (raw asyncio ceiling, plain Tornado); writes bench/results/.
bench: $(STAMP)
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# Memory per idle subscribed connection, against the same peers; writes bench/results/idle.md.
bench-idle: $(STAMP)
	$(BIN)/python -m bench.idle $(BENCH_ARGS)
