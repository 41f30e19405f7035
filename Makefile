# Two commands set everything up on a fresh machine:  `make demo`  and  `make test`.
# torch is installed first and pinned to the CPU build found on these machines; everything else
# comes from setup.py. Override PYTHON / TORCH_SPEC to use another interpreter or torch build.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev,hf]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/mass demo $(ARGS)

test: install
	$(BIN)/python -m pytest -q tests $(ARGS)

bench: install
	$(BIN)/mass bench --quick $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
