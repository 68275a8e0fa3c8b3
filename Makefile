# wattproxy: `make demo` and `make test` work on a fresh machine (they create .venv).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test lint format bench services clean

DEMO_STAMP := $(VENV)/.installed-demo
TEST_EXTRAS := dev,e2e

# $(call install,EXTRAS): create .venv if needed and install the project with EXTRAS
define install
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "wattproxy needs Python >= 3.11 (set PYTHON=python3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$(1)]'
	touch $@
endef

# tests: lint tools, test tools, and torch (CPU) + transformers serve for the end-to-end test
$(STAMP): pyproject.toml
	$(call install,$(TEST_EXTRAS))

$(DEMO_STAMP): pyproject.toml
	$(call install,fast)

demo: $(DEMO_STAMP)
	$(BIN)/wattproxy demo

lint: $(STAMP)
	$(BIN)/ruff check proxy estimators tests bench
	$(BIN)/ruff format --check proxy estimators tests bench
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix proxy estimators tests bench
	$(BIN)/ruff format proxy estimators tests bench

services:
	bash scripts/ensure-redis.sh
	bash scripts/ensure-prometheus.sh
	bash scripts/ensure-chromium.sh

test: lint services
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	bash scripts/ensure-bench-tools.sh
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis demo-output
