# One command for each job; CI runs the same ones (.ci/run).
#   make run    set up a virtualenv, install Squall, serve on :8000 (embedded defaults)
#   make test   install what the tests need (system packages too) and run every test
#   make lint   ruff on server/ handlers/ tests/ bench/, mypy on server/ and handlers/

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: run test lint proto system-deps services clean bench bench-sse bench-pusher bench-hotpath bench-idle bench-fanout bench-workers bench-scale bench-http bench-storm bench-publish bench-deps

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
	$(BIN)/ruff check server handlers tests bench reliability
	$(BIN)/ruff format --check server handlers tests bench reliability
	$(BIN)/mypy

# Regenerate the Centrifugo protocol's Python module from our own .proto
# (the generated file is committed; protoc comes with grpcio-tools).
proto: $(STAMP)
	$(BIN)/pip install --quiet grpcio-tools
	cd server/codecs && ../../$(BIN)/python -m grpc_tools.protoc -I. --python_out=. centrifuge.proto

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

# Benchmarks (bench/README.md): every scenario against its peers, written to
# bench/results/ (JSON, markdown tables, PNG plots). One target per scenario;
# `make bench` runs them all (about 65 minutes on 2 cores).
BENCH_STAMP := bench/node/node_modules/.installed
$(BENCH_STAMP): bench/node/package.json bench/node/package-lock.json
	cd bench/node && npm ci --no-audit --no-fund --silent
	@touch $(BENCH_STAMP)

bench-deps: $(STAMP) $(BENCH_STAMP)
	@scripts/install-system-deps.sh bench
	$(BIN)/pip install --quiet -e '.[bench]'

bench: bench-hotpath bench-fanout bench-codecs bench-sse bench-pusher bench-idle bench-workers bench-scale bench-http bench-storm bench-publish

# The fan-out path in-process (ns of Python per delivery, no kernel).
bench-hotpath: bench-deps
	$(BIN)/python -m bench.hotpath $(BENCH_ARGS)

bench-fanout: bench-deps
	$(BIN)/python -m bench.run --name fanout-burst --subscribers 100,1000 --publications 1000 $(BENCH_ARGS)
	$(BIN)/python -m bench.run --name fanout-10k --subscribers 10000 --publications 100 --reps 1 $(BENCH_ARGS)
	$(BIN)/python -m bench.run --name fanout-rate --subscribers 1000 --publications 100 --rate 10 $(BENCH_ARGS)
	$(BIN)/python -m bench.run --name fanout-bursts --subscribers 1000 --publications 500 --rate 100 --burst 10 $(BENCH_ARGS)
	$(BIN)/python -m bench.run --name fanout-channels --subscribers 10000 --channels 10000 --per-subscriber 2 --publications 100000 --reps 1 $(BENCH_ARGS)

# SSE against WebSocket on one Squall: CPU per delivery (1,000 and 10,000
# subscribers) and memory per idle connection (about 12 minutes).
bench-sse: bench-deps
	$(BIN)/python -m bench.sse $(BENCH_ARGS)

# The Pusher codec against Squall's own on one Squall: CPU per delivery at
# 1,000 and 10,000 subscribers, the same publisher (target: within 1.15x).
bench-pusher: bench-deps
	$(BIN)/python -m bench.pusher $(BENCH_ARGS)

# Squall's codecs (its own, Centrifugo JSON, Centrifugo Protobuf) and
# Centrifugo itself (GOMAXPROCS=1, same core), publishing through each
# server's HTTP API: 100, 1,000, 10,000 subscribers, as fast as accepted and
# at 10,000 deliveries/s (about 15 minutes). Centrifugo is built once into
# ~/.cache/squall by scripts/build-centrifugo.sh (Go).
.PHONY: bench-codecs
bench-codecs: bench-deps
	@scripts/build-centrifugo.sh
	$(BIN)/python -m bench.codecs --subscribers 100,1000,10000 --reps 3 $(BENCH_ARGS)

bench-idle: bench-deps
	$(BIN)/python -m bench.idle --connections 1000,5000 $(BENCH_ARGS)
	$(BIN)/python -m bench.idle --name idle-max --connections 19000 --reps 1 --peers raw_asyncio,squall $(BENCH_ARGS)

bench-workers: bench-deps
	$(BIN)/python -m bench.run --name workers --peers squall,squall_redis,squall_2workers --subscribers 1000 --publications 1000 $(BENCH_ARGS)
	$(BIN)/python -m bench.run --name workers-rate --peers squall,squall_redis,squall_2workers --subscribers 1000 --publications 100 --rate 10 $(BENCH_ARGS)

# 50,000 connections: four workers on Redis, four generator processes (no
# process here may hold more than 20,000 sockets).
bench-scale: bench-deps
	$(BIN)/python -m bench.scale --connections 50000 --workers 4 --generators 4 --publications 60 --rate 1 $(BENCH_ARGS)

bench-http: bench-deps
	$(BIN)/python -m bench.http $(BENCH_ARGS)

bench-storm: bench-deps
	$(BIN)/python -m bench.storm $(BENCH_ARGS)

# The publish path (issue 17): single requests, batches of 100, the API
# stream and client publishes to 10,000 channels, beside Centrifugo (memory
# and Redis engines); one py-spy flame graph a Squall path
# (bench/results/flame-publish-<path>.svg); then the fan-out shapes where a
# publication's own cost counts: 10,000 channels x 2 subscribers beside
# Centrifugo (100 subscribers: bench-codecs). About 20 minutes.
bench-publish: bench-deps
	@scripts/build-centrifugo.sh
	$(BIN)/python -m bench.publish --reps-subscribed 1 $(BENCH_ARGS)
	$(BIN)/python -m bench.publish --profile publish --subscribers 0 $(BENCH_ARGS)
	$(BIN)/python -m bench.run --name fanout-channels-cf --peers squall,centrifugo --subscribers 10000 --channels 10000 --per-subscriber 2 --publications 100000 --reps 2 --publish http $(BENCH_ARGS)

# Soak (reliability/soak.py): 10,000 connections with churn, fan-out and API
# calls on two workers over Redis for SOAK_MINUTES (default 30); fails on a
# leak trend, loop-lag p99 over 50 ms, or any lost publication. Results in
# reliability/results/soak-<time>.{json,md,png}.
.PHONY: soak
soak: $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python -m reliability.soak $(SOAK_ARGS)

# A Jepsen-style chaos campaign (reliability/chaos/README.md): three nodes
# behind HAProxy on Redis and a shared durable log, faults through Toxiproxy
# and signals, every client's history checked. CHAOS_SECONDS (300),
# CHAOS_SEED (random; the report names it), CHAOS_SUBSCRIBERS (1000).
.PHONY: chaos
chaos: $(STAMP) services
	@scripts/build-toxiproxy.sh
	$(BIN)/python -m reliability.chaos $(CHAOS_ARGS)

# Fuzzing (reliability/fuzz/README.md): the WebSocket frame parser, the
# protocol decoders and the HTTP APIs under hypothesis and atheris, up to
# FUZZ_EXAMPLES examples per target and engine (default 1,000,000), at most
# FUZZ_SECONDS per run (default 600; FUZZ_HYPOTHESIS_SECONDS for hypothesis
# runs), a progress line at least every 30 s; the report (JSON, markdown)
# goes to reliability/results/fuzz-<time>.*. FUZZ_TARGETS, FUZZ_ENGINES and
# FUZZ_SEED narrow or reseed it.
.PHONY: fuzz
fuzz: $(STAMP)
	$(BIN)/pip install --quiet -e '.[fuzz]'
	$(BIN)/python -m reliability.fuzz $(FUZZ_ARGS)
