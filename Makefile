# Two commands on a fresh machine: `make demo` (train on Pride and Prejudice, then generate) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
KERAS_HOME ?= $(CURDIR)/.keras_home
SHARED_DATA := ../shared/data
BACKENDS ?= tensorflow jax torch
export KERAS_HOME
export TF_CPP_MIN_LOG_LEVEL := 3

.PHONY: demo test install data clean

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

test: install data
	set -e; for backend in $(BACKENDS); do \
	  echo "=== KERAS_BACKEND=$$backend ==="; \
	  start=$$(date +%s); \
	  KERAS_BACKEND=$$backend $(PY) -m pytest tests; \
	  echo "=== $$backend: $$(( $$(date +%s) - start )) s ==="; \
	done

clean:
	rm -rf $(VENV) .keras_home *.egg-info
