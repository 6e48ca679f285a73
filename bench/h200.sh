#!/usr/bin/env bash
# The H200 measurements of docs/PERFORMANCE.md in phases that each fit one 10-minute device call:
#   bash bench/h200.sh env tests kernels      # then: train, then: render
# Installs the carried wheels of bench/device_wheels.sh (.whl/) when present, and writes each phase's
# JSON and log to $OUT (the device tool's folder) or bench/results/h200/. To try the script on a CPU:
#   PRESET=cpu WHEELS=none PYTHON=.venv/bin/python bash bench/h200.sh env kernels
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

python=${PYTHON:-python3}
dest=${OUT:-bench/results/h200}
preset=${PRESET:-h200}
wheels=${WHEELS:-.whl}
mkdir -p "$dest"
export PYTHONUNBUFFERED=1
if compgen -G "$wheels/*.whl" >/dev/null; then
  # installed once per machine: a later invocation (one phase per call of `timeout`) reuses /tmp/site
  if [ "$(cat /tmp/site/.wheels 2>/dev/null)" != "$(ls "$wheels")" ]; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$wheels"/*.whl || exit 1
    ls "$wheels" >/tmp/site/.wheels
  fi
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi

bench() {  # one benchmark; the phase goes on after a failure and reports it at the end
  "$python" "$@" || failed=$?
}

phase_env() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  "$python" -c 'import sys, torch; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda,
    "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
  "$python" -c 'import deepspeed, av, webdataset; print("deepspeed", deepspeed.__version__, "av", av.__version__)'
  "$python" -m xformers.info 2>&1 | grep -E "^(xFormers|pytorch|fmha\.(flshatt|cutlass))" || echo "xformers: missing"
}

phase_tests() {  # the suite's CUDA tests, skipped on CPU machines and in CI
  "$python" -m pytest -q -p no:cacheprovider -rs -m gpu \
    tests/unit/models/test_attention.py tests/unit/test_sampling.py
}

phase_kernels() {
  failed=0
  bench bench/attention.py --preset "$preset" --out "$dest/attention.json"
  bench bench/factorized_vs_full.py --preset "$preset" --out "$dest/factorized_vs_full.json"
  bench bench/factorized_vs_full.py --preset "$preset" --backend sdpa --out "$dest/factorized_vs_full_sdpa.json"
  return $failed
}

phase_train() {
  local shape=(--presets XL --frames 16 --size 256 --patch 1 8 8 --batch 2 --zero 2 --precision bf16)
  failed=0
  bench bench/train_step.py "${shape[@]}" --out "$dest/train_step.json"
  bench bench/train_step.py "${shape[@]}" --compile --out "$dest/train_step_compile.json"
  return $failed
}

phase_render() {
  local cascade=(--cascade configs/cascade/imagen_video.yaml --steps 4 --prompts 2)
  failed=0
  bench bench/render.py "${cascade[@]}" --precision bf16 --out "$dest/render_bf16.json"
  # fp32 does ~7.6 PFLOP a video at 4 steps: one video at one step per stage fits a device call
  bench bench/render.py --cascade configs/cascade/imagen_video.yaml --steps 1 --prompts 1 --no-warmup \
    --out "$dest/render.json"
  return $failed
}

status=0
for phase in "${@:-env}"; do
  case $phase in
    env | tests | kernels | train | render) ;;
    *) echo "unknown phase '$phase' (env, tests, kernels, train, render)" >&2; exit 2 ;;
  esac
  echo "== $phase $(date -u +%FT%TZ)"
  "phase_$phase" 2>&1 | tee "$dest/$phase.log"
  code=${PIPESTATUS[0]}
  echo "== $phase exit $code"
  [ "$code" = 0 ] || status=$code
done
exit "$status"
