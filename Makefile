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

.PHONY: setup data repro test test-fast test-pipeline check-metrics bench grid clean

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

# Removes the DVC-cached outputs (rebuilt by `dvc repro` or `dvc checkout`); the committed
# baseline (metrics/, reports/, dvclive/, checkpoints/*/status.json) stays.
clean:
	rm -rf prepared artifacts models predictions checkpoints/*/last.pt .pytest_cache
