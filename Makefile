# The two set-up commands of README.md: `make demo` and `make test`.
# Both create (or reuse) .venv and install everything pinned by constraints.txt.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test lint docs bench data clean-venv

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[torch,jax,dask,fast,dev,docs]"
	$(PY) -m pip install --quiet --no-deps -e docs/examples/combinability_example_plugin
	touch $(STAMP)

# Debian's Fashion-MNIST: the demo's default data. Optional: digits is the fallback.
data:
	@if [ -d $(FMNIST) ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) \
	  || echo "warning: could not install dataset-fashion-mnist; the demo falls back to sklearn digits"; \
	else echo "note: run 'sudo apt-get install dataset-fashion-mnist' for the demo's default data"; fi
	@if [ -f /usr/share/doc/jargon-text/jargon.txt.gz ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq jargon-text) \
	  || echo "warning: could not install jargon-text (the character-level corpus)"; \
	else echo "note: run 'sudo apt-get install jargon-text' for the character-level corpus"; fi

demo: $(STAMP) data
	$(VENV)/bin/combinability demo

test: $(STAMP) data
	$(PY) -m ruff check .
	$(PY) -m pytest -n 2 -q --doctest-modules combinability tests
	$(PY) -m mkdocs build --strict --quiet --site-dir $(VENV)/site

lint: $(STAMP)
	$(PY) -m ruff check .

docs: $(STAMP)
	$(PY) -m mkdocs build --strict

bench: $(STAMP)
	cd benchmarks && ../$(PY) -m asv machine --yes >/dev/null && ../$(PY) -m asv run --python=same --quick --show-stderr

clean-venv:
	rm -rf $(VENV)
