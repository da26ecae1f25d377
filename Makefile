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

.PHONY: venv demo test test-fast test-min lint format typecheck schema clean-demo

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(if $(strip $(TORCH_SPEC)),$(BIN)/pip install -q $(TORCH_SPEC))
	$(BIN)/pip install -q -e '.[test,dev,ray]'
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

# The declared lower bounds, installed and tested: a separate venv ($(MIN_VENV)) with every dependency at the
# minimum version pinned in .ci/constraints-min.txt (torch: TORCH_SPEC, the lowest CPU wheel here), then the pure
# tier and a few slow tests on the tiny models, the LoRA path and the fake hub.
MIN_VENV ?= .venv-min
MIN_SLOW_TESTS ?= tests/test_e2e.py::test_two_jobs_with_the_same_model_load_it_once \
	tests/test_e2e.py::test_ti2v_5b_with_an_image_runs_image_to_video_on_the_same_weights \
	tests/test_lora_e2e.py tests/test_lora_parity.py tests/test_simulated_gpu.py \
	tests/test_downloads.py::test_download_gives_a_folder_diffusers_loads \
	tests/test_downloads.py::test_download_killed_midway_is_completed_by_the_next_call
test-min:
	test -x $(MIN_VENV)/bin/python || $(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/pip install -q $(TORCH_SPEC) -c .ci/constraints-min.txt
	$(MIN_VENV)/bin/pip install -q -e '.[test]' -c .ci/constraints-min.txt
	$(MIN_VENV)/bin/pip list --format=freeze | grep -iE '^(torch|diffusers|transformers|accelerate|huggingface.hub|peft)=='
	HF_HUB_OFFLINE=1 $(MIN_VENV)/bin/python -m pytest -p no:cacheprovider -m "not slow" $(PYTEST_ARGS)
	HF_HUB_OFFLINE=1 $(MIN_VENV)/bin/python -m pytest -p no:cacheprovider $(MIN_SLOW_TESTS) $(PYTEST_ARGS)

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
