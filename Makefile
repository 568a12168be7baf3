# Two commands, each doing its own set-up on a fresh clone:
#   make demo   the embedded-default demo sweep (synthetic sites, local Ray, SQLite MLflow)
#   make test   the whole test suite
# The virtual environment (.venv) is created and filled on first use (about 2-4 minutes, 6.6 GB).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.oodsweep-installed

.PHONY: demo test install bench clean-runs

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/oodsweep demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/snapshots.py

clean-runs:
	rm -rf oodsweep-runs
