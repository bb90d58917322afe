#!/usr/bin/env bash
# One call on an H100/H200, under 10 minutes: GPU tests, kernel speed, SD-1.5 UNet numbers,
# K = 1000 classification on the embedded model.
#
#   bash benchmarks/gpu_check.sh     # from anywhere; $OUT (if set) receives gpu_check.log + JSON
#
# Steps: (1) setup: wheels from .whl/, the project importable, GPU name and versions;
# (2) pytest -m gpu tests/; (3) benchmarks/kernel_speed.py on CUDA (forward with torch.compile,
# then forward+backward); (4, 5) benchmarks/gpu_unet_bench.py: TI step + inference with SDPA vs
# xformers, then the batching test; (6) benchmarks/scale_k.py at K = 1000 on CUDA (synth data,
# 1000 token steps, every scorer: accuracy, s/image, rows/image, peak GPU memory) into
# $RESULTS/scale_k/; (7) a summary table. A failing step is reported and the next
# one still runs; each runs under `timeout`, trimmed so the whole stays within GPU_CHECK_BUDGET_S.
set -u
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-590}
START=$(date +%s)
WORK=$(mktemp -d)
RESULTS=${OUT:-$WORK}
mkdir -p "$RESULTS"
STEPS=()

# run_step NAME LIMIT_S CMD...: tee output to $WORK/NAME.out, record status and seconds.
run_step() {
  local name=$1 limit=$2 left rc t0 status=ok
  shift 2
  left=$((BUDGET - ($(date +%s) - START) - 5))
  if [ "$left" -lt 20 ]; then
    STEPS+=("$name|SKIPPED (no time left)|0")
    echo "=== [$name] skipped: ${left}s of the budget left"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo
  echo "=== [$name] $* (limit ${limit}s)"
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$WORK/$name.out"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    status="TIMEOUT (${limit}s)"
  elif [ "$rc" -ne 0 ]; then
    status="FAIL (rc $rc)"
  fi
  STEPS+=("$name|$status|$(($(date +%s) - t0))")
  echo "=== [$name] $status"
}

setup() {
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  # The project must import from any cwd (benchmarks/*.py put benchmarks/, not the root, on sys.path).
  if ! (cd /tmp && "$PY" -c "import kernels, mcti" >/dev/null 2>&1); then
    "$PY" -m pip install -q -e . --no-deps --no-build-isolation >/dev/null 2>&1 ||
      echo "pip install -e . failed: using PYTHONPATH=$PWD"
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi failed"
  "$PY" - <<'PYEOF'
import importlib, torch, triton
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
      f"cuda available: {torch.cuda.is_available()}")
for name in ("diffusers", "transformers", "xformers", "kernels"):
    try:
        mod = importlib.import_module(name)
        print(f"{name} {getattr(mod, '__version__', '')} from {mod.__file__}")
    except Exception as exc:
        print(f"{name}: not importable ({type(exc).__name__}: {exc})")
raise SystemExit(0 if torch.cuda.is_available() else "setup: CUDA is not available")
PYEOF
}

summary() {
  local s n st sec
  echo
  echo "==================== gpu_check summary ===================="
  printf '%-12s %-24s %8s\n' step status seconds
  for s in "${STEPS[@]}"; do
    IFS='|' read -r n st sec <<<"$s"
    printf '%-12s %-24s %8s\n' "$n" "$st" "$sec"
  done
  echo "total $(($(date +%s) - START)) s of a ${BUDGET} s budget"
  "$PY" - "$RESULTS" <<'PYEOF' || true
import json, os, sys
for name in ("kernel_fwd", "kernel_bwd"):
    path = os.path.join(sys.argv[1], f"{name}.json")
    if not os.path.exists(path):
        continue
    for r in json.load(open(path)):
        if r["R"] in (32, 512, 4096):
            eager = f"{r['vs_eager']:.2f}x eager" if r.get("vs_eager") else "eager n/a"
            comp = f"{r['vs_compile']:.2f}x compile" if r.get("vs_compile") else ""
            print(f"{name:10} {r['dtype']} R={r['R']:<5} {r['kernel_s'] * 1e6:8.1f} us "
                  f"{r['kernel_GBps']:7.0f} GB/s {r['of_copy']:6.1%} of copy  {eager}  {comp}")
PYEOF
  "$PY" - "$RESULTS/scale_k/scale_k.json" <<'PYEOF' || true
import json, os, sys
if os.path.exists(sys.argv[1]):
    for r in json.load(open(sys.argv[1]))["results"]:
        for name, s in r["scorers"].items():
            print(f"scale_k    K={r['classes']} {name:20} top-1 {s['accuracy']:6.1%} ({s['images']} images) "
                  f"{s['s_per_image'] * 1e3:9.2f} ms/image {s['unet_rows_per_image']:7.0f} rows/image "
                  f"peak {s.get('peak_cuda_mb') or 0:6.0f} MB")
PYEOF
  if [ -f "$WORK/unet.out" ]; then
    grep '^RESULT ' "$WORK/unet.out" | sed 's/^RESULT /unet       /' |
      grep -E 'status|rows_per_s|MFU|speedup|gflop' || true
  fi
}

main() {
  local t0 s failed=0
  echo "gpu_check.sh at $(date -u +%FT%TZ), budget ${BUDGET}s, results in $RESULTS"
  echo "=== [setup]"
  t0=$(date +%s)
  if setup; then st=ok; else st="FAIL"; fi
  STEPS+=("setup|$st|$(($(date +%s) - t0))")
  run_step pytest_gpu 120 "$PY" -m pytest -m gpu tests/ -q -p no:cacheprovider
  run_step kernel_fwd 110 "$PY" benchmarks/kernel_speed.py --device cuda \
    --json-out "$RESULTS/kernel_fwd.json"
  run_step kernel_bwd 40 "$PY" benchmarks/kernel_speed.py --device cuda --backward --no-compile \
    --rows 32 512 4096 --json-out "$RESULTS/kernel_bwd.json"
  run_step unet 170 "$PY" benchmarks/gpu_unet_bench.py --device cuda --json
  run_step scale_k1000 120 "$PY" benchmarks/scale_k.py --device cuda --classes 1000 \
    --out "$RESULTS/scale_k" --unet-images 64 --full-images-large 4 --steps-per-class 1 \
    --probe-max-k 0
  summary
  for s in "${STEPS[@]}"; do [[ $s == *"|ok|"* ]] || failed=1; done
  return $failed
}

# One pipeline: setup's exports reach every later step, and everything lands in the log.
main 2>&1 | tee "$RESULTS/gpu_check.log"
exit "${PIPESTATUS[0]}"
