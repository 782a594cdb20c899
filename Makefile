# Two entry points on a fresh clone: `make bench` (set up, then run the benchmark suite) and
# `make test` (set up, then run the tests). Set-up makes or reuses .venv, installs torch without
# pulling CUDA wheels on a machine without an NVIDIA GPU, installs the rest, and builds diffkern._C.
#
#   PYTHON=python3.12 make test                          choose the interpreter for the venv
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu   where no local CPU wheel exists
#   make bench BENCH_ARGS="--quick --no-compile"         pass options to python -m diffkern.bench

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
# CPU-only machines get the CPU build of torch (2.13 here); GPU machines the default CUDA build.
TORCH_SPEC ?= $(if $(HAS_GPU),torch,torch==2.13.0)
TORCH_INDEX ?=
BENCH_ARGS ?=
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)

.PHONY: setup test bench bench-pytest info clean

setup: $(VENV)/.built

$(VENV)/.deps:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(PY) -m pip install -q "setuptools>=64" wheel ninja pybind11 numpy pytest pytest-benchmark "triton>=3.0" tqdm matplotlib
	# transformers: the frozen CLIP text encoders and tokenizers of SD/LDM (it does not pull torch)
	$(PY) -m pip install -q transformers safetensors Pillow
	# diffusers is the models' and schedulers' test oracle; --no-deps keeps it from touching torch
	$(PY) -m pip install -q --no-deps diffusers
	$(PY) -m pip install -q huggingface_hub regex requests importlib_metadata
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	MAX_JOBS=$${MAX_JOBS:-4} $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -c "from diffkern import _ext; assert _ext.extension() is not None, _ext.extension_error()"
	touch $@

test: setup
	DIFFKERN_REQUIRE_ORACLES=1 $(PY) -m pytest -q tests

bench: setup
	$(PY) -m diffkern.bench $(BENCH_ARGS)

bench-pytest: setup
	$(PY) -m pytest -q benchmarks --benchmark-only

info: setup
	$(PY) -m diffkern.info

clean:
	rm -rf build *.egg-info diffkern/_C*.so $(VENV)/.built
