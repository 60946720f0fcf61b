# The two commands a user needs: `make demo` and `make test`. Both set up .venv themselves.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo bench bench-model lint

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0 2>&1 | grep -v "is ignored" || true
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test,demo,bench]' 2>&1 | grep -v -e "is ignored" -e "^ " -e "^$$" || true
	$(BIN)/python -c "import torch, tvm, sparsedsl"
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/python examples/demo.py

bench: install
	$(BIN)/python benchmarks/kernels.py

# MiniLM end to end against dense, torch CSR and DeepSparse (in its own venv: it pins old packages)
bench-model: install
	test -x .venv-deepsparse/bin/python || ($(PY) -m venv .venv-deepsparse && \
	  .venv-deepsparse/bin/pip install --quiet --disable-pip-version-check deepsparse==1.8.0 onnx)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/model.py

lint: install
	$(BIN)/ruff check sparsedsl tests benchmarks examples
