# One command to serve, one to test. Every target sets up .venv first if it is missing or stale.
#   make serve [MODEL=path] [HOST=0.0.0.0] [PORT=8000]
#   make test | make test-image | make lint | make bench | make bench-peer | make clean | make distclean

# The interpreter that builds .venv: the first of python3, python3.13, python3.12, python3.11 on PATH that is
# Python >= 3.11 (PYTHON=/path/to/python picks another). The install step says so when none is.
PY_OK  := import sys; sys.exit(sys.version_info < (3, 11))
ifeq ($(origin PYTHON),undefined)
PYTHON := $(firstword $(foreach p,python3 python3.13 python3.12 python3.11,$(shell \
	p=$$(command -v $(p) 2>/dev/null) && "$$p" -c '$(PY_OK)' 2>/dev/null && echo "$$p")))
endif
VENV   ?= .venv
BIN    := $(VENV)/bin
# Re-install only when the dependency list changes; a second `make install` is a no-op.
STAMP  := $(VENV)/.customllm-installed

# torch goes in first and pinned: pip then keeps it when it resolves the package's `torch>=2.4`,
# instead of choosing a multi-GB CUDA build. The Dockerfile runs the same two installs
# (tests/test_packaging.py checks that they agree).

MODEL ?=
HOST  ?= 127.0.0.1
PORT  ?= 8000
BENCH ?= bench/run_all.py
PEER_ARGS ?=

.PHONY: install serve test test-image lint typecheck bench bench-peer clean distclean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || { \
	  if [ -z "$(PYTHON)" ] || ! "$(PYTHON)" -c '$(PY_OK)' 2>/dev/null; then \
	    echo "error: building $(VENV) needs Python >= 3.11, but $(if $(PYTHON),$(PYTHON) is \
	$$("$(PYTHON)" --version 2>&1 || echo 'not runnable'),none of python3 python3.13 python3.12 python3.11 on PATH \
	is (python3: $$(python3 --version 2>&1 || echo 'not found'))). Install Python 3.11 or newer, or pass PYTHON=/path/to/it." >&2; \
	    exit 1; \
	  fi; \
	  echo "$(PYTHON) -m venv $(VENV)"; "$(PYTHON)" -m venv $(VENV); }
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/customllm-server $(if $(MODEL),--model '$(MODEL)') --host '$(HOST)' --port '$(PORT)'

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

typecheck: $(STAMP)
	$(BIN)/mypy

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	# Build the CPU extension once up front, so no test's server start pays for the compile (it is cached).
	$(BIN)/python -m model.ops.extension build || echo 'CPU extension not built: the tests run the torch paths'
	$(BIN)/pytest -q -rs

# Only the image tests (tests/image/): builds the image with podman (docker/podman/) or docker, runs it and the
# compose stack. They skip, saying why, where containers cannot run.
test-image: $(STAMP)
	$(BIN)/pytest -q -rs tests/image

bench: $(STAMP)
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python $(BENCH)

# vLLM's CPU backend next to this server (bench/peer.py): vLLM goes into its own venv under
# ~/.cache/customllm-bench (CUSTOMLLM_BENCH_CACHE), never into .venv. PEER_ARGS='--skip-vllm' etc.
bench-peer: $(STAMP)
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python bench/peer.py $(PEER_ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
