# Two commands for a fresh machine: `make quickstart` and `make test`. Each creates .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
# torch first, on its own: a pinned build (the CPU wheel where one is on disk, as in CI), not whatever the
# package resolver would choose. On a GPU machine the same pin takes the CUDA build of that release from PyPI;
# requirements.lock pins the same release (without a build label), so both satisfy it.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.lora-tune-installed
LATEST ?= .venv-latest
QUICKSTART_BASE ?= runs/quickstart-base

.PHONY: install llama-cpp lock quickstart test test-isa test-latest docs lint format clean

install: $(STAMP)

# The tested set from requirements.lock (scripts/lock.sh makes it), then lora-tune itself without resolving again,
# then pip check: a fresh machine gets the versions the suite passed with, not last night's releases.
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(BIN)/python -m pip check
	touch $(STAMP)

# Refresh the lock to today's newest releases within pyproject.toml's ranges (then run make test and commit it).
lock:
	PYTHON=$(PYTHON) TORCH="$(TORCH)" scripts/lock.sh

# The suite against the newest releases, in its own venv, leaving the lock and .venv alone: finds drift on purpose.
test-latest:
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST)/bin/python -c "import torch" 2>/dev/null || $(LATEST)/bin/python -m pip install --quiet "$(TORCH)"
	$(LATEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[dev]"
	$(LATEST)/bin/python -m pip freeze | grep -iE '^(torch|transformers|peft|trl|bitsandbytes|datasets|accelerate)=='
	$(LATEST)/bin/ruff check .
	$(LATEST)/bin/python -m pytest -q

quickstart: $(STAMP)
	$(BIN)/python scripts/build_quickstart_base.py --output $(QUICKSTART_BASE)
	$(BIN)/lora-tune validate recipes/quickstart.yaml
	$(BIN)/lora-tune train recipes/quickstart.yaml --overwrite
	$(BIN)/lora-tune eval runs/quickstart --data recipes/data/quickstart/test.jsonl --base

# llama.cpp's binding, for the GGUF and serving tests: compiled once per machine, then taken from the wheel cache.
llama-cpp: $(STAMP)
	scripts/install_llama_cpp.sh $(BIN)/python

test: $(STAMP) llama-cpp
	$(BIN)/ruff check .
	$(BIN)/python scripts/real_material.py || echo "real material unavailable: tests/e2e/test_real_templates.py skips"
	$(BIN)/python -m pytest -q

# The manual (docs/) as a site in runs/site; --strict: a link between pages or an anchor that does not resolve fails.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# The suite once per torch CPU kernel path (default, avx2, native): thresholds must hold on all three.
test-isa: $(STAMP)
	scripts/test_isa.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit/test_layers.py

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf runs .pytest_cache .ruff_cache
