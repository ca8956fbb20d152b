# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when absent.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.maskrt-installed

.PHONY: demo test setup bench clean plugin gpu-check gpu-wheels torchvision-env

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

# torchvision itself, for the side-by-side benchmarks only (docs/performance.md, "Against
# torchvision itself"): it does not load beside torch 2.13, so it gets an environment of its own
# (~5.5 GB; on this workplace's x86 machines both wheels come from the local disk). Never needed
# by maskrt, its demo or its tests.
TV_VENV ?= .tvenv
torchvision-env:
	test -x $(TV_VENV)/bin/python || $(PYTHON) -m venv $(TV_VENV)
	$(TV_VENV)/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1 numpy

# On a machine with an NVIDIA GPU (docs/gpu.md): its own python3 and PyTorch, no .venv (the
# .venv's torch is the CPU wheel). Installs the project --no-deps when it is not importable.
# The GPU machines have no network and no pycocotools (the trainer reads COCO through it):
# `make gpu-wheels` here downloads its wheel into third_party/wheels (ignored by git), which
# travels with the checkout; gpu-check installs what is there into build/gpu_site.
GPU_PYTHON ?= python3
GPU_WHEELS := third_party/wheels
GPU_SITE   := build/gpu_site
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d $(GPU_WHEELS) pycocotools
gpu-check:
	$(GPU_PYTHON) -P -c "import maskrt.plugins.cpu, maskrt.model" 2>/dev/null \
	  || $(GPU_PYTHON) -m pip install -q --no-deps -e . \
	  || $(GPU_PYTHON) -m pip install -q --no-deps --no-build-isolation -e .
	if ls $(GPU_WHEELS)/*.whl >/dev/null 2>&1; then \
	  $(GPU_PYTHON) -m pip install -q --no-index --no-deps --upgrade --target $(GPU_SITE) $(GPU_WHEELS)/*.whl \
	  || echo "gpu-check: the wheels in $(GPU_WHEELS) do not install here; going on without them"; fi
	PYTHONPATH="$(abspath $(GPU_SITE))$${PYTHONPATH:+:$$PYTHONPATH}" \
	  $(GPU_PYTHON) bench/gpu_check.py --out runs/gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf build runs .pytest_cache
