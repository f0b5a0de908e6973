# Set-up-free entry points: each installs what it needs into .venv first.
PY ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed

.PHONY: run test bench docs install clean

$(STAMP): pyproject.toml setup.cfg
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# FedAvg on the embedded digits data (100 clients, Dir(0.5), 20 per round).
run: $(STAMP)
	$(VENV)/bin/fedjax-sim run $(ARGS)

# The whole test suite (about 14 minutes on 2 cores).
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 tests $(ARGS)

# API reference from the docstrings (pdoc, offline) into docs/api/.
docs: $(STAMP)
	$(VENV)/bin/pip install -q "pdoc>=14"
	$(VENV)/bin/pdoc -o docs/api fedjax_sim fedjax_sim.algorithms fedjax_sim.data fedjax_sim.launch
	@echo "API reference: docs/api/index.html"

bench: $(STAMP)
	$(VENV)/bin/python bench/throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
