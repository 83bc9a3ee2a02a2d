# Two commands set everything up on a fresh machine:
#   make demo   - builds .venv, generates the protobuf code, runs the server on index_data/ with a demo
#   make test   - the same set-up, then the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint protos serve clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

protos: $(STAMP)
	$(BIN)/python scripts/gen_protos.py

demo: protos
	$(BIN)/dedup demo

serve: protos
	$(BIN)/dedup serve

test: protos
	$(BIN)/python -m pytest -q

lint: protos
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/mypy

clean:
	rm -rf $(VENV) src/dedup/_proto
