"""One reader per file format, for both kinds of data (:mod:`ncp.data.items`): a parquet file's rows or a
JSONL file's lines as the kind's logical columns (a :class:`ncp.data.items.Table`).

Parquet: the kind's columns (renamed by ``data.columns``); images are bytes, read later by row group
(:class:`RowGroupImages`). JSONL: one object a line, image paths relative to the file, blank lines skipped;
pairs are ``{caption, winner, loser}``, unpaired images ``{caption, image, label}`` (keys renamed by
``data.columns``). Every error is a :class:`DataError` naming the file, row or line, column or key (and the
value), with the Rust loader's messages.
"""
from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from ncp.data.batch import DataError
from ncp.data.items import Kind, Table, image_uid, parse_label


def read_table(file: Path, kind: Kind, columns: Mapping[str, str]) -> Table:
    """The rows of a parquet or JSONL (``.jsonl``) file of data of ``kind``."""
    return read_jsonl(file, kind, columns) if file.suffix == ".jsonl" else read_parquet(file, kind, columns)


# ---------------------------------------------------------------- parquet


def read_parquet(file: Path, kind: Kind, columns: Mapping[str, str]) -> Table:
    """The caption, label and uid columns of a parquet file; the uids of a pair's images from their bytes
    (read once, here) where the uid columns are missing. The images stay in the file."""
    pf = open_parquet(file, columns, kind.required)
    names = set(pf.schema_arrow.names)
    wanted = ["caption", *kind.labels] + [c for c in kind.uids if columns[c] in names]
    table = pf.read(columns=[columns[c] for c in wanted])
    cols = {c: table.column(columns[c]).to_pylist() for c in wanted}
    cols["caption"] = [c or "" for c in cols["caption"]]  # a null caption is the empty one (as in the Rust loader)
    if kind.binary:
        for c in kind.labels:
            cols[c] = [parse_label(v, f"{file} row {r} column '{columns[c]}'") for r, v in enumerate(cols[c])]
    if kind.uids and kind.uids[0] not in cols:
        images = pf.read(columns=[columns[c] for c in kind.images])
        for uid, image in zip(kind.uids, kind.images):
            cols[uid] = [image_uid(b) for b in images.column(columns[image]).to_pylist()]
    return Table(cols, list(range(pf.metadata.num_rows)), tuple(columns[c] for c in kind.images),
                 row_group_starts(pf))


def open_parquet(file: Path, columns: Mapping[str, str], required: tuple[str, ...]) -> pq.ParquetFile:
    """The parquet file, or a DataError naming it (unreadable) or the required columns it lacks."""
    try:
        pf = pq.ParquetFile(file)
    except Exception as err:  # pyarrow raises several types for a bad file
        raise DataError(f"cannot read parquet file {file}: {err}") from err
    names = set(pf.schema_arrow.names)
    missing = [columns[c] for c in required if columns[c] not in names]
    if missing:
        raise DataError(f"parquet file {file} lacks column(s) {missing} (rename with data.columns; "
                        f"it has {sorted(names)})")
    return pf


def row_group_starts(pf: pq.ParquetFile) -> list[int]:
    return np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]).tolist()


class RowGroupImages:
    """The image columns of one parquet row group at a time (parquet's unit of I/O), for reading rows in
    index order without re-reading their group."""

    def __init__(self, files: list[Path], names: list[str]):
        self.files, self.names = files, names
        self._key: tuple[int, int] | None = None
        self._cells: list[list] = []

    def row(self, file: int, row: int, starts: list[int]) -> list[bytes | None]:
        """The images of row ``row`` of ``files[file]`` (row groups starting at ``starts``), in column order."""
        group = int(np.searchsorted(starts, row, side="right") - 1)
        if self._key != (file, group):
            table = pq.ParquetFile(self.files[file]).read_row_group(group, columns=self.names)
            self._key, self._cells = (file, group), [table.column(n).to_pylist() for n in self.names]
        return [cells[row - starts[group]] for cells in self._cells]


# ---------------------------------------------------------------- JSONL


def read_jsonl(file: Path, kind: Kind, columns: Mapping[str, str]) -> Table:
    """The lines of a JSONL file: each key present (else an error naming the key, its logical name, the line
    and the keys the line has), caption and image paths strings, labels of the kind (a pair's winner is
    named first)."""
    keys = kind.jsonl_keys(columns)
    images = [k for k in keys if k != "caption" and k not in kind.labels]
    cols: dict[str, list] = {"caption": [], **{c: [] for c in (*kind.labels, *kind.uids)}}
    rows, paths = [], []
    for line_no, line in jsonl_lines(file):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"cannot read {file}: line {line_no}: invalid JSON: {err}") from err
        values = {}
        for logical, key in keys.items():
            if not isinstance(rec, dict) or key not in rec:
                raise DataError(f"column '{key}' (logical '{logical}') not found in {file} line {line_no}; "
                                f"available columns: {', '.join(rec) if isinstance(rec, dict) else ''}")
            value = rec[key]
            if logical in kind.labels:
                values[logical] = parse_label(value, f"{file} line {line_no} key '{key}'")
            else:
                values[logical] = json_string(value, file, line_no, key)
        rows.append(line_no - 1)
        paths.append(tuple(str(file.parent / values[k]) for k in images))
        cols["caption"].append(values["caption"])
        for c, named_first in zip(kind.labels, (1.0, 0.0)):  # a JSONL pair names its winner first
            cols[c].append(values.get(c, named_first))
        for uid, k in zip(kind.uids, images):
            cols[uid].append(str((file.parent / values[k]).resolve()))
    return Table(cols, rows, paths)


def jsonl_lines(file: Path) -> Iterator[tuple[int, str]]:
    """The non-blank lines of a JSONL file with their numbers (from 1); a line that is not UTF-8 is a
    :class:`DataError` naming the file, line and byte (the Rust loader's message)."""
    for line_no, raw in enumerate(file.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{file} line {line_no}: not UTF-8 (byte 0x{raw[err.start]:02x} at column "
                            f"{err.start + 1})") from None
        if line.strip():
            yield line_no, line


def json_string(value: Any, file: Path, line_no: int, key: str) -> str:
    """``value`` of ``key`` on a JSONL line, or a :class:`DataError` naming file, line and key (the Rust
    loader's message)."""
    if not isinstance(value, str):
        raise DataError(f"{file} line {line_no} key '{key}': expected a string, got {json.dumps(value)}")
    return value
