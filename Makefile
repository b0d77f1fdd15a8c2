# Two commands do everything on a fresh machine:
#   make run    install what is missing, then start the whole stack (Ctrl-C stops it)
#   make test   install what is missing, then run the full suite against real services
SHELL := /bin/bash
PY_SYS ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FLYWHEEL_HOME ?= .flywheel
export FLYWHEEL_HOME
STAMP := $(VENV)/.installed
MODEL := $(FLYWHEEL_HOME)/models/base/model.safetensors
JARS := infra/kafka/lib/.complete

.PHONY: setup run up test test-fast lint format bench clean-state chromium

setup: $(STAMP) $(JARS) $(MODEL) chromium  ## install deps, fetch Kafka, prepare the default model; starts nothing
	@echo "setup: done (venv $(VENV), Kafka jars infra/kafka/lib, model $(FLYWHEEL_HOME)/models/base)"

$(STAMP): pyproject.toml constraints.txt infra/setup.sh
	@echo "setup: creating $(VENV) and installing pinned dependencies (uv; the llama.cpp wheel builds once per CPU) ..."
	VENV=$(VENV) PY_SYS=$(PY_SYS) bash infra/setup.sh
	@touch $@

$(JARS): infra/kafka/pom.xml | $(STAMP)
	@command -v java >/dev/null || { echo "setup: Java 17+ is missing: apt-get install -y openjdk-17-jre-headless"; exit 1; }
	@command -v mvn >/dev/null || { echo "setup: installing Maven ..."; apt-get update -qq && apt-get install -y -qq maven; }
	rm -rf infra/kafka/lib
	$(PY) -c "from infra.kafka_local import ensure_jars; ensure_jars()"
	@touch $@

$(MODEL): | $(STAMP)
	$(PY) -m infra.prepare_model
	$(PY) -m app.backends.gguf $(FLYWHEEL_HOME)/models/base  # llama.cpp's export at the serving precision

chromium:  ## Debian's Chromium for the browser tests (Playwright drives /usr/bin/chromium)
	@test -x /usr/bin/chromium || { echo "setup: installing Debian chromium ..."; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null; }

run: setup  ## start the whole stack in the foreground
	$(VENV)/bin/flywheel up

up: run

test: setup  ## the full suite (starts its own broker, Prefect harness, model, Chromium)
	$(PY) -m pytest -q --durations=25  # the slowest tests, so the suite's budget stays visible

test-fast: $(STAMP)  ## unit tests only (no services)
	$(PY) -m pytest -q -m "not integration and not browser and not slow"

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
