# The two commands of the README: `make bench` (the main job) and `make test`.
# Both create .venv on first use with the pinned dev environment.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: bench test clean-venv

$(STAMP): requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

bench: $(STAMP)
	$(PY) -m hnae bench $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 $(ARGS)

clean-venv:
	rm -rf $(VENV)
