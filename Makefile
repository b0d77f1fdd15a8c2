# Two commands do everything on a fresh machine:
#   make run    install what is missing, then start the whole stack (Ctrl-C stops it)
#   make test   install what is missing, then run the full suite against real services
SHELL := /bin/bash
PY_SYS ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FLYWHEEL_HOME ?= .flywheel
export FLYWHEEL_HOME
DEPS := $(VENV)/.deps
STAMP := $(VENV)/.installed
WHEEL := $(VENV)/.llama-wheel
MODEL := $(FLYWHEEL_HOME)/models/base/model.safetensors
JARS := infra/kafka/lib/.complete

.PHONY: setup run up test test-fast lint format bench clean-state chromium

setup:  ## install deps, fetch Kafka, prepare the default model; starts nothing (steps overlap: make -j)
	@$(MAKE) --no-print-directory -j4 $(STAMP) $(JARS) $(MODEL) chromium
	@echo "setup: done (venv $(VENV), Kafka jars infra/kafka/lib, model $(FLYWHEEL_HOME)/models/base)"

# The llama.cpp wheel (built once per CPU, minutes the first time; the system Python builds it) starts at once beside
# the Python tree (uv); the Kafka jars and the model follow the tree, Chromium needs nothing. The wheel's compile is
# the longest CPU-bound step, so everything beside it runs niced ($(NICE)): on 2 cores they would otherwise share the
# CPU evenly and stretch the wheel (369 s of a cold 371 s setup, measured 2026-12-03, with every step at one priority).
NICE := nice -n 10
$(DEPS): pyproject.toml constraints.txt infra/setup.sh
	@mkdir -p $(VENV) && echo "# setup $$(date -u +%FT%TZ)" >> $(VENV)/setup-times.txt
	VENV=$(VENV) PY_SYS=$(PY_SYS) $(NICE) bash infra/setup.sh deps
	@touch $@

$(WHEEL): infra/setup.sh constraints.txt  # needs only the system Python: starts at once, beside $(DEPS)
	@mkdir -p $(VENV) && VENV=$(VENV) PY_SYS=$(PY_SYS) bash infra/setup.sh wheel
	@touch $@

$(STAMP): $(DEPS) $(WHEEL)
	VENV=$(VENV) PY_SYS=$(PY_SYS) bash infra/setup.sh llama
	@touch $@

$(JARS): infra/kafka/pom.xml | $(DEPS)
	@command -v java >/dev/null || { echo "setup: Java 17+ is missing: apt-get install -y openjdk-17-jre-headless"; exit 1; }
	@command -v mvn >/dev/null || { echo "setup: installing Maven ..."; apt-get update -qq && apt-get install -y -qq maven; }
	@s=$$(date +%s); rm -rf infra/kafka/lib && $(NICE) $(PY) -c "from infra.kafka_local import ensure_jars; ensure_jars()" \
	  && echo "jars $$(( $$(date +%s) - s ))" >> $(VENV)/setup-times.txt
	@touch $@

$(MODEL): | $(DEPS)
	@s=$$(date +%s); $(NICE) $(PY) -m infra.prepare_model && echo "model $$(( $$(date +%s) - s ))" >> $(VENV)/setup-times.txt
	@s=$$(date +%s); $(NICE) $(PY) -m app.backends.gguf $(FLYWHEEL_HOME)/models/base \
	  && echo "gguf-export $$(( $$(date +%s) - s ))" >> $(VENV)/setup-times.txt  # llama.cpp's export, serving precision

# Debian's packages in one apt-get (two at once would fight over dpkg's lock): Chromium for the browser tests
# (Playwright drives /usr/bin/chromium), PostgreSQL for `flywheel db` (the shared app store, issue 20) and nginx
# for the balancer in front of app replicas (infra/balancer.py).
chromium:  ## Debian's Chromium, PostgreSQL and nginx, when missing
	@pkgs=""; test -x /usr/bin/chromium || pkgs="chromium"; \
	  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || pkgs="$$pkgs postgresql"; \
	  test -x /usr/sbin/nginx || pkgs="$$pkgs nginx-light"; \
	  test -z "$$pkgs" || { s=$$(date +%s); echo "setup: installing Debian $$pkgs ..."; \
	  ($(NICE) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(NICE) apt-get install -y -qq $$pkgs) >/dev/null \
	  && mkdir -p $(VENV) && echo "debian-packages $$(( $$(date +%s) - s ))" >> $(VENV)/setup-times.txt; }

run: setup  ## start the whole stack in the foreground
	$(VENV)/bin/flywheel up

up: run

# The suite runs on TEST_WORKERS pytest-xdist workers (each starts its own broker on free ports; a test file, or a
# group of files that share state, stays on one worker; the longest groups start first): mostly waiting on brokers,
# servers and subprocesses, so 3 workers on 2 cores. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 3
PYTEST_PAR = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

test: setup  ## the full suite (starts its own brokers, Prefect harness, model, Chromium); total time, 25 slowest
	@s=$$(date +%s); OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q $(PYTEST_PAR) --durations=25; rc=$$?; \
	  echo "make test: $$(( $$(date +%s) - s )) s in all, exit $$rc (the 25 slowest are listed above)"; exit $$rc

test-fast: $(STAMP)  ## unit tests only (no services), under a minute
	$(PY) -m pytest -q -m "not integration and not browser and not slow"

.PHONY: test-changed
test-changed: setup  ## the tests that import a package changed since origin/main or HEAD~1 (BASE=rev; tests/changed.py)
	@files=$$($(PY) -m tests.changed $(BASE)) || exit $$?; \
	  if [ -z "$$files" ]; then echo "test-changed: no test imports what changed"; exit 0; fi; \
	  s=$$(date +%s); $(PY) -m pytest -q $(PYTEST_PAR) --durations=10 $$files; rc=$$?; \
	  echo "make test-changed: $$(( $$(date +%s) - s )) s, exit $$rc"; exit $$rc

lint:
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format:
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

bench: setup  ## every benchmark, JSON into benchmarks/results/
	mkdir -p benchmarks/results
	$(PY) -m benchmarks.ingest --events 200000 --json | tee benchmarks/results/ingest.json
	$(PY) -m benchmarks.train --json | tee benchmarks/results/train.json
	$(PY) -m benchmarks.serve --target api --users 1,8 --requests-per-user 2 --json | tee benchmarks/results/serve.json

clean-state:  ## delete $(FLYWHEEL_HOME) (broker data, warehouse, models, snapshots)
	rm -rf $(FLYWHEEL_HOME)
