# Two commands for a fresh machine: `make quickstart` and `make test`. Each creates .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
# torch first, on its own: a pinned build (the CPU wheel where one is on disk, as in CI), not whatever the
# package resolver would choose. GPU users: `make TORCH=torch ...` takes the newest build from your index.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.lora-tune-installed
QUICKSTART_BASE ?= runs/quickstart-base

.PHONY: install quickstart test lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/python scripts/build_quickstart_base.py --output $(QUICKSTART_BASE)
	$(BIN)/lora-tune validate recipes/quickstart.yaml
	$(BIN)/lora-tune train recipes/quickstart.yaml --overwrite
	$(BIN)/lora-tune eval runs/quickstart --data recipes/data/quickstart/test.jsonl --base

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf runs .pytest_cache .ruff_cache
