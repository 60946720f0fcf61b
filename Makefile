# The two commands a user needs: `make demo` and `make test`. Both set up .venv themselves.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test fuzz demo bench bench-model lint gpu-cache

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0 2>&1 | grep -v "is ignored" || true
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test,demo,bench]' 2>&1 | grep -v -e "is ignored" -e "^ " -e "^$$" || true
	$(BIN)/python -c "import torch, tvm, sparsedsl"
	touch $(STAMP)

# One pytest worker per core (xdist), each test file on one worker (its compiled fixtures built once)
PYTEST := $(BIN)/python -m pytest -q -p no:cacheprovider -n auto --dist loadfile

test: install
	$(PYTEST) tests

# Every test named fuzz at length (make test runs a few fixed examples of each); FUZZ_EXAMPLES=1000 for longer
FUZZ_EXAMPLES ?= 200
fuzz: install
	SPARSEDSL_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PYTEST) tests -k fuzz

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/python examples/demo.py

bench: install
	$(BIN)/python benchmarks/kernels.py

# MiniLM end to end against dense, torch CSR and DeepSparse (in its own venv: it pins old packages)
bench-model: install
	test -x .venv-deepsparse/bin/python || ($(PY) -m venv .venv-deepsparse && \
	  .venv-deepsparse/bin/pip install --quiet --disable-pip-version-check deepsparse==1.8.0 onnx)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/model.py

# What a GPU machine without TVM, nvcc or lark needs to run tests/cuda/test_gpu.py and benchmarks/gpu.py
# (docs/ARCHITECTURE.md, "Running on a GPU machine without TVM"): the kernels, prebuilt for ARCH, and lark
ARCH ?= sm_90
gpu-cache: install
	$(BIN)/python -m tests.cuda.gpu_cases --arch $(ARCH) --cache .gpucache
	$(BIN)/python benchmarks/gpu.py --prebuild $(ARCH) --cache .gpucache
	$(BIN)/pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: -d .whl "lark>=1.1"

lint: install
	$(BIN)/ruff check sparsedsl tests benchmarks examples
