# The two commands a fresh machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint unit bench clean

$(STAMP): pyproject.toml scripts/install-system-deps.sh
	bash scripts/install-system-deps.sh
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

## demo: validate, render and plan the demo stack (grows with each feature)
demo: $(STAMP)
	$(BIN)/hxp validate -f examples/demo/stack.yaml
	$(BIN)/hxp graph -f examples/demo/stack.yaml
	$(BIN)/hxp render -f examples/demo/stack.yaml --target systemd --out out/demo/systemd
	$(BIN)/hxp render -f examples/demo/stack.yaml --target compose --out out/demo/compose
	$(BIN)/hxp render -f examples/demo/stack.yaml --target k8s --out out/demo/k8s
	$(BIN)/hxp plan -f examples/demo/stack.yaml

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

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
