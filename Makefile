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

# The main job: simulate the kuaishou preset, train NAR4Rec (evaluator, then generator),
# evaluate it against the logging policy and the oracle, write a Markdown report with curves.
# 49 s on the idle 2-core VM (venv already made; stop 23).
demo: $(STAMP)
	$(BIN)/nar4rec simulate --preset kuaishou --requests 20000 --seed 0 --out $(DEMO)/data --overwrite
	$(BIN)/nar4rec validate $(DEMO)/data --json $(DEMO)/data/validate.json
	$(BIN)/nar4rec train --model nar4rec --data $(DEMO)/data --out $(DEMO)/run --overwrite \
		--set train.epochs=3 --set evaluator_train.epochs=3
	$(BIN)/nar4rec evaluate --run $(DEMO)/run --data $(DEMO)/data --json $(DEMO)/metrics.json \
		--report $(DEMO)/report.md
	@echo "report: $(DEMO)/report.md"

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench-simulate: $(STAMP)
	$(BIN)/python benchmarks/bench_simulate.py --preset kuaishou --sizes 100000,1000000

clean:
	rm -rf $(VENV) runs .pytest_cache
