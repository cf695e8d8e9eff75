# The two commands a fresh machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-down fleet-demo fleet-demo-down test lint unit bench clean

# The demo keeps its store, process state and Prefect server in the checkout.
DEMO_ENV := HXP_STATE_DIR=$(CURDIR)/.hxp-state
DEMO := examples/demo/stack.yaml

$(STAMP): pyproject.toml scripts/install-system-deps.sh
	bash scripts/install-system-deps.sh
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

## demo: deploy the demo stack on local processes with a local Prefect server; demo-down ends it
demo: $(STAMP)
	$(BIN)/hxp validate -f $(DEMO)
	$(BIN)/hxp graph -f $(DEMO)
	$(BIN)/hxp render -f $(DEMO) --target systemd --out out/demo/systemd
	$(BIN)/hxp render -f $(DEMO) --target compose --out out/demo/compose
	$(BIN)/hxp render -f $(DEMO) --target k8s --out out/demo/k8s
	$(DEMO_ENV) $(BIN)/hxp server start
	$(DEMO_ENV) $(BIN)/hxp plan -f $(DEMO)
	$(DEMO_ENV) $(BIN)/hxp apply -f $(DEMO)
	$(DEMO_ENV) $(BIN)/hxp apply -f $(DEMO)
	$(DEMO_ENV) $(BIN)/hxp status -f $(DEMO)
	$(BIN)/hxp render -f $(DEMO) --target monitoring --out out/demo/monitoring
	$(DEMO_ENV) $(BIN)/hxp monitoring -f $(DEMO)
	@echo
	@echo "Demo running (stop everything with: make demo-down):"
	@$(DEMO_ENV) $(BIN)/hxp urls -f $(DEMO)

demo-down: $(STAMP)
	$(DEMO_ENV) $(BIN)/hxp monitoring -f $(DEMO) --down
	$(DEMO_ENV) $(BIN)/hxp down -f $(DEMO)
	$(DEMO_ENV) $(BIN)/hxp server stop

## fleet-demo: three fleet-lab hosts (network namespaces; root only) deployed through the local
## Prefect server, URLs printed; fleet-demo-down removes all of it
FLEET_DEMO_ENV := HXP_STATE_DIR=$(CURDIR)/.hxp-fleet-demo

fleet-demo: $(STAMP)
	$(FLEET_DEMO_ENV) $(BIN)/python scripts/fleet_demo.py up

fleet-demo-down: $(STAMP)
	$(FLEET_DEMO_ENV) $(BIN)/python scripts/fleet_demo.py down

## test: lint, type-check the core, run every test (slow real-service tests included)
test: $(STAMP) lint
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## unit: the fast tests only
unit: $(STAMP)
	$(BIN)/pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/graph_scale.py
	$(BIN)/python bench/deploy.py
	$(BIN)/python bench/lifecycle.py
	$(BIN)/python bench/rollback.py

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
