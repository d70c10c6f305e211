#!/usr/bin/env bash
# GPU check of ncp on a bare GPU machine (one H100/H200; Python 3.12, torch 2.11 cu130,
# transformers, peft, accelerate, an nvcc; no network), in under 8 minutes:
#   1. installs the wheels it is handed (folder $1, default ./wheels; see scripts/build_wheels.sh),
#   2. builds ncp._C from source with its CUDA kernels (ninja, sm_90 by default), and runs its
#      self-check (python -m ncp.ops.selfcheck: the fused ops against the reference, cpu and cuda),
#   3. runs the `cuda` tests (pytest -m cuda),
#   4. issue 13, SD1.5 at 512 px first (the goals' model): the step benchmark with MFU, the speed-lever
#      sweep (channels_last, SDPA backends, fp16, regional torch.compile, CUDA graphs) and ncp's largest
#      batch (benchmarks/step.py); then the end-to-end benchmark (benchmarks/e2e.py: Rust loader + VAE +
#      text encoders + step, the latent cache, the Diffusion-DPO pipeline),
#   5. what the budget leaves: SDXL's step benchmark, the op benchmark (benchmarks/ops.py),
# then prints a short table. With $OUT set it writes there: gpu_check.json (steps, times, status, the
# benchmarks' tables), step_sd15.json, e2e_sd15.json, step_sdxl.json, ops.json, pytest_cuda.xml, logs.
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
# The fused-op self-check the wheel CI step runs (scripts/ci_wheel_install.sh), here with the CUDA kernels:
# ncp._C matches this torch, and both ops agree with the float64 reference on cpu and cuda, forward and backward.
run_step selfcheck 60 env PYTHONPATH=python $PY -m ncp.ops.selfcheck --device all
run_step pytest_cuda 120 env PYTHONPATH=python $PY -m pytest -m cuda -q -p no:cacheprovider \
  --junitxml="$OUTDIR/pytest_cuda.xml" tests/test_ops.py   # the only module with cuda tests: a collection
                                                          # error elsewhere must not stop them
# ---- ISSUE 13: STEP BENCHMARK WITH MFU AND THE LEVER SWEEP, SD1.5 512 px (benchmarks/step.py) ----
# Workers: ncp's DPO + NCP-DPO paired at batch 16; the baseline Diffusion-DPO step; ncp's DPO alone from batch
# 32 down (its largest batch); last, a sweep worker times every lever configuration of
# step.py's SWEEP on one U-Net (eager ones, then regional torch.compile, then + CUDA graphs; a failing one is
# recorded and skipped; on its timeout the configurations already timed are kept). Each row: pairs/s, peak
# memory, model TFLOP/s and MFU (ncp.flops); the paired rows also carry a torch.profiler top-15 of one step
# (profile_top: what limits the step, for RESULTS). Rows land in step_sd15.json as each worker ends. NCP_STEP_ARGS: extra arguments (e.g. --no-sweep-compile).
# shellcheck disable=SC2086
run_step step_sd15 230 env -u OUT PYTHONPATH=python $PY benchmarks/step.py --device cuda --model sd15 --sweep sd15 --profile sd15 \
  --steps 3 --warmup 1 --worker-timeout 90 --sweep-timeout 110 --out "$OUTDIR/step_sd15.json" ${NCP_STEP_ARGS:-}
# ---- ISSUE 13: END TO END, SD1.5 512 px (benchmarks/e2e.py) ----
# Random-weight SD1.5 pipeline built from the published configs, 400 generated Pick-a-Pic-format pairs of
# 768 px JPEGs (row groups of 100); ncp.train from JPEGs (Rust loader + VAE + text encoder + step), from the
# latent cache (python -m ncp.cache, timed apart), and the Diffusion-DPO pipeline, batch 16, DPO.
# shellcheck disable=SC2086
run_step e2e_sd15 150 env -u OUT PYTHONPATH=python $PY benchmarks/e2e.py --device cuda --model sd15 --steps 4 \
  --warmup 2 --pairs 400 --worker-timeout 100 --work /tmp/ncp-e2e --out "$OUTDIR/e2e_sd15.json" ${NCP_E2E_ARGS:-}
# ---- what the budget leaves ----
run_step step_sdxl 150 env -u OUT PYTHONPATH=python $PY benchmarks/step.py --device cuda --model sdxl --steps 3 \
  --warmup 1 --worker-timeout 80 --out "$OUTDIR/step_sdxl.json"
# shellcheck disable=SC2086  # NCP_OPS_BENCH_ARGS: extra arguments, e.g. "--models sd15 --no-compile"
run_step ops_benchmark 60 env -u OUT PYTHONPATH=python $PY benchmarks/ops.py --out "$OUTDIR/ops.json" \
  ${NCP_OPS_BENCH_ARGS:---models sd15 --no-compile}

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
for name in ("step_sd15", "step_sdxl", "e2e_sd15"):  # their summaries and goals, side by side
    path = out / f"{name}.json"
    if path.exists():
        report = json.loads(path.read_text())
        summary[name] = {"summary": report.get("summary"), "goals": report.get("goals"),
                         "complete": report.get("complete")}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
print(f"wrote {out / 'gpu_check.json'}")
PYEOF
# The benchmarks' own tables, then the logs in one archive (the device tool brings back at most 8 files)
for f in step_sd15 e2e_sd15 step_sdxl; do
  [ -f "$OUTDIR/$f.log" ] && { echo; echo "== $f"; sed -n '/^model /,/^{/p' "$OUTDIR/$f.log" | sed '$d'; }
done
(cd "$OUTDIR" && tar czf logs.tar.gz ./*.log && rm -f ./*.log)
exit $FAILED
