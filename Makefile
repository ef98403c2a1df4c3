# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := runs/demo

.PHONY: demo test lint bench-simulate clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The main job, for now: simulate the kuaishou preset, check the files, print the summary.
demo: $(STAMP)
	$(BIN)/nar4rec simulate --preset kuaishou --requests 50000 --seed 0 --out $(DEMO)/data --overwrite
	$(BIN)/nar4rec validate $(DEMO)/data --json $(DEMO)/data/validate.json

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench-simulate: $(STAMP)
	$(BIN)/python benchmarks/bench_simulate.py --preset kuaishou --sizes 100000,1000000

clean:
	rm -rf $(VENV) runs .pytest_cache
