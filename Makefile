# Two commands do all set-up on a fresh machine:
#   make run    creates .venv with what the service needs (no torch) and serves models/ (gRPC and HTTP)
#   make test   adds the training, export and test tools and runs the whole suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODELS ?= models
HTTP_PORT ?= 8080
ARGS ?=

.PHONY: run test proto bench bench-train clean help

help:
	@grep -E '^#' Makefile | head -3

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The service alone: onnxruntime, grpc, prometheus-client; no torch.
$(VENV)/.serve-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

# Everything the tests need. torch is pinned to the CPU build for development.
$(VENV)/.dev-installed: pyproject.toml requirements/cpu-dev.txt | $(BIN)/python
	$(BIN)/pip install -q -c requirements/cpu-dev.txt -e '.[dev]'
	touch $@ $(VENV)/.serve-installed

run: $(VENV)/.serve-installed
	$(BIN)/charrnn-serve --models $(MODELS) --http-port $(HTTP_PORT) $(ARGS)

test: $(VENV)/.dev-installed
	$(BIN)/python -m pytest -q $(ARGS)

# Regenerates charrnn/v1/*_pb2*.py from protos/ (tests check they are current).
proto: $(VENV)/.dev-installed
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. protos/charrnn/v1/generator.proto

bench: $(VENV)/.dev-installed
	$(BIN)/python -m bench.serving $(ARGS)
	$(BIN)/python -m bench.decode_steps
	$(BIN)/python -m bench.kstep
	$(BIN)/python -m bench.resume

bench-train: $(VENV)/.dev-installed
	$(BIN)/python -m bench.training $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
