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

# Zero-shot first (real ImageNet EfficientNet-Lite0 on two real photos), then the training job.
demo: $(VENV)/.installed
	mkdir -p $(WORKDIR)
	$(PY) -m tljax.port --source=efficientnet_lite --arch=efficientnet_lite0 --output=$(WORKDIR)/lite0_imagenet
	$(PY) -c "import skimage.data as d, PIL.Image as I; [I.fromarray(getattr(d, n)()).save('$(WORKDIR)/' + n + '.jpg') for n in ('chelsea', 'coffee')]"
	$(PY) -m tljax.predict --weights=$(WORKDIR)/lite0_imagenet --image=$(WORKDIR)/chelsea.jpg --image=$(WORKDIR)/coffee.jpg --topk=3
	$(PY) -m tljax.main --config=configs/default.py --workdir=$(WORKDIR)

test: $(VENV)/.installed
	$(PY) -m pytest -q -m 'not reference' tests

# Live parity against torchvision / Keras / efficientnet-lite-pytorch (installs ~6 GB once).
# One process per file: importing torchvision (→ triton) after jax and keras are loaded in the
# same process segfaults.
parity: $(REF_VENV)/.installed
	set -e; for f in $$(grep -l 'mark.reference' tests/test_*.py); do \
	  echo "== $$f"; $(REF_PY) -m pytest -q -m reference $$f; done

# Regenerates the golden parity fixtures from the reference libraries.
fixtures: $(REF_VENV)/.installed
	$(REF_PY) -m tools.make_fixtures

bench: $(REF_VENV)/.installed
	$(REF_PY) -m experiments.benchmark $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(REF_VENV) workdirs
