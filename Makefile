# Two commands set everything up on a fresh machine:
#   make demo   - builds .venv, installs dedup, runs the server on index_data/ with a demo
#   make test   - the same set-up, then the test suite
#   make test-milvus - every test on a real Milvus server (make test runs some of them)
# The generated gRPC code (src/dedup/_proto/) is checked in; `make protos` regenerates it
# after a change to protos/, and `make lint` fails if it is stale.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-milvus lint protos serve wheel clean console-screenshots

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

protos: $(STAMP)
	$(BIN)/python scripts/gen_protos.py

demo: $(STAMP)
	chmod 700 index_data  # git checks it out 0755; the server refuses a shared data directory
	$(BIN)/dedup demo

serve: $(STAMP)
	chmod 700 index_data  # git checks it out 0755; the server refuses a shared data directory
	$(BIN)/dedup serve

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Every test on a real Milvus server (2.3.5 from the `milvus` package; `make test` runs a
# subset of them, see docs/milvus.md).
test-milvus: $(STAMP)
	DEDUP_MILVUS_SERVER=all $(BIN)/python -m pytest -q -m milvus_server

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/python scripts/gen_protos.py --check

# docs/screenshots/*.png: the console's pages, from a run of its browser tests.
console-screenshots: $(STAMP)
	DEDUP_CONSOLE_SCREENSHOTS=docs/screenshots $(BIN)/python -m pytest -q -p no:cacheprovider \
		tests/test_console.py

wheel: $(STAMP)
	rm -rf dist
	$(BIN)/pip wheel --quiet --no-deps --wheel-dir dist .

clean:
	rm -rf $(VENV) dist build
