#!/usr/bin/env bash
# Builds the wheels that the GPU machine is handed (it reaches no package index):
#   wheels/ncp-*.whl             this package (pure Python part + the CPU build of ncp._C for
#                                this machine's torch; benchmarks/gpu_check.sh rebuilds the
#                                extension from source there, against its own torch and nvcc)
#   wheels/ncp_dataloader-*.whl  the Rust loader (abi3), when rust_dataloader/ exists
# With NCP_GPU_DEPS=1 it also downloads, for CPython 3.12 on manylinux x86_64, the
# packages the GPU image lacks (diffusers and its small deps, bitsandbytes with its CUDA 13
# kernels only, ninja, setuptools, wheel); NCP_GPU_DEPS_EXTRA adds more requirement strings.
#
# Usage: scripts/build_wheels.sh [OUT_DIR]    (default ./wheels; run with the project venv active)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_python.sh  # sets PY
OUT=${1:-wheels}
mkdir -p "$OUT"
start=$(date +%s)

echo "== ncp wheel -> $OUT"
MAX_JOBS=${MAX_JOBS:-1} $PY -m pip wheel -q --no-build-isolation --no-deps -w "$OUT" .

if [ -f rust_dataloader/Cargo.toml ]; then
  echo "== ncp_dataloader wheel (maturin) -> $OUT"
  MATURIN=$(dirname "$(command -v "$PY")")/maturin
  [ -x "$MATURIN" ] || MATURIN=maturin
  "$MATURIN" build --release -q -m rust_dataloader/Cargo.toml -o "$OUT"
fi

if [ "${NCP_GPU_DEPS:-0}" = "1" ]; then
  echo "== wheels for the GPU image (cp312, manylinux x86_64) -> $OUT"
  # shellcheck disable=SC2086
  $PY -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_28_x86_64 --platform any -d "$OUT" \
    diffusers importlib_metadata zipp ninja setuptools wheel bitsandbytes ${NCP_GPU_DEPS_EXTRA:-}
  # bitsandbytes ships kernels for every CUDA/ROCm/XPU version (43 MB): keep those for CUDA 13
  # (the GPU image's torch), so the wheels stay well inside the device tool's 64 MiB transfer.
  $PY - "$OUT" <<'PYEOF'
import glob, os, re, sys, zipfile
for src in glob.glob(os.path.join(sys.argv[1], "bitsandbytes-*.whl")):
    drop = re.compile(r"libbitsandbytes_(cuda1[0-2]\d|rocm|xpu)")
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(src + ".tmp", "w", zipfile.ZIP_DEFLATED) as zo:
        for info in zi.infolist():
            if drop.search(info.filename):
                continue
            data = zi.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"".join(l for l in data.splitlines(keepends=True) if not drop.search(l.decode()))
            zo.writestr(info, data)
    os.replace(src + ".tmp", src)
    print(f"slimmed {src}: {os.path.getsize(src) / 1e6:.1f} MB")
PYEOF
fi
ls -la "$OUT"
echo "build_wheels: OK in $(( $(date +%s) - start )) s"
