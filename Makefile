# One command each: `make demo` (main job, offline) and `make test`.
# Each creates its virtualenv on first use.
PYTHON ?= python3
VENV ?= .venv
REF_VENV ?= .venv-ref
PY := $(VENV)/bin/python
REF_PY := $(REF_VENV)/bin/python
WORKDIR ?= workdirs/default

.PHONY: demo test parity fixtures bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

$(REF_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(REF_VENV)
	$(REF_VENV)/bin/pip install -q --upgrade pip
	$(REF_VENV)/bin/pip install -q -e '.[test,reference]'
	touch $@

demo: $(VENV)/.installed
	$(PY) -m tljax.main --config=configs/default.py --workdir=$(WORKDIR)

test: $(VENV)/.installed
	$(PY) -m pytest -q -m 'not reference' tests

# Live parity against torchvision / Keras / efficientnet-lite-pytorch (installs ~6 GB once).
parity: $(REF_VENV)/.installed
	$(REF_PY) -m pytest -q -m reference tests

# Regenerates the golden parity fixtures from the reference libraries.
fixtures: $(REF_VENV)/.installed
	$(REF_PY) -m tools.make_fixtures

bench: $(VENV)/.installed
	$(PY) -m experiments.benchmark

clean:
	rm -rf $(VENV) $(REF_VENV) workdirs
