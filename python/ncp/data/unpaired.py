"""Unpaired binary feedback: rows of (caption, image, label), each image desirable or undesirable.

The input form of Diffusion-KTO (docs/objectives.md): one image with a good/bad
label, as most product feedback arrives. Parquet columns or JSONL keys
``caption``, ``image`` (bytes in parquet, a path relative to the file in JSONL)
and ``label``, renamed with ``data.columns``. A label is desirable when it is
``true``, ``1`` or ``"desirable"`` and undesirable when it is ``false``, ``0`` or
``"undesirable"``; anything else (null, another number or string) is a
:class:`DataError` naming the file, row (or line) and column (or key) and the
value. This is the Python rule and the oracle of the Rust loader's
(``rust_dataloader/src/source.rs``, ``labels``), with the same messages.
"""
from __future__ import annotations

import json
from typing import Any

from ncp.data.batch import DataError

UNPAIRED_COLUMNS = ("caption", "image", "label")
ACCEPTED = 'true/false, 1/0, "desirable"/"undesirable"'


def unpaired_column_map(overrides: dict[str, str]) -> dict[str, str]:
    """Logical -> actual names of the unpaired columns; another logical name is an error naming the known."""
    unknown = set(overrides) - set(UNPAIRED_COLUMNS)
    if unknown:
        raise DataError(f"data.columns: unknown logical column(s) {sorted(unknown)} for unpaired data; known: "
                        f"{', '.join(UNPAIRED_COLUMNS)}")
    return {name: overrides.get(name, name) for name in UNPAIRED_COLUMNS}


def label_of(value: Any) -> bool | None:
    """True (desirable), False (undesirable) or None (not a label)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return {0: False, 1: True}.get(value) if value in (0, 1) else None
    if isinstance(value, str):
        return {"desirable": True, "undesirable": False}.get(value)
    return None


def parse_label(value: Any, place: str) -> bool:
    """The label of ``value``, or a :class:`DataError` "<place>: label <value> is not ..."; ``place`` is
    "<file> row <r> column '<c>'" (parquet, rows from 0) or "<file> line <n> key '<k>'" (JSONL, lines from 1)."""
    label = label_of(value)
    if label is None:
        raise DataError(f"{place}: label {json.dumps(value)} is not desirable/undesirable (accepted: {ACCEPTED})")
    return label
