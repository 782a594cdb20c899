# Two entry points on a fresh clone: `make bench` (set up, then run the benchmark suite) and
# `make test` (set up, then run the tests). Set-up makes or reuses .venv, installs torch without
# pulling CUDA wheels on a machine without an NVIDIA GPU, installs the rest, and builds diffkern._C.
#
#   PYTHON=python3.12 make test                          choose the interpreter for the venv
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu   where no local CPU wheel exists
#   make bench                                           the quick suite (< 5 min), results in benchmarks/out/
#   make bench BENCH_ARGS=--full                         every shape, dtype and model
#   make bench BENCH_ARGS="--full --out benchmarks/results"   the official (committed) results
#   make constraints                                     re-pin benchmarks/constraints.txt from this .venv
#
# Every pip install is constrained by benchmarks/constraints.txt (the versions the suite is tested
# with). On a GPU machine torch, triton and nvidia-* are left out of the constraints: torch is then the
# default CUDA build (or the one already in the venv) with the triton it brings.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
# CPU-only machines get the CPU build of torch (2.13 here); GPU machines the default CUDA build.
TORCH_SPEC ?= $(if $(HAS_GPU),torch,torch==2.13.0)
TORCH_INDEX ?=
BENCH_ARGS ?=
CONSTRAINTS ?= benchmarks/constraints.txt
# what pip is given: the file itself on a CPU machine, a copy without the CUDA-build packages on a GPU one
PIP_CONSTRAINTS := $(if $(HAS_GPU),$(VENV)/constraints-gpu.txt,$(CONSTRAINTS))
PIP := $(PY) -m pip install -q -c $(PIP_CONSTRAINTS)
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)

.PHONY: setup test bench bench-pytest info clean constraints

setup: $(VENV)/.built

$(VENV)/constraints-gpu.txt: $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	grep -v -E -i '^(torch|triton|nvidia-[a-z0-9-]+)==' $(CONSTRAINTS) > $@

$(VENV)/.deps: $(CONSTRAINTS) $(if $(HAS_GPU),$(VENV)/constraints-gpu.txt)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(PIP) setuptools wheel ninja pybind11 numpy pytest pytest-benchmark pytest-timeout parameterized triton tqdm matplotlib
	# transformers: the frozen CLIP text encoders and tokenizers of SD/LDM (it does not pull torch)
	$(PIP) transformers safetensors Pillow
	# diffusers: a dependency of diffkern.models / schedulers / pipelines and their test oracle;
	# --no-deps keeps it from touching torch, its own dependencies are the next line
	$(PIP) --no-deps diffusers
	$(PIP) huggingface_hub regex requests importlib_metadata filelock
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

constraints:
	$(PY) -m pip freeze --exclude-editable | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/' > $(CONSTRAINTS).new
	$(PY) -m pip freeze --all --exclude-editable | grep -i -E '^(setuptools|wheel)==' >> $(CONSTRAINTS).new
	{ grep '^#' $(CONSTRAINTS); cat $(CONSTRAINTS).new; } > $(CONSTRAINTS) && rm $(CONSTRAINTS).new

clean:
	rm -rf build *.egg-info diffkern/_C*.so $(VENV)/.built
