"""What a training item is, for both kinds of data: R images of one caption with R labels.

A preference pair is R = 2 images labelled by which one won; an unpaired image
(Diffusion-KTO's input, docs/objectives.md) is R = 1 image labelled desirable or
undesirable, as most product feedback arrives. The latent cache's "roles" are these
R images. The kind (``data.format``: :data:`PAIRS`, :data:`UNPAIRED`) decides R,
the logical columns and which rows become items; the readers of
:mod:`ncp.data.formats` read both kinds from parquet or JSONL.

Which rows become pairs (docs/internals.md): a tie is dropped (or kept winner-first
with ``drop_ties=False``), the winner comes first, and the absolute-winners filter
keeps only rows whose winner never lost. An unpaired label is desirable when it is
``true``, ``1`` or ``"desirable"`` and undesirable when it is ``false``, ``0`` or
``"undesirable"``; anything else is a :class:`DataError` naming the file, row (or
line), column (or key) and value. These are the Python rules and the oracle of the
Rust loader's (``rust_dataloader/src/columns.rs``, ``parquet.rs``, ``jsonl.rs``), with the same messages.
"""
from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ncp.data.batch import DataError

ACCEPTED = 'true/false, 1/0, "desirable"/"undesirable"'


@dataclass(frozen=True, slots=True)
class Item:
    """R images of one caption with R labels (``True``: desirable, the winner of a pair), in column order.

    ``images`` are the image columns (parquet: their names, read at ``row``) or the image paths (JSONL).
    """

    file: int
    row: int  # the row in the file (JSONL: its line number - 1)
    caption: str
    images: tuple[str, ...]
    labels: tuple[bool, ...]

    def role_order(self) -> tuple[int, ...]:
        """The images in role order: the desirable first (a pair's winner, then its loser)."""
        return tuple(sorted(range(len(self.labels)), key=lambda k: not self.labels[k]))


@dataclass(frozen=True)
class Kind:
    """One kind of data: its item size R, logical columns (renamed by ``data.columns``) and JSONL keys."""

    name: str  # data.format
    noun: str  # one item, in messages
    images: tuple[str, ...]  # the logical image columns, one per role: R = len(images)
    labels: tuple[str, ...]  # the logical label columns
    uids: tuple[str, ...] = ()  # optional logical uid columns (the image bytes' hash where missing)
    jsonl_images: tuple[str, ...] = ()  # JSONL keys of the image paths when they are not the image columns
    binary: bool = False  # labels are desirable/undesirable (:func:`parse_label`), not scores to compare

    @property
    def roles(self) -> int:
        return len(self.images)

    @property
    def columns(self) -> tuple[str, ...]:
        """Every logical column, in the order messages list them."""
        return ("caption", *self.images, *self.labels, *self.uids)

    @property
    def required(self) -> tuple[str, ...]:
        return ("caption", *self.images, *self.labels)

    def column_map(self, overrides: Mapping[str, str]) -> dict[str, str]:
        """Logical -> actual column names; an unknown logical name is an error naming it and the known."""
        unknown = set(overrides) - set(self.columns)
        if unknown:
            raise DataError(f"data.columns: unknown logical column(s) {sorted(unknown)} for {self.name} data; "
                            f"known: {', '.join(self.columns)}")
        return {name: overrides.get(name, name) for name in self.columns}

    def jsonl_keys(self, columns: Mapping[str, str]) -> dict[str, str]:
        """Logical -> key of a JSONL line: caption, the image paths, the labels (JSONL pairs carry none: the
        winner is named first, and their keys are not renamed)."""
        if self.jsonl_images:
            return {name: name for name in ("caption", *self.jsonl_images)}
        return {name: columns[name] for name in ("caption", *self.images, *self.labels)}

    def items(self, tables: Sequence[Table], drop_ties: bool, absolute_winners: bool) -> list[Item]:
        """The items of the files' tables: every row of unpaired data, the selected rows of pairs."""
        if not self.binary:
            return [tables[ref.file].item(ref.file, ref.row, (ref.winner_is_0, not ref.winner_is_0))
                    for ref in select_pairs([t.columns for t in tables], drop_ties, absolute_winners)]
        (label,) = self.labels
        return [t.item(f, r, (t.columns[label][r],)) for f, t in enumerate(tables) for r in range(len(t.rows))]

    def nothing_left(self, files: Sequence[Path]) -> DataError:
        names = ", ".join(map(str, files))
        if self.binary:
            return DataError(f"no rows in {names}")
        return DataError(f"no training pairs left in {names} after the filters")


PAIRS = Kind("pairs", "pair", images=("jpg_0", "jpg_1"), labels=("label_0", "label_1"),
             uids=("image_0_uid", "image_1_uid"), jsonl_images=("winner", "loser"))
UNPAIRED = Kind("unpaired", "image", images=("image",), labels=("label",), binary=True)
KINDS = {kind.name: kind for kind in (PAIRS, UNPAIRED)}


@dataclass
class Table:
    """The rows of one file as logical columns (``caption``, the labels, a pair's uids: one entry per row),
    with each row's number in the file and its images (JSONL: the paths; parquet: the image column names)."""

    columns: dict[str, list]
    rows: list[int]
    images: list[tuple[str, ...]] | tuple[str, ...]  # one tuple per row (JSONL), or one for all rows (parquet)
    row_group_starts: list[int] | None = None  # parquet

    def item(self, file: int, index: int, labels: tuple[bool, ...]) -> Item:
        images = self.images if isinstance(self.images, tuple) else self.images[index]
        return Item(file, self.rows[index], self.columns["caption"][index], images, labels)


# ---------------------------------------------------------------- pairs


@dataclass(frozen=True)
class PairRef:
    """One selected pair: where its row is and which image won."""

    file: int
    row: int  # index into the file's columns
    winner_is_0: bool


def select_pairs(
    files: list[dict[str, list]], drop_ties: bool = True, absolute_winners: bool = False
) -> list[PairRef]:
    """Select pairs from per-file column lists ``caption, label_0, label_1, image_0_uid, image_1_uid``.

    A tie (``label_0 == label_1``) is dropped when ``drop_ties`` (it can't be
    ordered otherwise, and the absolute-winners filter always drops it). The
    absolute-winners filter (NCP paper) keeps, per caption, the rows whose winner
    never lost or tied in any row of that caption and won at least twice.
    """
    refs: list[PairRef] = []
    wins: dict[tuple[str, str], int] = defaultdict(int)
    bad: set[tuple[str, str]] = set()  # lost or tied at least once
    for f, cols in enumerate(files):
        for row, (caption, l0, l1, u0, u1) in enumerate(zip(
                cols["caption"], cols["label_0"], cols["label_1"], cols["image_0_uid"], cols["image_1_uid"])):
            if l0 == l1:
                bad.update({(caption, u0), (caption, u1)})
                if not drop_ties and not absolute_winners:
                    refs.append(PairRef(f, row, True))
                continue
            winner, loser = (u0, u1) if l0 > l1 else (u1, u0)
            wins[(caption, winner)] += 1
            bad.add((caption, loser))
            refs.append(PairRef(f, row, l0 > l1))
    if not absolute_winners:
        return refs

    def winner_key(ref: PairRef) -> tuple[str, str]:
        cols = files[ref.file]
        uid = cols["image_0_uid"][ref.row] if ref.winner_is_0 else cols["image_1_uid"][ref.row]
        return cols["caption"][ref.row], uid

    return [r for r in refs if winner_key(r) not in bad and wins[winner_key(r)] >= 2]


def image_uid(data: bytes | None) -> str:
    """The uid of an image when the uid columns are missing: ``xxh3:`` and the 16 hex digits of the xxh3-64 of
    its bytes (a null image: of no bytes), the Rust loader's uid (``ncp_dataloader.image_uid``) to the
    character. xxh3 is the Rust loader's content hash; ``xxhash`` (PyPI) computes it here, or the Rust
    wheel when ``xxhash`` is missing."""
    return f"xxh3:{_xxh3_64(data or b''):016x}"


def _xxh3_64(data: bytes) -> int:
    try:
        import xxhash
    except ImportError:
        try:
            from ncp_dataloader import content_hash
        except ImportError as err:
            raise ImportError("hashing images for their uid needs the xxhash package (pip install xxhash) "
                              "or the ncp_dataloader wheel") from err
        return content_hash(data)
    return xxhash.xxh3_64_intdigest(data)


# ---------------------------------------------------------------- unpaired labels


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
