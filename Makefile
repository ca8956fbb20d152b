# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when absent.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.maskrt-installed

.PHONY: demo test setup bench clean plugin

setup: $(STAMP)

# torch is installed first and pinned: the CPU wheel 2.13.0. An unpinned torch pulls CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[torch,test,serve]'
	# Triton for `maskrt serve` (docs/serving.md): the wheel without its numpy<2 pin, and the
	# NumPy 1 that only its Python-backend stub uses, in a folder of its own.
	$(PY) -m pip install -q --no-deps nvidia-pytriton==0.7.0
	$(PY) -m pip install -q --no-deps --no-warn-conflicts --upgrade --target $(VENV)/maskrt-triton-site 'numpy==1.26.4'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/maskrt demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) bench/ops.py

plugin: $(STAMP)
	$(VENV)/bin/maskrt plugin build

clean:
	rm -rf build runs .pytest_cache
