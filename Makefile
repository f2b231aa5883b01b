# Set-up is two commands on a fresh machine: `make quickstart` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: quickstart test install install-dev clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

# `make quickstart ARGS="model.fusion=cross_attention" RUN=artifacts/quickstart/xattn` trains another variant.
quickstart: $(VENV)/.installed
	PY=$(PY) $(if $(RUN),RUN=$(RUN)) bash scripts/quickstart.sh $(ARGS)

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q

clean:
	rm -rf artifacts outputs
