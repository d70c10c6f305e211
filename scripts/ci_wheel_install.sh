#!/usr/bin/env bash
# Installs the built wheels as a user would, and runs them: a clean venv (python -m venv, no
# system site packages, nothing of the project's .venv), `pip install` of the ncp and
# ncp_dataloader wheels with their dependencies from the package index (torch==MAJOR.MINOR.*
# as the ncp wheel pins it), then, from a folder outside the repository so that the installed
# wheels are imported, not the source tree:
#   - the wheels' tags are manylinux (an index refuses linux_*) and the ncp wheel pins the torch
#     that its ncp._C was built against (Requires-Dist torch==X.Y.* agrees with ncp/_C_build.json);
#   - ncp and ncp_dataloader import from the venv's site-packages, `pip check` is clean;
#   - python -m ncp.train --help;
#   - python -m ncp.ops.selfcheck: ncp._C loads, matches the running torch, and both fused ops
#     agree with the reference, forward and backward;
#   - the Rust loader reads one batch of the bundled pairs (shipped in the ncp wheel).
# Any failure exits non-zero with what failed. The venv is removed at the end (NCP_KEEP_VENV=1 keeps it).
# Cost: the install downloads torch and its CUDA libraries (about 3.5 GB) again: pip's HTTP cache
# stays empty on this project's machines (the registry answers carry no caching headers, so pip
# stores nothing). Measured on a 2-core machine shared with other work: 500-600 s of install,
# 570-670 s in all, plus almost 4 minutes to remove the venv from disk (hence /dev/shm below).
#
# Usage: scripts/ci_wheel_install.sh [WHEEL_DIR]     (default ./wheels, from scripts/build_wheels.sh)
# Env:   PYTHON (the interpreter whose base Python makes the venv; see scripts/_python.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_python.sh  # sets PY
WHEELS=$(realpath "${1:-wheels}")
start=$(date +%s)
fail() { echo "ci_wheel_install: FAILED: $*" >&2; exit 1; }

shopt -s nullglob
ncp_whls=("$WHEELS"/ncp-[0-9]*.whl)
dl_whls=("$WHEELS"/ncp_dataloader-*.whl)
shopt -u nullglob
[ ${#ncp_whls[@]} -eq 1 ] || fail "expected one ncp wheel in $WHEELS, found ${#ncp_whls[@]}"
[ ${#dl_whls[@]} -eq 1 ] || fail "expected one ncp_dataloader wheel in $WHEELS, found ${#dl_whls[@]}"
NCP_WHL=${ncp_whls[0]} DL_WHL=${dl_whls[0]}
echo "== wheels: $(basename "$NCP_WHL"), $(basename "$DL_WHL")"

# Tags and the torch pin, read from the files (no install needed).
$PY - "$NCP_WHL" "$DL_WHL" <<'PYEOF' || fail "wheel tags or metadata"
import json, re, sys, zipfile
ncp_whl, dl_whl = sys.argv[1:3]
for whl in (ncp_whl, dl_whl):
    platform = whl.rsplit("-", 1)[1].removesuffix(".whl")
    if not re.fullmatch(r"manylinux_\d+_\d+_x86_64|manylinux2014_x86_64|any", platform.split(".")[0]):
        sys.exit(f"{whl}: platform tag {platform}, not manylinux")
with zipfile.ZipFile(ncp_whl) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    pins = [l.split(":", 1)[1].strip() for l in z.read(meta).decode().splitlines() if l.startswith("Requires-Dist: torch")]
    if "ncp/_C_build.json" in z.namelist():
        built = json.loads(z.read("ncp/_C_build.json"))["torch"]
        major_minor = ".".join(built.split(".")[:2])
        if pins != [f"torch=={major_minor}.*"]:
            sys.exit(f"{ncp_whl}: ncp._C is built against torch {built}, but the wheel requires {pins}")
        print(f"   ncp._C built against torch {built}; the wheel requires {pins[0]}")
    else:
        sys.exit(f"{ncp_whl}: no ncp/_C_build.json (the wheel has no ncp._C?)")
PYEOF

# The venv (about 4.5 GB in some 20,000 files) and pip's temporary files go to memory (/dev/shm)
# when it has room (12 GB free there and in RAM): on this project's disks removing the venv
# alone took almost 4 minutes. Otherwise, or with NCP_WHEEL_VENV_DIR set, to that folder or /tmp.
free_kb() { df -Pk "$1" 2>/dev/null | awk 'NR == 2 { print $4 }'; }
mem_kb=$(awk '/^MemAvailable:/ { print $2 }' /proc/meminfo 2>/dev/null || echo 0)
BASEDIR=${NCP_WHEEL_VENV_DIR:-/tmp}
if [ -z "${NCP_WHEEL_VENV_DIR:-}" ] && [ -d /dev/shm ] && [ "$(free_kb /dev/shm || echo 0)" -gt 12000000 ] \
   && [ "${mem_kb:-0}" -gt 12000000 ] && ! grep -qE '^\S+ /dev/shm \S+ \S*noexec' /proc/mounts; then
  BASEDIR=/dev/shm
fi
WORK=$(mktemp -d "$BASEDIR/ncp-wheel-install.XXXXXX")
[ "${NCP_KEEP_VENV:-0}" = "1" ] || trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/tmp"
export TMPDIR=$WORK/tmp   # pip's downloads and unpacked files
VPY=$WORK/venv/bin/python
BASE=$($PY -c "import sys; print(sys._base_executable)")
echo "== clean venv ($BASE -m venv $WORK/venv)"
"$BASE" -m venv "$WORK/venv"
# Nothing of the project may be visible: no site packages beyond the venv's own.
$VPY -c "import sys, site; assert not any('.venv' in p for p in sys.path), sys.path; assert sys.prefix != sys.base_prefix"
$VPY -c "import torch" 2>/dev/null && fail "the clean venv already sees a torch"

echo "== pip install of both wheels and their dependencies"
t0=$(date +%s)
$VPY -m pip install -q --disable-pip-version-check "$NCP_WHL" "$DL_WHL" || fail "pip install of the wheels"
echo "   installed in $(( $(date +%s) - t0 )) s"
$VPY -m pip check || fail "pip check"

cd "$WORK"  # outside the repository: imports come from the venv
echo "== imports come from the venv"
$VPY - "$WORK/venv" <<'PYEOF' || fail "imports"
import sys
venv = sys.argv[1]
import torch, ncp, ncp_dataloader
import ncp.ops
for mod in (ncp, ncp_dataloader, ncp.ops):
    assert mod.__file__.startswith(venv), f"{mod.__name__} imported from {mod.__file__}, not the venv"
    print(f"   {mod.__name__}: {mod.__file__}")
print(f"   torch {torch.__version__}; ncp._C loaded: {ncp.ops.HAVE_EXTENSION}; fused on {sorted(ncp.ops.FUSED_DEVICES)}")
PYEOF

echo "== python -m ncp.train --help"
$VPY -m ncp.train --help >"$WORK/help.txt" 2>"$WORK/help.err" || { cat "$WORK/help.err" >&2; fail "ncp.train --help"; }
grep -q "usage:" "$WORK/help.txt" || { cat "$WORK/help.txt" "$WORK/help.err" >&2; fail "ncp.train --help printed no usage"; }
# Warnings of the freshly resolved dependencies are shown, not fatal (their releases are not ours).
if [ -s "$WORK/help.err" ]; then echo "   note: it also wrote to stderr:"; sed 's/^/   | /' "$WORK/help.err"; fi
echo "   $(wc -l <"$WORK/help.txt") lines of help"

echo "== python -m ncp.ops.selfcheck"
$VPY -m ncp.ops.selfcheck --device cpu || fail "fused-op self-check"

echo "== the Rust loader reads the bundled pairs"
$VPY - <<'PYEOF' || fail "ncp_dataloader"
from importlib.resources import files
import ncp_dataloader
shard = files("ncp") / "bundle" / "data" / "train-00000.parquet"
loader = ncp_dataloader.PairLoader([str(shard)], resolution=32, batch_size=4, shuffle=False, num_threads=1)
batch = next(iter(loader))
assert batch["winners"].shape == (4, 3, 32, 32) and batch["losers"].shape == (4, 3, 32, 32), batch["winners"].shape
assert len(batch["captions"]) == 4
print(f"   {loader.num_pairs} pairs, first batch {batch['winners'].shape} {batch['winners'].dtype}")
PYEOF

echo "ci_wheel_install: OK in $(( $(date +%s) - start )) s"
