# Two commands do everything on a fresh machine:
#   make quickstart  set up .venv (once) and run the AVAR recipe at toy scale (runs/quickstart/summary.json)
#   make test        set up .venv (once), lint and type-check (make lint), then run the whole test suite
#
# The environment is built in .venv at the repo root. torch is installed FIRST: any requirement that
# admits a newer torch, resolved before torch is present, would pull the multi-GB CUDA build. Where a
# torch already exists in the system Python (NVIDIA's PyTorch containers), the venv reuses it through
# --system-site-packages instead of installing another one. GPU extras are never installed here:
# `pip install -e .[gpu]` by hand on a CUDA machine.

PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
# Where torch comes from (empty: pip's configured index). On PyPI the default Linux wheel is the CUDA build:
# make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
VENV := .venv
VPY := $(VENV)/bin/python
# The stamp changes whenever the install recipe or setup.py changes, so `make` re-syncs exactly then.
STAMP := $(VENV)/.installed-$(shell cat setup.py Makefile | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=
# The suite runs in PYTEST_WORKERS processes (pytest-xdist), each test file whole in one of them (its module
# fixtures built once); many tests spend most of their time starting processes, which leaves a core idle, so two
# workers on 2 cores take ~0.6x the time of one. PYTEST_WORKERS=0 runs it in this process (pdb, -x, profiling).
PYTEST_WORKERS ?= 2

.PHONY: test lint quickstart setup clean-venv

setup: $(STAMP)

$(STAMP):
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "[setup] system torch found: venv with --system-site-packages"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
		$(VPY) -m pip install -q --upgrade pip; \
		echo "[setup] installing $(TORCH_SPEC) first"; \
		$(VPY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)"); \
	fi
	$(VPY) -m pip install -q -e ".[test]"
	@rm -f $(VENV)/.installed-*
	@touch $@

# ruff (rules and why: ruff.toml) over the code, tests and tools; basedpyright, pyright's checker in basic mode
# (pyrightconfig.json), over the library. Both come with the test extra; a finding fails `make test`, hence CI.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/basedpyright

test: lint
	$(VPY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

quickstart: $(STAMP)
	$(VPY) -m megatron_avar quickstart --out runs/quickstart --overwrite

clean-venv:
	rm -rf $(VENV)
