# Sourced by the scripts in this folder: sets PY to the Python with torch, which is
# $PYTHON, else the active venv's, else the project's .venv, else python3.
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -n "${VIRTUAL_ENV:-}" ]; then PY=python
elif [ -x .venv/bin/python ]; then PY=$PWD/.venv/bin/python
else PY=python3; fi
