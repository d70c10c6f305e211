#!/usr/bin/env bash
# Sets up ncp in ./.venv: Python deps, the Rust loader wheel (maturin), and ncp
# itself with its C++ extension. Idempotent: a second run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -r requirements.txt

# The Rust loader (import ncp_dataloader), an abi3 wheel built by maturin.
if [ -f rust_dataloader/Cargo.toml ]; then
  maturin build --release -m rust_dataloader/Cargo.toml -o wheels/ -q
  python -m pip install -q --force-reinstall --no-deps wheels/ncp_dataloader-*.whl
fi

# ncp and its C++ extension (CUDA kernels too when a toolkit is present).
python -m pip install -q --no-build-isolation --no-deps -e .
python -c "import ncp, ncp.ops; print('ncp ready; fused ops:', ncp.ops.HAVE_EXTENSION)"
