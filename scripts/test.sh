#!/usr/bin/env bash
# Sets up ncp (scripts/setup.sh) and runs every CPU test: the Rust crate's
# `cargo test`, then pytest (unit and CPU integration tiers; `cuda` tests skip
# without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -f rust_dataloader/Cargo.toml ]; then
  cargo test --release -q --manifest-path rust_dataloader/Cargo.toml
fi
.venv/bin/python -m pytest -q "$@"
