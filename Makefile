# The two commands of the README work on a fresh clone: `make repro` and `make test`.
# Both create .venv if absent, install the project into it, and fetch the bundled sample data
# offline from the DVC remote stored in this repository (dvc-remote/).

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch/torchvision pair installed first; on our x86_64 machines these come from local disk.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
STAMP := $(VENV)/.installed
ACTIVATE := source $(BIN)/activate

.PHONY: setup data repro test test-fast test-pipeline check-metrics bench grid gpu-check gpu-wheels clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check $(TORCH_SPEC)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

# The sample dataset (data/, tracked by data.dvc) from the in-repo remote; nothing is downloaded.
data: setup
	@$(ACTIVATE) && dvc pull -q data.dvc && echo "data/ ready: $$(du -sh data | cut -f1)"

repro: data
	$(ACTIVATE) && r2gen check-params params.yaml && dvc repro

test: data
	$(ACTIVATE) && python -m pytest -q --durations=15 $(PYTEST_ARGS)

# Unit and behaviour tests only (a few minutes): the inner loop while developing.
test-fast: data
	$(ACTIVATE) && python -m pytest -q -m "not pipeline and not slow" $(PYTEST_ARGS)

# The CI gate: workspace metrics (after `make repro`) against the committed baseline (BASE=HEAD).
BASE ?= HEAD
check-metrics: setup
	$(ACTIVATE) && r2gen check-metrics --base $(BASE)

# Speed and memory vs the public R2Gen code (benchmarks/run.py): PROFILE=sample|paper|resnet18, and
# REFERENCE_SRC=path/to/a/checkout/of/cuhksz-nlp/R2Gen to time it side by side. Writes bench-results/.
PROFILE ?= sample
BENCH_ARGS ?=
bench: setup
	$(ACTIVATE) && python -m benchmarks.run --profile $(PROFILE) \
		$(if $(REFERENCE_SRC),--reference-src $(REFERENCE_SRC)) $(BENCH_ARGS)

# The seed x batch-mode grid (README: "Seeds, batch sizes and time to quality"): opt-in, hours on CPU.
# DVC's own queue runs one experiment at a time in temporary copies of the last commit (plus
# uncommitted changes to tracked files); then `r2gen exp-report` writes reports/experiments/.
SEEDS ?= 1,2,3
GRID_ARGS ?=
grid: data
	$(ACTIVATE) && dvc exp run --queue -S 'seed=$(SEEDS)' -S 'train.common.batch_mode=equal,max' \
		-S train.common.validate=every_epoch $(GRID_ARGS)
	$(ACTIVATE) && dvc queue start -j 1 && \
		while dvc queue status | grep -qE '\b(Queued|Running)\b'; do sleep 60; done; \
		dvc queue status; r2gen exp-report

# The one-call device check (README: "GPU check"): all precisions at the paper profile, then the
# pipeline's stages, on one GPU in <= 8 minutes; DEVICE=cpu runs the same script at a tiny size
# (numerics only, bench-results/gpu-check-cpu/). No setup dependency: the GPU machine has no network,
# so it uses the python there (this checkout's .venv where one exists) and installs the carried
# .gpu-wheels (make gpu-wheels, here) into GPU_SITE when dvclive does not import.
DEVICE ?= cuda
GPU_ARGS ?=
GPU_SITE ?= /tmp/r2gen-gpu-site
GPU_PY := $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-check:
	@if ls .gpu-wheels/*.whl >/dev/null 2>&1 && ! $(GPU_PY) -c "import dvclive" 2>/dev/null; then \
		$(GPU_PY) -m pip install -q --no-index --no-deps --no-compile --target $(GPU_SITE) .gpu-wheels/*.whl; fi
	PYTHONPATH=$(GPU_SITE):$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} PYTHONUNBUFFERED=1 $(GPU_PY) -m benchmarks.gpu_check \
		--device $(DEVICE) $(if $(OUT),--out $(OUT)) $(GPU_ARGS)

# The wheels the GPU machine lacks for the check's pipeline part (dvclive and what it imports, a slim
# pycocoevalcap), for CPython 3.12 x86_64, into .gpu-wheels/ (gitignored; ~3.4 MiB). Needs PyPI.
# WHEELS_EXTRA: more wheels; by default torchao 0.17.0, the release built for torch 2.11 (our H200's), so
# that the device's fp8 runs torchao's real FP8 path instead of the emulation (no TE there).
WHEELS_EXTRA ?= torchao==0.17.0
gpu-wheels: setup
	$(ACTIVATE) && python -m benchmarks.gpu_wheels --dest .gpu-wheels $(foreach w,$(WHEELS_EXTRA),--extra $(w))

# Removes the DVC-cached outputs (rebuilt by `dvc repro` or `dvc checkout`); the committed
# baseline (metrics/, reports/, dvclive/, checkpoints/*/status.json) stays.
clean:
	rm -rf prepared artifacts models predictions checkpoints/*/last.pt .pytest_cache
