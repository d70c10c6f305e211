#!/usr/bin/env bash
# Compile-checks the CUDA sources of ncp._C (csrc/*.cu) for sm_80 and sm_90 on a
# machine without a GPU or CUDA toolkit.
#
# It installs an nvcc from PyPI whose version matches the CUDA version of the
# installed torch (nvidia-cuda-nvcc, -crt, -runtime, -cccl, nvidia-nvvm; CUDA >= 13
# wheel layout) into a cache folder outside the venv, then builds the whole
# extension with FORCE_CUDA=1 (C++ and CUDA, compile and link) into a temporary
# folder, so the installed package is left alone. It fails on any compile or
# link error and on any compiler warning in our own sources (csrc/).
#
# Usage: scripts/ci_cuda_compile.sh     (with the project venv active, or PYTHON=...)
# Env:   NCP_NVCC_DIR   where the nvcc wheels go (default /tmp/ncp-nvcc-<cuda version>; reused)
#        TORCH_CUDA_ARCH_LIST  default "8.0;9.0";  MAX_JOBS default 1
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/_python.sh  # sets PY
CUDA_VER=$($PY -c "import torch; print(torch.version.cuda or '')")
if [ -z "$CUDA_VER" ]; then
  echo "ci_cuda_compile: torch is a CPU-only build: no CUDA headers to compile against" >&2
  exit 1
fi
MAJOR=${CUDA_VER%%.*}
if [ "$MAJOR" -lt 13 ]; then
  echo "ci_cuda_compile: torch uses CUDA $CUDA_VER; this script knows the CUDA >= 13 wheel layout only" >&2
  exit 1
fi

PREFIX=${NCP_NVCC_DIR:-/tmp/ncp-nvcc-$CUDA_VER}
CUDA_HOME="$PREFIX/nvidia/cu$MAJOR"
# All pinned to torch's CUDA minor version: an nvvm newer than ptxas emits PTX that ptxas rejects.
PKGS=("nvidia-cuda-nvcc==$CUDA_VER.*" "nvidia-cuda-crt==$CUDA_VER.*" "nvidia-cuda-runtime==$CUDA_VER.*"
      "nvidia-cuda-cccl==$CUDA_VER.*" "nvidia-nvvm==$CUDA_VER.*")
STAMP="$PREFIX/.ncp-installed"
if [ ! -x "$CUDA_HOME/bin/nvcc" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "${PKGS[*]}" ]; then
  echo "== installing nvcc $CUDA_VER.* from PyPI into $PREFIX"
  rm -rf "$PREFIX"
  $PY -m pip install -q --disable-pip-version-check --target "$PREFIX" "${PKGS[@]}"
  echo "${PKGS[*]}" >"$STAMP"
fi
# torch links with -L$CUDA_HOME/lib64 -lcudart; the wheels ship lib/libcudart.so.13 only.
[ -e "$CUDA_HOME/lib64" ] || ln -s lib "$CUDA_HOME/lib64"
[ -e "$CUDA_HOME/lib/libcudart.so" ] || ln -s "libcudart.so.$MAJOR" "$CUDA_HOME/lib/libcudart.so"
"$CUDA_HOME/bin/nvcc" --version | tail -2

WORK=$(mktemp -d)
LOG="$WORK/build.log"
KEEP_LOG=${NCP_CUDA_LOG:-/tmp/ncp_cuda_compile.log}   # the build log survives the temp folder
trap 'cp -f "$LOG" "$KEEP_LOG" 2>/dev/null; rm -rf "$WORK"' EXIT
echo "== building ncp._C with CUDA kernels for ${TORCH_CUDA_ARCH_LIST:-8.0;9.0} (log: $KEEP_LOG)"
start=$(date +%s)
set +e
# The venv's bin on PATH: ninja (a parallel build) lives there.
CUDA_HOME="$CUDA_HOME" PATH="$CUDA_HOME/bin:$(dirname "$(command -v "$PY")"):$PATH" FORCE_CUDA=1 NVCC_APPEND_FLAGS="-Xptxas=-v" \
  TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}" MAX_JOBS="${MAX_JOBS:-1}" \
  $PY setup.py -q build_ext --build-temp "$WORK/tmp" --build-lib "$WORK/lib" >"$LOG" 2>&1
rc=$?
set -e
if [ $rc -ne 0 ]; then
  grep -E "error|Error" "$LOG" | head -40 >&2 || true
  tail -20 "$LOG" >&2
  echo "ci_cuda_compile: FAILED (build exit $rc)" >&2
  exit 1
fi
so=$(find "$WORK/lib" -name '_C*.so' | head -1)
[ -n "$so" ] || { echo "ci_cuda_compile: FAILED (no ncp/_C*.so produced)" >&2; exit 1; }
# Every .cu file has kernels for both archs: ptxas (-v) names each kernel it compiles, and the
# kernels live in anonymous namespaces, whose mangled names carry the file name.
for cu in csrc/*.cu; do
  stem=$(basename "$cu"); stem=${stem//./_}
  for arch in sm_80 sm_90; do
    if ! grep -qE "Compiling entry function '[^']*${stem}[^']*' for '${arch}'" "$LOG"; then
      echo "ci_cuda_compile: FAILED (no $arch kernel compiled from $cu)" >&2
      exit 1
    fi
  done
done
# ptxas resource use of our kernels (registers, stack, spills), for the record.
$PY - "$LOG" <<'PYEOF'
import re, sys
kernel = None
for line in open(sys.argv[1], errors="replace"):
    m = re.search(r"Compiling entry function '(\w+)' for '(sm_\d+)'", line)
    if m:
        name = re.search(r"\d+((?:reverse_step|multiscale_error)\w*?_kernel)I(N3c10\d)?([a-zA-Z0-9]+?)E", m.group(1)) if "3ncp" in m.group(1) else None
        kernel = f"{m.group(2)} {name.group(1)}<{name.group(3)}>" if name else None
        continue
    if kernel and "stack frame" in line:
        stack = line.strip()
    elif kernel and "Used" in line and "registers" in line:
        regs = re.search(r"Used (\d+) registers", line).group(1)
        print(f"  {kernel:<52} {regs:>3} registers; {stack}")
        kernel = None
PYEOF
if grep -E "csrc/[^ ]*[:(][0-9]+.*warning" "$LOG" >&2; then
  echo "ci_cuda_compile: FAILED (compiler warnings in csrc/, above)" >&2
  exit 1
fi
echo "ci_cuda_compile: OK (csrc/*.cu built for sm_80 and sm_90 in $(( $(date +%s) - start )) s, no warnings in csrc/)"
