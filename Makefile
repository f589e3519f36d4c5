# The two entry points of the README: `make demo` and `make test`.
# Both set up a local virtual environment (.venv) first; it is reused when present.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test clean

$(BIN)/stm-live: pyproject.toml scripts/setup.sh
	PYTHON=$(PYTHON) VENV=$(VENV) sh scripts/setup.sh
	touch $@

setup: $(BIN)/stm-live

demo: setup
	$(BIN)/stm-live demo

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
