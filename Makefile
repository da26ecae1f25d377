# wan-daemon: `make demo` and `make test` each set up everything they need on a fresh machine
# (so do `make lint`, `make typecheck` and `make test-fast`).
#
# TORCH_SPEC picks the torch build installed before the project:
#   make demo                                   CPU wheel torch==2.13.0 (fast, what CI uses)
#   make demo TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128"   CUDA build for GPU servers
#   make demo TORCH_SPEC=                       keep whatever torch the venv already has
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.wan-daemon-installed
PYTEST_ARGS ?=
# What `lint` and `format` look at.
LINT_PATHS := daemon tests bench

.PHONY: venv demo test test-fast lint format typecheck schema clean-demo

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(if $(strip $(TORCH_SPEC)),$(BIN)/pip install -q $(TORCH_SPEC))
	$(BIN)/pip install -q -e '.[test,dev]'
	touch $@

# The daemon's main job on the built-in defaults: ./inbox -> ./outbox, the tiny local model when no real
# weights are present. Leaves a playable MP4 and its JSON sidecar in ./outbox and prints their paths.
demo: $(STAMP)
	mkdir -p inbox outbox
	rm -f outbox/demo.mp4 outbox/demo.json outbox/failed/demo.json
	$(BIN)/wan-daemon submit --inbox inbox jobs/examples/demo.yaml || test -f inbox/demo.yaml
	$(BIN)/wan-daemon run --until-idle

# Everything, both tiers (what CI runs).
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

# The pure tier: no daemon, worker process, subprocess, tiny model, ffmpeg or fake hub (see tests/conftest.py).
test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

format: $(STAMP)
	$(BIN)/ruff format $(LINT_PATHS)
	$(BIN)/ruff check --fix $(LINT_PATHS)

# mypy on daemon/ with the pydantic plugin; paths and options are in pyproject.toml.
typecheck: $(STAMP)
	$(BIN)/mypy

schema: $(STAMP)
	$(BIN)/wan-daemon schema -o jobs/schema.json
