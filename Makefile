# Every target installs what it needs into .venv first. torch is pinned to the CPU build that lies on CI
# machines (2.13.0) before the project is installed, so pip never resolves a newer CUDA torch.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0

.PHONY: setup demo test test-kernels test-slow test-host-torch bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

setup: $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test,onnx]"
	$(BIN)/pip install -q --no-deps "triton>=3.5,<3.8"   # the kernels' CPU interpreter tests; never touches torch

# The main job: compile the `tiny` preset with the Inductor backend and generate from the engine.
demo: setup
	$(BIN)/l4compile compile tiny --backend inductor --out engines/tiny --force
	$(BIN)/l4compile run engines/tiny --prompt-ids 1,2,3,4,5,6,7,8 --max-new-tokens 16

# Two pytest-xdist workers (CI machines have 2 cores; compiles are single-threaded Python); tests/conftest.py keeps
# each file, and the files sharing a session fixture, on one worker. WORKERS=0 runs serially.
WORKERS ?= 2
test: setup
	$(BIN)/python -m pytest -q -n $(WORKERS)

# The Triton kernels under the CPU interpreter only.
test-kernels: setup
	$(BIN)/python -m pytest -q tests/kernels

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

# The suite, and the sm_90a engine generation (slow), under the lent GPU hosts' packages, on this CPU machine: torch
# 2.11.0 (a CUDA build: ~5 GB with its nvidia-* wheels, so never in .venv), triton 3.6.0 and transformers 5.17.0, as
# read off the H200 of 2026-12-04. Not in CI (~15 minutes and the download). Run it before a GPU session when the
# kernels or the backend changed: torch 2.11 broke every Int4 CUDA engine's compile once (tests/kernels/
# test_kernel_sources.py says how), and nothing on a 2.13 machine showed it.
HOST_VENV ?= .venv-host
HOST_PKGS ?= torch==2.11.0 triton==3.6.0 transformers==5.17.0
test-host-torch:
	test -x $(HOST_VENV)/bin/python || $(PY) -m venv $(HOST_VENV)
	$(HOST_VENV)/bin/pip install -q --upgrade pip "setuptools>=70.1,<82" wheel
	$(HOST_VENV)/bin/pip install -q -e ".[test,onnx]" $(HOST_PKGS)
	$(HOST_VENV)/bin/python -m pytest -q -n $(WORKERS)
	$(HOST_VENV)/bin/python -m pytest -q -n $(WORKERS) -m slow tests/kernels/test_aoti_sm90.py

# Benchmarks (not tests): ratios against transformers eager / torch.compile measured in one run.
bench: setup
	$(BIN)/python benchmarks/bench_moe.py
	$(BIN)/python benchmarks/bench_decode.py
	$(BIN)/l4compile bench tiny --backends eager,torch-compile,inductor,onnxruntime,tensorrt \
		--prompt-lens 16,64 --batch-sizes 1 --decode-steps 8 --repeats 5 --threads 1 --out benchmarks/results/bench-tiny --force

clean:
	rm -rf engines build dist *.egg-info
