#!/usr/bin/env bash
# One call on a fresh GPU machine (its own python3 with torch + triton, no network), within a 10-minute
# limit: build the CUDA extension for sm_90, run the GPU tests (JUnit XML), run the kernel suites
# (reference, torch.compile, torch SDPA's default and each SDPA backend, xformers where it imports, every
# diffkern backend), compare each measured row with its roofline floor, and write the dispatch table
# (benchmarks/dispatch_table.py: backends that passed the GPU tests and measured faster). Everything goes
# to $OUT (default gpu-out/), named by the device found; commit what you keep to benchmarks/results/.
#
#   bash benchmarks/gpu_suite.sh [all|test|bench|models|table] [--dry-run] [extra args for diffkern.bench]
#
# all: build + tests + kernel suites (headline shapes) + roofline comparison + dispatch table;
# bench: the kernel suites at every shape (--full; its own call); models: the model suite (minutes of
# torch.compile: its own call); table: the dispatch table again from $OUT's files.
# --dry-run (here, without a GPU): every step on the CPU with this checkout's .venv, no build, a few tests,
# the CPU kernel suites at their quick size without compile, the table named "dry-run CPU".
# Time boxes (seconds, override by env): BUILD_S=150 TESTS_S=200 BENCH_S=180, the rest < 30 s.
set -uo pipefail
cd "$(dirname "$0")/.."
WHAT=all; DRY=0; EXTRA=()
for a in "$@"; do
  case $a in
    all|test|bench|models|table) WHAT=$a ;;
    --dry-run) DRY=1 ;;
    *) EXTRA+=("$a") ;;
  esac
done
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if [[ $DRY == 1 ]]; then PY=${PYTHON:-.venv/bin/python}; else PY=${PYTHON:-python3}; fi
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# the device copy of the tree has no .git: write the SHA here first (git rev-parse --short HEAD > .gpu/GIT_SHA)
export DIFFKERN_GIT_SHA=${DIFFKERN_GIT_SHA:-$(git rev-parse --short HEAD 2>/dev/null || cat .gpu/GIT_SHA 2>/dev/null)}
BUILD_S=${BUILD_S:-150}; TESTS_S=${TESTS_S:-200}; BENCH_S=${BENCH_S:-180}
KERNEL_OPS=(group_norm attention dynamic_threshold guided_step)
step() { echo; echo "== $1 ($(date -u +%H:%M:%S))"; }

# Pure-Python wheels the image lacks, carried in .gpu/wheels (e.g. diffusers, the model suite's peer and
# the models' test oracle: `pip download --no-deps -d .gpu/wheels diffusers==0.42.1` here, then carry .gpu)
if [[ $DRY == 0 ]] && compgen -G ".gpu/wheels/*.whl" > /dev/null; then
  $PY -m pip install -q --no-deps --no-index --target /tmp/diffkern-wheels .gpu/wheels/*.whl \
    && export PYTHONPATH=/tmp/diffkern-wheels:$PYTHONPATH && echo "carried wheels: $(ls .gpu/wheels)"
fi

step machine
if [[ $DRY == 1 ]]; then
  DEVICE="dry-run CPU"; BENCH_DEV=(--device cpu --no-compile)
  echo "dry run: no GPU, $($PY -c 'import torch; print("torch", torch.__version__)')"
else
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total --format=csv
  DEVICE=$($PY -c "import torch; print(torch.cuda.get_device_name(0))")
  BENCH_DEV=(--device cuda)
fi
SLUG=$($PY -c "from diffkern._dispatch import device_slug; import sys; print(device_slug(sys.argv[1]))" "$DEVICE")
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
$PY -c "import xformers; print('xformers', xformers.__version__)" 2>/dev/null || echo "xformers: not importable (its rows are left out)"

if [[ $DRY == 0 && $WHAT != table ]]; then
  step "build (sm_90)"
  t0=$(date +%s)
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=16 timeout "$BUILD_S" $PY setup.py -q build_ext --inplace \
    > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
  echo "built in $(( $(date +%s) - t0 )) s"; grep -i "warn" "$OUT/build.log" | head -5
fi
$PY -m diffkern.info > "$OUT/info-$SLUG.txt" 2>&1; grep -E "^(gpu|dispatch_table|extension) " "$OUT/info-$SLUG.txt"

if [[ $WHAT == test || $WHAT == all ]]; then
  step tests
  if [[ $DRY == 1 ]]; then
    TESTS=(tests/test_dispatch.py tests/ops/test_dynamic_threshold.py -k "not triton")
  else
    $PY -X faulthandler benchmarks/gpu_probe_checks.py 2>&1 | tail -5
    TESTS=(-n 8 tests)
  fi
  timeout "$TESTS_S" $PY -m pytest -q -p no:cacheprovider --junitxml "$OUT/tests-$SLUG.xml" "${TESTS[@]}" \
    > "$OUT/tests-$SLUG.log" 2>&1; rc=$?; echo "pytest exit $rc$( (( rc == 124 )) && echo ": cut at ${TESTS_S} s, the XML is missing")"
  tail -4 "$OUT/tests-$SLUG.log"
fi
if [[ $WHAT == bench || $WHAT == all ]]; then
  step "kernel suites"
  SIZE=(); [[ $WHAT == bench && $DRY == 0 ]] && SIZE=(--full)
  OPS=("${KERNEL_OPS[@]}"); [[ $DRY == 1 ]] && OPS=(group_norm dynamic_threshold)
  timeout "$BENCH_S" $PY -m diffkern.bench "${BENCH_DEV[@]}" "${SIZE[@]}" --out "$OUT" --ops "${OPS[@]}" "${EXTRA[@]}" \
    > "$OUT/bench-$SLUG.log" 2>&1; rc=$?; echo "bench exit $rc$( (( rc == 124 )) && echo ": cut at ${BENCH_S} s, later suites missing")"
  sed -n '/== summary/,$p' "$OUT/bench-$SLUG.log"
fi
if [[ $WHAT == models ]]; then
  step "model suite"
  $PY -m diffkern.bench "${BENCH_DEV[@]}" --full --out "$OUT" --ops models "${EXTRA[@]}" > "$OUT/bench-models-$SLUG.log" 2>&1
  echo "bench exit $?"; sed -n '/== summary/,$p' "$OUT/bench-models-$SLUG.log"
fi
if [[ $WHAT == all || $WHAT == bench || $WHAT == table ]]; then
  shopt -s nullglob
  JSONS=(); for op in "${KERNEL_OPS[@]}"; do JSONS+=("$OUT"/"$op"-*.json); done
  step "roofline comparison"
  if (( ${#JSONS[@]} )); then
    $PY benchmarks/gpu_static.py --compare "${JSONS[@]}" --out "$OUT/gpu-static-measured-$SLUG.md" && \
      head -12 "$OUT/gpu-static-measured-$SLUG.md"
  else echo "no kernel-suite results in $OUT"; fi
  step "dispatch table"
  XML=("$OUT"/tests-*.xml)
  if (( ${#JSONS[@]} && ${#XML[@]} )); then
    $PY benchmarks/dispatch_table.py --tests "${XML[@]}" --bench "${JSONS[@]}" --device-name "$DEVICE" \
      --out "$OUT/dispatch-$SLUG.json"
  else echo "no table: needs the tests' XML and the kernel suites' JSON in $OUT"; fi
fi
echo; echo "results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
