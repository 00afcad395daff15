#!/usr/bin/env bash
# preftune vs TRL's DPOTrainer on one GPU: the Qwen2.5-0.5B shape (random init), bf16 autocast,
# 4 pairs of 256 + 512 tokens per step. Needs only torch (CUDA), transformers, peft and
# accelerate; trl, datasets, pydantic and their missing dependencies are installed from
# bench/wheels-gpu/ (bash bench/fetch_wheels.sh fills it; it is git-ignored, so pass it to the
# device tool in `carry`).
# No network. About 4-5 minutes on an H100. Results: $OUT/gpu_bench.json (+ the log).
#
#   bash bench/gpu.sh                         # on the GPU machine
#   GPU_BENCH_SMOKE=1 bash bench/gpu.sh       # a seconds-long dry run on CPU, tiny shape
#   GPU_BENCH_CONFIGS=preftune,trl bash bench/gpu.sh
#   GPU_BENCH_TESTS=1 bash bench/gpu.sh       # then pytest tests/gpu (about 3 minutes more)
#   GPU_BENCH_PROFILE=1 bash bench/gpu.sh     # then profile lean + compile and TRL's measured
#                                             # steps: $OUT/profiles/ (kernels, device busy time)
#   GPU_BENCH_CONFIGS=none GPU_BENCH_PROFILE=1 bash bench/gpu.sh   # the profiles alone
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu-bench}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && [ -n "${GPU_BENCH_SMOKE:-}" ]; then PY=.venv/bin/python; fi
LOG="$OUT/gpu_bench.log"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Why CUDA graphs were skipped, if they were, and recompiles: kept in each run's stderr_tail.
export TORCH_LOGS="${TORCH_LOGS:-perf_hints,recompiles}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

{
  echo "== $(date -u +%FT%TZ) $(hostname)"
  "$PY" - <<'EOF'
import platform, torch, transformers
print("python", platform.python_version(), "torch", torch.__version__, "transformers", transformers.__version__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "-")
EOF
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

  # trl, datasets and pydantic from carried wheels, only where missing: bench/wheels-gpu for
  # the device tool's Python 3.12 machines, bench/wheels for this project's cp311 venv.
  # A failure leaves the runs that do not need what failed.
  if ! "$PY" -c "import trl, datasets, pydantic, pytest" 2>/dev/null; then
    WHEELS=bench/wheels
    if [ "$("$PY" -c 'import sys; print(sys.version_info[:2] >= (3, 12))')" = True ]; then WHEELS=bench/wheels-gpu; fi
    if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
      "$PY" -m pip install --quiet --no-index --no-deps "$WHEELS"/*.whl \
        || echo "!! installing from $WHEELS failed; TRL runs (or preftune's) will fail"
    else
      echo "!! $WHEELS is empty: run bash bench/fetch_wheels.sh where there is network, and carry $WHEELS"
    fi
  fi
  "$PY" -c "import pydantic, rich, yaml, preftune.train" \
    || echo "!! preftune does not import here (missing pydantic/rich/pyyaml?)"

  if [ -n "${GPU_BENCH_SMOKE:-}" ]; then
    ARGS=(--preset smoke --device cpu --configs "${GPU_BENCH_CONFIGS:-preftune,preftune-lean,trl}")
  else
    ARGS=(--preset gpu-0.5b --device cuda --threads 8
          --configs "${GPU_BENCH_CONFIGS:-trl,preftune-lean-compile,preftune-lean-graphs,preftune}")
  fi
  if [ "${GPU_BENCH_CONFIGS:-}" != none ]; then
    timeout "${GPU_BENCH_TIMEOUT:-340}" "$PY" bench/bench_dpo.py "${ARGS[@]}" --keep-going \
      --json "$OUT/gpu_bench.json"
    echo "== exit $? at $(date -u +%FT%TZ)"
  fi
  if [ -n "${GPU_BENCH_PROFILE:-}" ]; then
    # Where a step's time goes: kernels per step and the device's busy share of the wall time.
    PROFILE_ARGS=("${ARGS[@]}")
    PROFILE_ARGS[${#PROFILE_ARGS[@]}-1]="${GPU_BENCH_PROFILE_CONFIGS:-preftune-lean-compile,trl}"
    timeout "${GPU_PROFILE_TIMEOUT:-240}" "$PY" bench/bench_dpo.py "${PROFILE_ARGS[@]}" --rounds 1 \
      --keep-going --profile "$OUT/profiles" --json "$OUT/gpu_profile_runs.json"
    echo "== profile exit $? at $(date -u +%FT%TZ)"
    cat "$OUT"/profiles/profile-*.json 2>/dev/null; echo
  fi
  if [ -n "${GPU_BENCH_TESTS:-}" ]; then
    # The CUDA-only tests (device waits per step, CUDA graphs vs eager, bf16 + fused AdamW).
    timeout "${GPU_TESTS_TIMEOUT:-180}" "$PY" -m pytest -q -s -p no:cacheprovider tests/gpu \
      --junitxml "$OUT/gpu_tests.xml"
    echo "== tests exit $? at $(date -u +%FT%TZ)"
  fi
} 2>&1 | tee "$LOG"
test -s "$OUT/gpu_bench.json" || ls "$OUT"/profiles/profile-*.json >/dev/null 2>&1
