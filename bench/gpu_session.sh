#!/usr/bin/env bash
# The GPU issue's measurements in two device calls (a session has 15 minutes of device time in all, each
# machine start included), longest-needed first. Each part is cut by its own timeout; every line goes to
# $OUT/<part>.log as it is printed and every figure to $OUT/gpu*.json the moment it is measured.
#
#   here, once:  bash ../shared/gpu/wheels.sh .whl && bash ../shared/gpu/wheels.sh .whlq quant
#                printf '/.whl/\n/.whlq/\n' >> .git/info/exclude
#   dry run:     DRY=1 PYTHON=.venv/bin/python bash bench/gpu_session.sh app   (and quant: CPU, tiny models)
#   call 1:      run(command="bash bench/gpu_session.sh app", carry=[".whl"], timeout_s=480)    <= 8 min
#                the threads probe (cuDNN attention's per-thread cache?); eager vs compiled: plain
#                generate, runner, engine process, app, cuDNN attention off; batching: the app's
#                engine, the manager as configured, with CUDA graphs, graphs + async
#   call 2, at once (the machine goes back 30 s after a call):
#                run(command="bash bench/gpu_session.sh quant", carry=[".whlq"], timeout_s=270)  <= 4.5 min
#                the default model's shape with a picture; bf16 / 8-bit / 4-bit
# 750 s of limits in all, within the 900 s of device time with one quick machine start (a slow start
# shortens call 2's limit: its --quantize part then reports what it reached). The .whlq set has no
# gradio: its parts use the engine only.
set -uo pipefail
part="${1:?app or quant}"
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if [ -z "${DRY:-}" ]; then
  wheels=.whl; [ "$part" = quant ] && wheels=.whlq
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels/*.whl
  export PYTHONPATH=/tmp/site
  device=(--device cuda)
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
else
  device=(--device cpu --small)
fi
run() {  # run LIMIT NAME ARGS...: one part, its output kept as it comes
  local limit=$1 name=$2; shift 2
  echo "== $name (at most ${limit} s) $(date +%T)"
  timeout -k 5 "$limit" "$PY" "$@" 2>&1 | grep --line-buffered -v "Loading weights" | tee -a "$OUT/$name.log"
}
case $part in
  app)
    run 120 probe bench/gpu_probe_threads.py
    run 340 main bench/gpu.py "${device[@]}" --tokens 128 --rounds 2 --budget 80 --batch-budget 60 --out "$OUT" ;;
  quant)
    run 150 vlm bench/gpu.py "${device[@]}" --vlm --no-app --tokens 128 --rounds 2 --budget 50 --out "$OUT"
    run 100 quantize bench/gpu.py "${device[@]}" --quantize --no-app --tokens 64 --rounds 2 --budget 45 --out "$OUT" ;;
  *) echo "app or quant"; exit 2 ;;
esac
echo "== done $(date +%T)"
