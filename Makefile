# Two commands on a fresh machine (Python >= 3.10):
#   make demo   set up, then edit the embedded model with the demo edits and print the results
#   make test   set up, then run the test suite
#   make lint   set up, then check the code with ruff (pyproject.toml [tool.ruff])
PYTHON ?= python3
VENV ?= .venv
# A CPU build of torch keeps the set-up small; override for a GPU machine, e.g. TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test lint clean
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

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs
