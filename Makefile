# `make demo` and `make test` work on a fresh machine with Python 3.11: they create or refresh .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install serve clean

demo: $(STAMP)
	$(PY) -m demo_game

test: $(STAMP)
	$(PY) -m pytest -q

serve: $(STAMP)
	$(PY) -m npc_engine serve

install: $(STAMP)

# torch==2.13.0 is the local CPU build; asking pip for plain "torch" first would pull several GB of CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) *.egg-info
