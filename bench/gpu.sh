#!/usr/bin/env bash
# preftune vs TRL's DPOTrainer on one GPU: the Qwen2.5-0.5B shape (random init), bf16 autocast,
# 4 pairs of 256 + 512 tokens per step. Needs only torch (CUDA), transformers, peft and
# accelerate; trl, datasets and their missing dependencies are installed from bench/wheels/
# (bash bench/fetch_wheels.sh fills it; carry it to the machine if it is not in the tree).
# No network. About 4-5 minutes on an H100. Results: $OUT/gpu_bench.json (+ the log).
#
#   bash bench/gpu.sh                         # on the GPU machine
#   GPU_BENCH_SMOKE=1 bash bench/gpu.sh       # a seconds-long dry run on CPU, tiny shape
#   GPU_BENCH_CONFIGS=preftune,trl bash bench/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu-bench}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && [ -n "${GPU_BENCH_SMOKE:-}" ]; then PY=.venv/bin/python; fi
LOG="$OUT/gpu_bench.log"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

{
  echo "== $(date -u +%FT%TZ) $(hostname)"
  "$PY" - <<'EOF'
import platform, torch, transformers
print("python", platform.python_version(), "torch", torch.__version__, "transformers", transformers.__version__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "-")
EOF
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

  # trl and datasets from the wheels, only where missing; a failure leaves preftune's numbers.
  if ! "$PY" -c "import trl, datasets" 2>/dev/null; then
    if ls bench/wheels/*.whl >/dev/null 2>&1; then
      "$PY" -m pip install --quiet --no-index --find-links bench/wheels trl==1.16.0 datasets==5.2.0 \
        || echo "!! installing trl/datasets from bench/wheels failed (wheels are for cp311); TRL runs will fail"
    else
      echo "!! bench/wheels is empty: run bash bench/fetch_wheels.sh where there is network, carry bench/wheels"
    fi
  fi
  "$PY" -c "import pydantic, rich, yaml, preftune.train" \
    || echo "!! preftune does not import here (missing pydantic/rich/pyyaml?)"

  if [ -n "${GPU_BENCH_SMOKE:-}" ]; then
    ARGS=(--preset smoke --device cpu --configs "${GPU_BENCH_CONFIGS:-preftune,preftune-lean,trl}")
  else
    ARGS=(--preset gpu-0.5b --device cuda --threads 8
          --configs "${GPU_BENCH_CONFIGS:-preftune,preftune-precompute,preftune-lean,trl}")
  fi
  timeout "${GPU_BENCH_TIMEOUT:-340}" "$PY" bench/bench_dpo.py "${ARGS[@]}" --keep-going \
    --json "$OUT/gpu_bench.json"
  echo "== exit $? at $(date -u +%FT%TZ)"
} 2>&1 | tee "$LOG"
test -s "$OUT/gpu_bench.json"
