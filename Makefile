# Every target builds and uses a local venv, so a fresh clone needs nothing installed by hand.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench compare claims clean system-deps overhead compose-test test-python \
	matrix matrix-quick

# Debian packages the tests run as real programs (docker-compose validates the compose file,
# prometheus/promtool check and scrape). Append yours: SYSTEM_PACKAGES += chromium
SYSTEM_PACKAGES := docker-compose prometheus
# the dashboard's browser test drives Debian's Chromium (Playwright's own download cannot work here)
SYSTEM_PACKAGES += chromium
# loop-lab matrix drives saturated throughput with wrk
SYSTEM_PACKAGES += wrk
# /db's PostgreSQL tests and claim start a throwaway cluster from Debian's binaries (app.pgcluster)
SYSTEM_PACKAGES += postgresql
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/loop-lab serve --host 127.0.0.1 --port 8080

test: $(STAMP) system-deps
	$(BIN)/python -m pytest

# Installs only what is missing, so it costs one dpkg-query per package when all are there.
system-deps:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -qx 'install ok installed' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
		echo "system-deps: installing" $$missing; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# The images built and docker-compose.yml run on a real Docker engine (docs/compose.md): starts
# dockerd if none answers (root; installs docker.io if missing) and stops it afterwards. About 1 min
# warm, 4 min cold (base-image stand-ins debootstrapped and cached in /var/cache/loop-lab).
compose-test: $(STAMP)
	$(BIN)/python -m scripts.compose_test

# The suite on another interpreter, in a container of its Python image (docs/matrix.md); the
# `host` tests (Chromium, Prometheus, PostgreSQL, Docker) stay on the default interpreter.
PY ?= 3.14
test-python: $(STAMP)
	$(BIN)/python -m scripts.docker_engine $(BIN)/python -m scripts.test_in_container $(PY)

# Claims, saturated throughput (wrk) and 10,000 connections per interpreter x loop, each in its
# own container, run through docker-compose's `matrix` profile as a user would (docs/matrix.md;
# about 60 minutes with the callgrind cells). matrix-quick is CI's form (about 5 minutes).
MATRIX_ARGS ?= --pythons 3.11,3.13,3.14,3.15
matrix: $(STAMP) system-deps
	$(BIN)/python -m scripts.matrix_compose $(MATRIX_ARGS) --out results/matrix

matrix-quick: $(STAMP) system-deps
	$(BIN)/python -m scripts.matrix_compose --quick --pythons 3.11,3.14 --out results/matrix-quick

lint: $(STAMP)
	$(BIN)/ruff check app loadtest tests deploy scripts
	$(BIN)/ruff format --check app loadtest tests deploy scripts
	$(BIN)/mypy

# Regenerates docs/claims.md from a real run; written via a temp file so a failed run keeps the old page.
claims: $(STAMP)
	$(BIN)/loop-lab claims --markdown > docs/claims.md.tmp
	mv docs/claims.md.tmp docs/claims.md

# The headline run: one thread, one selector, 10,000 connections (override: make bench BENCH_ARGS=...).
BENCH_ARGS ?= multiplex --users 10000 --delay 10 --duration 60
bench: $(STAMP)
	$(BIN)/loop-lab bench $(BENCH_ARGS) --out results/bench

# asyncio vs uvloop at 10,000 connections, 3 alternating rounds (about 8 minutes).
COMPARE_ARGS ?= --scenario multiplex --users 10000 --delay 10 --duration 60 --rounds 3
compare: $(STAMP)
	$(BIN)/loop-lab compare $(COMPARE_ARGS) --out results/compare

# Instrumentation overhead: loop-lab vs a bare aiohttp server with wrk, both loops, alternating
# rounds (about 7 minutes; installs Debian's wrk if missing). Exits 1 if a target is missed.
OVERHEAD_ARGS ?= --rounds 5 --duration 10
overhead: $(STAMP)
	$(BIN)/python scripts/overhead.py $(OVERHEAD_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
