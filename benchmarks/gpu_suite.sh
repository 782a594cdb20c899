#!/usr/bin/env bash
# One call on a fresh GPU machine (its own python3 with torch + triton, no network):
# build the CUDA extension for sm_90, run the tests (GPU ones included), measure the copy-bandwidth
# ceiling, run the benchmark suite, and leave logs and results under $OUT (or ./gpu-out).
#   bash benchmarks/gpu_suite.sh [test|bench|models|all] [extra args for python -m diffkern.bench]
# test: build + GPU tests; bench: the kernel suites; models: the model suite (SD 1.5 / 2.1 UNet steps,
# VAE decode, 50-step loop, GLIDE steps, with torch.compile peers: minutes of compiling, so it is its
# own call within a 10-minute device limit); all: test + bench.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
WHAT=${1:-all}; shift || true
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
# the device copy of the tree has no .git: write the SHA here first (git rev-parse --short HEAD > .gpu/GIT_SHA)
export DIFFKERN_GIT_SHA=${DIFFKERN_GIT_SHA:-$(git rev-parse --short HEAD 2>/dev/null || cat .gpu/GIT_SHA 2>/dev/null)}

# Pure-Python wheels the image lacks, carried in .gpu/wheels (e.g. diffusers, the model suite's peer and
# the models' test oracle: `pip download --no-deps -d .gpu/wheels diffusers==0.42.1` here, then carry .gpu)
if compgen -G ".gpu/wheels/*.whl" > /dev/null; then
  $PY -m pip install -q --no-deps --no-index --target /tmp/diffkern-wheels .gpu/wheels/*.whl \
    && export PYTHONPATH=/tmp/diffkern-wheels:$PYTHONPATH && echo "carried wheels: $(ls .gpu/wheels)"
fi

echo "== machine"; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total --format=csv
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

echo "== build (sm_90)"
t0=$(date +%s)
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=16 $PY setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 \
  || { tail -50 "$OUT/build.log"; exit 1; }
echo "built in $(( $(date +%s) - t0 )) s"; grep -i "warn" "$OUT/build.log" | head -5
$PY -m diffkern.info | tee "$OUT/info.txt"

if [[ $WHAT == test || $WHAT == all ]]; then
  echo "== probe: compiled-code input checks"
  $PY -X faulthandler benchmarks/gpu_probe_checks.py 2>&1 | tail -25
  echo "== tests"
  $PY -m pytest -q -n 8 -p no:cacheprovider tests > "$OUT/tests.log" 2>&1; echo "pytest exit $?"
  tail -15 "$OUT/tests.log"
fi
if [[ $WHAT == bench || $WHAT == all ]]; then
  echo "== benchmarks"
  $PY -m diffkern.bench --out "$OUT" --ops group_norm attention dynamic_threshold guided_step "$@" \
    > "$OUT/bench.log" 2>&1; echo "bench exit $?"
  grep -v "^W1\|^  " "$OUT/bench.log" | tail -80
fi
if [[ $WHAT == models ]]; then
  echo "== model benchmarks"
  $PY -m diffkern.bench --out "$OUT" --ops models "$@" > "$OUT/bench-models.log" 2>&1; echo "bench exit $?"
  grep -v "^W1\|^  " "$OUT/bench-models.log" | tail -40
fi
