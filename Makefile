# danlu: `make demo` trains every stage on the embedded demo corpus; `make test` runs the tests.
# Both create .venv and install requirements.txt on first use.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-fast lint bench clean

# pip byte-compiles every module it installs one file at a time (47 of the 78 s this step took on 2 cores);
# compileall does the same on every core, 20 s less. It reports a few of torch's test files that are Python 3.12
# syntax, which pip skips silently; hence `|| true` and the quiet output.
$(VENV)/installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-compile -r requirements.txt
	$(PY) -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	touch $@

demo: $(VENV)/installed
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/run_demo.sh

# The suite on two pytest-xdist workers: most of a test's time is a script's start (importing torch and transformers,
# ~4.5 s, one core), so two at once on 2 cores take ~12 minutes against ~18 one at a time (AMD EPYC). (Tried once
# before and reverted: one run stalled 7 minutes in multiprocessing.Pool.terminate, which dataset/workers.py no
# longer uses.) TEST_WORKERS=0 runs the tests in this process, one after the other.
TEST_WORKERS ?= 2
test: $(VENV)/installed
	$(PY) -m pytest -n $(TEST_WORKERS)

# The edit-test loop: everything but the tests marked slow (end-to-end runs, torchrun, benchmarks).
test-fast: $(VENV)/installed
	$(PY) -m pytest -m "not slow"

bench: $(VENV)/installed
	$(PY) -m scripts.bench

lint: $(VENV)/installed
	$(PY) -m pip install --quiet ruff && $(VENV)/bin/ruff check .

clean:
	rm -rf out dataset/demo
