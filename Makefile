# From a fresh clone: `make demo` trains the built-in tiny demo, `make test` runs the tests. Both first set up
# .venv: the CPU build of torch before anything else (so no package pulls a CUDA build), then the dev
# requirements. The setup runs again only when a requirements file changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.train-tools-installed
TORCH := torch==2.13.0

.PHONY: setup demo test

setup: $(INSTALLED)

$(INSTALLED): requirements-dev.txt requirements-nodeps.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	echo "$(TORCH)" > $(VENV)/torch-constraint.txt
	$(BIN)/pip install -q -c $(VENV)/torch-constraint.txt -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps -r requirements-nodeps.txt
	touch $@

demo: setup
	$(BIN)/python -m lib_train train --config examples/demo.toml
	@echo "The demo LoRA's files are in out/demo/ (listed above)."

test: setup
	$(BIN)/python -m pytest -q
