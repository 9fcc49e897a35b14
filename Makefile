# Two commands on a fresh machine (Python >= 3.10):
#   make demo   set up, then edit the embedded model with the demo edits and print the results
#   make test   set up, then run the test suite
PYTHON ?= python3
VENV ?= .venv
# A CPU build of torch keeps the set-up small; override for a GPU machine, e.g. TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

demo: setup
	$(BIN)/mke fit --config configs/demo.yaml

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
