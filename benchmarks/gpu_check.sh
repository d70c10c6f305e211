#!/usr/bin/env bash
# GPU check of ncp on a bare GPU machine (one H100/H200; Python 3.12, torch 2.11 cu130,
# transformers, peft, accelerate, an nvcc; no network), in under 8 minutes:
#   1. installs the wheels it is handed (folder $1, default ./wheels; see scripts/build_wheels.sh),
#   2. builds ncp._C from source with its CUDA kernels (ninja, sm_90 by default),
#   3. runs the `cuda` tests (pytest -m cuda),
#   4. runs the op benchmark (benchmarks/ops.py),
#   5. (the training-step benchmark goes here: see STEP BENCHMARK below),
# then prints a short table. With $OUT set it writes there: gpu_check.json (steps,
# times, status), ops.json (benchmark), pytest_cuda.xml and the logs.
#
# Usage: benchmarks/gpu_check.sh [WHEEL_DIR]     (from any folder; it works in the repo root)
# Env:   PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS (default nproc),
#        NCP_OPS_BENCH_ARGS (extra arguments of benchmarks/ops.py), NCP_GPU_CHECK_ONLY (the steps
#        to run, e.g. "install_wheels build_extension pytest_cuda"; default all), NCP_GPU_CHECK_BUDGET,
#        NCP_KEEP_CXX=1 (build with the image's $CXX instead of /usr/bin/g++)
set -uo pipefail
WHEELS=$(realpath -m "${1:-wheels}")   # before the cd: relative to the caller's folder
OUTDIR=$(realpath -m "${OUT:-$(mktemp -d)}")
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p "$OUTDIR"
export WHEELS PY PYTHONUNBUFFERED=1
T0=$(date +%s)
STEPS=()   # "name|status|seconds|note"
FAILED=0

now() { echo $(( $(date +%s) - T0 )); }
# run_step NAME TIMEOUT_S CMD...: runs CMD with a time limit, logs to $OUTDIR/NAME.log, records the result.
# Every step's limit is cut to what is left of the budget (NCP_GPU_CHECK_BUDGET, default 450 s,
# which keeps the whole script under 8 minutes); a step with under 20 s left is skipped.
BUDGET=${NCP_GPU_CHECK_BUDGET:-450}
run_step() {
  local name=$1 limit=$2; shift 2
  if [ -n "${NCP_GPU_CHECK_ONLY:-}" ] && [[ " $NCP_GPU_CHECK_ONLY " != *" $name "* ]]; then
    STEPS+=("$name|skipped(only)|0|")
    return 0
  fi
  local left=$(( BUDGET - $(now) ))
  if [ "$left" -lt 20 ]; then
    echo "== [$(now) s] $name: skipped, ${left} s of the budget left"
    STEPS+=("$name|skipped(budget)|0|")
    FAILED=1
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local start; start=$(date +%s)
  echo "== [$(now) s] $name (limit ${limit} s)"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUTDIR/$name.log"
  local rc=${PIPESTATUS[0]}
  local secs=$(( $(date +%s) - start ))
  local status=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="timeout(${limit}s)"; FAILED=1;
  elif [ "$rc" -ne 0 ]; then status="failed(rc=$rc)"; FAILED=1; fi
  STEPS+=("$name|$status|$secs|$(tail -1 "$OUTDIR/$name.log" | cut -c1-90)")
  return "$rc"
}

install_wheels() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
  if [ ! -d "$WHEELS" ]; then echo "no wheel folder $WHEELS: installing nothing"; return 0; fi
  # The ncp wheel carries an extension built against another torch: ncp is built from source below.
  mapfile -t whls < <(ls "$WHEELS"/*.whl 2>/dev/null | grep -v '/ncp-[0-9]')
  [ ${#whls[@]} -gt 0 ] || { echo "no wheels in $WHEELS"; return 0; }
  $PY -m pip install -q --no-index --find-links "$WHEELS" "${whls[@]}" \
    || { echo "dependency resolution failed; installing without dependencies"; \
         $PY -m pip install -q --no-index --no-deps "${whls[@]}"; }
}

build_extension() {
  if ! command -v nvcc >/dev/null; then
    for d in /usr/local/cuda/bin /usr/local/cuda-13/bin; do [ -x "$d/nvcc" ] && export PATH="$d:$PATH"; done
  fi
  if ! command -v nvcc >/dev/null; then  # an nvcc installed from wheels (nvidia-cuda-nvcc & co.)?
    local cu; cu=$($PY -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13'))" 2>/dev/null)
    if [ -n "$cu" ] && [ -x "$cu/bin/nvcc" ]; then
      [ -e "$cu/lib64" ] || ln -s lib "$cu/lib64"
      [ -e "$cu/lib/libcudart.so" ] || ln -s libcudart.so.13 "$cu/lib/libcudart.so"
      export PATH="$cu/bin:$PATH" CUDA_HOME="$cu"
    fi
  fi
  command -v nvcc && nvcc --version | tail -1
  # The system compiler, not the image's CXX: a wrapper there (/opt/gcc/bin/g++ on the 2026-11
  # H100 image) links libstdc++ statically, and every TORCH_CHECK failure in such an ncp._C
  # segfaults (setup.py now refuses to finish such a build). NCP_KEEP_CXX=1 keeps $CXX.
  if [ "${NCP_KEEP_CXX:-0}" != "1" ] && [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then
    export CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++
  fi
  echo "CXX=${CXX:-c++}"
  $PY -c "import ninja" 2>/dev/null || echo "note: ninja is not installed; the build will be serial"
  FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    $PY -m pip install -q --no-build-isolation --no-deps --no-index -e . \
    || FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
       $PY setup.py build_ext --inplace
  PYTHONPATH=python $PY -c "import ncp.ops as o; print('fused ops on', sorted(o.FUSED_DEVICES)); assert 'cuda' in o.FUSED_DEVICES"
}

export -f install_wheels build_extension   # run_step runs them under `timeout bash -c`
run_step install_wheels 60 bash -c install_wheels
run_step build_extension 180 bash -c build_extension
run_step pytest_cuda 120 env PYTHONPATH=python $PY -m pytest -m cuda -q -p no:cacheprovider \
  --junitxml="$OUTDIR/pytest_cuda.xml" tests/test_ops.py   # the only module with cuda tests: a collection
                                                          # error elsewhere must not stop them
# shellcheck disable=SC2086  # NCP_OPS_BENCH_ARGS: extra arguments, e.g. "--models sd15 --no-compile"
run_step ops_benchmark 150 env PYTHONPATH=python $PY benchmarks/ops.py --out "$OUTDIR/ops.json" ${NCP_OPS_BENCH_ARGS:-}

# ---- STEP BENCHMARK (issue 6, benchmarks/step.py; owned by the step-benchmark engineer) ----
# Full-size SD1.5 (512 px) and SDXL (1024 px) U-Nets with random weights, each at the largest
# power-of-two batch that fits: the baseline Diffusion-DPO step (whole U-Net trained + an fp16
# reference copy) vs ncp's DPO and NCP-DPO (LoRA 64, 8-bit AdamW, bf16). About 3-4 minutes on
# an H100; each measurement lands in $OUTDIR/step.json as it finishes, so a timeout keeps them.
run_step step_benchmark 270 env PYTHONPATH=python $PY benchmarks/step.py --device cuda --steps 4 --warmup 1 \
  --worker-timeout 150 --out "$OUTDIR/step.json"
# -------------------------------------------------------------------------------------

echo
echo "== gpu_check summary ($(now) s in all)"
printf '%-16s %-14s %6s  %s\n' step status seconds "last line"
for s in "${STEPS[@]}"; do IFS='|' read -r n st sec note <<<"$s"; printf '%-16s %-14s %6s  %s\n' "$n" "$st" "$sec" "$note"; done
$PY - "$OUTDIR" "${STEPS[@]}" <<'PYEOF'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
steps = [dict(zip(("step", "status", "seconds", "last_line"), s.split("|", 3))) for s in sys.argv[2:]]
summary = {"steps": steps}
try:
    import torch
    summary["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    summary["torch"] = torch.__version__
except Exception as err:  # noqa: BLE001
    summary["device"] = f"unknown ({err})"
if (out / "ops.json").exists():
    ops = json.loads((out / "ops.json").read_text())
    summary["copy_GBps"] = ops["copy_GBps"]
    summary["ops"] = [{k: r[k] for k in ("op", "model", "preset", "mode", "fused_ms", "x_eager", "x_compiled", "pct_copy")}
                      for r in ops["rows"]]
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
print(f"wrote {out / 'gpu_check.json'}")
PYEOF
exit $FAILED
