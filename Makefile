# danlu: `make demo` trains every stage on the embedded demo corpus; `make test` runs the tests.
# Both create .venv and install requirements.txt on first use.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-fast lint bench clean

$(VENV)/installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

demo: $(VENV)/installed
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/run_demo.sh

test: $(VENV)/installed
	$(PY) -m pytest

# The edit-test loop: everything but the tests marked slow (end-to-end runs, torchrun, benchmarks).
test-fast: $(VENV)/installed
	$(PY) -m pytest -m "not slow"

bench: $(VENV)/installed
	$(PY) -m scripts.bench

lint: $(VENV)/installed
	$(PY) -m pip install --quiet ruff && $(VENV)/bin/ruff check .

clean:
	rm -rf out dataset/demo
