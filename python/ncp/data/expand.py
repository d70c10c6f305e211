"""``data.sources`` to files: the one Python expansion, with the Rust loader's answers.

Rules (``rust_dataloader/src/sources.rs::expand_sources`` keeps the same):
'bundle' is the data shipped with ncp; a leading ``~`` is the home folder; an
existing file is taken as it is (also when its name holds ``*?[``); a pattern
with ``*``, ``?`` or ``[`` is a glob (hidden files included, sorted); a folder
is its ``*.parquet`` files (sorted); any other path is passed on, for the reader
to name if it is missing. A glob or folder with no match is an error naming it.
"""
from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

from ncp.data.batch import DataError
from ncp.paths import bundle_path

GLOB_CHARS = "*?["


def expand_sources(sources: Sequence[str] | str) -> list[str]:
    """Paths, globs, folders, 'bundle' or one JSONL file -> the list of files, in order."""
    if isinstance(sources, str):
        sources = [sources]
    if not sources:
        raise DataError("data.sources is empty")
    files: list[str] = []
    for src in sources:
        files.extend(_expand_one(str(bundle_path("data", "*.parquet")) if src == "bundle" else src))
    if len(files) > 1 and any(f.lower().endswith(".jsonl") for f in files):
        raise DataError("data.sources: a JSONL source must be the only source")
    return files


def _expand_one(src: str) -> list[str]:
    path = os.path.expanduser(src)
    if os.path.isfile(path) or not any(c in path for c in GLOB_CHARS):
        if os.path.isdir(path):
            found = sorted(str(p) for p in Path(path).iterdir() if p.suffix == ".parquet")
            if not found:
                raise DataError(f"data.sources: folder {src} holds no .parquet file")
            return found
        return [path]
    found = sorted(glob.glob(path, include_hidden=True))
    if not found:
        raise DataError(f"data.sources: {src} matches no file")
    return found
