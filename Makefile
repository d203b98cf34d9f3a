# Two commands on a fresh machine: `make demo` (train on Pride and Prejudice, then generate) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
KERAS_HOME ?= $(CURDIR)/.keras_home
SHARED_DATA := ../shared/data
BACKENDS ?= tensorflow jax torch
export KERAS_HOME
export TF_CPP_MIN_LOG_LEVEL := 3

.PHONY: demo test install data chromium clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

# Seed the Keras dataset cache from ../shared/data so nothing is downloaded.
data:
	mkdir -p $(KERAS_HOME)/datasets
	if [ -d $(SHARED_DATA) ]; then cp -f $(SHARED_DATA)/*.txt $(KERAS_HOME)/datasets/; fi

demo: install data
	$(PY) examples/pride_prejudice.py

# The playground's browser test drives Debian's Chromium (Playwright never downloads a browser here).
chromium:
	@if ! command -v chromium >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else \
	    echo "tests/test_serve_browser.py needs Debian's chromium: sudo apt-get install chromium"; \
	  fi; \
	fi

test: install data chromium
	set -e; for backend in $(BACKENDS); do \
	  echo "=== KERAS_BACKEND=$$backend ==="; \
	  start=$$(date +%s); \
	  KERAS_BACKEND=$$backend $(PY) -m pytest tests; \
	  echo "=== $$backend: $$(( $$(date +%s) - start )) s ==="; \
	done

clean:
	rm -rf $(VENV) .keras_home *.egg-info
