# Two commands, each doing its own set-up on a fresh clone:
#   make demo   the embedded-default demo sweep (synthetic sites, local Ray, SQLite MLflow)
#   make test   the whole test suite (every tier)
#   make test-fast  the unit tier: all but the Ray integration, slow and rayup tests (docs/development.md, "Tests")
# The virtual environment (.venv) is created and filled on first use (about 2-4 minutes, 6.6 GB).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.oodsweep-installed

.PHONY: demo test test-fast check-architecture install bench clean-runs

install: $(STAMP)

# constraints.txt pins torch/torchvision to the releases the development machine has on disk, so that
# pip does not download another torch there; the package's own ranges are in pyproject.toml.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/oodsweep demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration and not slow and not rayup"

check-architecture:
	$(PYTHON) tools/check_architecture.py

bench: $(STAMP)
	$(BIN)/python bench/snapshots.py

clean-runs:
	rm -rf oodsweep-runs
