# clipcrawl: `make demo` and `make test` are all a new user needs (both install first if needed).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install install-browser test test-fast demo bench lint package lock clean help

help:
	@echo "make demo     install (if needed) and run the whole pipeline on a bundled sample"
	@echo "make test     install (if needed) and run the test suite"
	@echo "make bench    run the benchmarks, write bench/results.json and bench/results.md"
	@echo "make lint     ruff over the code"
	@echo "make package  wheel + zip for spark-submit --py-files, plus the entry scripts, in dist/"

install: $(STAMP)

# The exact versions in requirements.lock were checked working together (see DEVELOPERS facts:
# numpy<2 for autofaiss, pyarrow<22 for numpy 1.x, CUDA torch because torchvision needs it).
$(STAMP): requirements.lock setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools
	$(PY) -m pip install -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Headless Chromium for the web-page test (Debian packages). Installed when running as root (CI);
# otherwise a hint is printed and the browser test skips with its reason.
install-browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver \
	  || echo "warning: chromium could not be installed; the browser test will be skipped"; \
	else echo "note: run 'sudo make install-browser' to enable the browser test"; fi

# gcld3 (optional CLD3 language id, built from source against protobuf) stays out of the lock.
lock:
	$(PY) -m pip freeze --exclude-editable | grep -v -e '^clipcrawl' -e '^gcld3' > requirements.lock

# Two workers (pytest-xdist): each test module stays on one worker, longest first (tests/conftest.py);
# TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= 2
test: install install-browser
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-fast: install
	$(PY) -m pytest -q -m "not slow"

demo: install
	$(PY) -m demo

bench: install
	$(PY) -m bench

lint: install
	$(VENV)/bin/ruff check spark_jobs udfs serving reporting tests bench demo notebooks

package: install
	rm -rf dist build
	$(PY) -m pip wheel --no-deps --no-build-isolation -w dist .
	$(PY) -m spark_jobs.package dist

clean:
	rm -rf build dist *.egg-info .pytest_cache
