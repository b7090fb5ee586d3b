# Every target installs what it needs into .venv first. torch is pinned to the CPU build that lies on CI
# machines (2.13.0) before the project is installed, so pip never resolves a newer CUDA torch.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0

.PHONY: setup demo test test-slow bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

setup: $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"

# The main job: compile the `tiny` preset with the Inductor backend and generate from the engine.
demo: setup
	$(BIN)/l4compile compile tiny --backend inductor --out engines/tiny --force
	$(BIN)/l4compile run engines/tiny --prompt-ids 1,2,3,4,5,6,7,8 --max-new-tokens 16

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf engines build dist *.egg-info
