# The two commands a user needs: `make demo` and `make test`. Both set up .venv themselves.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo bench lint

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,demo]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/python examples/demo.py

bench: install
	$(BIN)/python benchmarks/kernels.py

lint: install
	$(BIN)/ruff check sparsedsl tests benchmarks examples
