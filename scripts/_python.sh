# Sourced by the scripts in this folder: sets PY to the Python with torch, which is
# $PYTHON, else the active venv's, else the project's .venv, else (in a linked git
# worktree, which has no .venv of its own) the main worktree's .venv, else python3.
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -n "${VIRTUAL_ENV:-}" ]; then PY=python
elif [ -x .venv/bin/python ]; then PY=$PWD/.venv/bin/python
elif _ncp_common=$(git rev-parse --path-format=absolute --git-common-dir 2>/dev/null) \
     && [ -x "$(dirname "$_ncp_common")/.venv/bin/python" ]; then PY=$(dirname "$_ncp_common")/.venv/bin/python
else PY=python3; fi
unset _ncp_common
