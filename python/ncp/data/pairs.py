"""Which rows become training pairs: ties, winner-first order, the absolute-winners filter.

Both loader backends implement these rules (docs/internals.md); this is the
Python version and the oracle of the Rust one.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

LOGICAL_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1", "image_0_uid", "image_1_uid")
REQUIRED_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")


@dataclass(frozen=True)
class PairRef:
    """One selected pair: where its row is and which image won."""

    file: int
    row: int  # row within the file
    winner_is_0: bool


def column_map(overrides: dict[str, str]) -> dict[str, str]:
    unknown = set(overrides) - set(LOGICAL_COLUMNS)
    if unknown:
        raise ValueError(f"data.columns: unknown logical column(s) {sorted(unknown)}; known: {LOGICAL_COLUMNS}")
    return {name: overrides.get(name, name) for name in LOGICAL_COLUMNS}


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
