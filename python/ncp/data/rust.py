"""The Rust loader (`ncp_dataloader.PairLoader`) as a source of `PairBatch`es.

The Rust side reads, decodes, resizes, crops and flips the pairs on its own
threads with the GIL released; this adapter only wraps its numpy arrays as
torch tensors (zero-copy) and carries the position for resume.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ncp.data.batch import DataError, PairBatch


def _import_loader() -> Any:
    try:
        import ncp_dataloader
    except ImportError as e:  # the wheel is built by scripts/setup.sh
        raise ImportError(
            "ncp_dataloader (the Rust loader) is not installed; build it with "
            "`maturin build --release -m rust_dataloader/Cargo.toml -o wheels/` and pip-install the wheel, "
            "or use data.backend=torch"
        ) from e
    return ncp_dataloader


def _resolve_sources(sources: Sequence[str] | str) -> list[str]:
    """'bundle' is the data shipped with ncp (as in the torch backend); '~' is expanded."""
    if isinstance(sources, str):
        sources = [sources]
    out = []
    for src in sources:
        if src == "bundle":
            from ncp.world import bundle_path

            src = str(bundle_path("data", "*.parquet"))
        out.append(str(Path(src).expanduser()))
    return out


def _tensor(a: np.ndarray) -> torch.Tensor:
    """Zero-copy view of a numpy array that the Rust side handed over."""
    return torch.from_numpy(a)


def batch_from_dict(d: Mapping[str, Any]) -> PairBatch:
    """A `PairBatch` from one dict batch of `ncp_dataloader.PairLoader`."""
    return PairBatch(
        captions=list(d["captions"]),
        winners=_tensor(d["winners"]),
        losers=_tensor(d["losers"]),
        original_sizes=_tensor(d["original_sizes"]),
        crop_top_left=_tensor(d["crop_top_left"]),
        indices=_tensor(d["indices"]),
    )


class RustPairSource:
    """Preference pairs from parquet shards (paths/globs/folders) or a JSONL file.

    Yields `PairBatch` with uint8 pixels `(B, 3, resolution, resolution)`.
    Order: a permutation per (seed, epoch), rank `rank` of `world_size` takes every
    world_size-th pair; augmentation (crop, flip, empty-prompt dropout) is seeded
    by (seed, epoch, pair index), so the output does not depend on `num_threads`.
    Corrupt images are skipped (a batch can then be smaller) and listed in
    `stats()["skipped_records"]`; with `strict=True` they raise
    `ncp_dataloader.CorruptImageError`.
    Up to `row_group_cache_mb` MB of whole row groups' images stay in memory, so a
    row group is not read and decoded again for each batch that draws from it
    (0: read only the selected rows, per batch).
    """

    def __init__(
        self,
        sources: Sequence[str] | str,
        resolution: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        random_crop: bool = False,
        random_flip: bool = True,
        drop_ties: bool = True,
        absolute_winners: bool = False,
        columns: Mapping[str, str] | None = None,
        num_threads: int = 0,
        strict: bool = False,
        empty_prompt_prob: float = 0.0,
        prefetch: int = 4,
        drop_last: bool = True,
        row_group_cache_mb: int = 512,
    ) -> None:
        lib = _import_loader()
        self.resolution = resolution
        self.batch_size = batch_size
        try:
            self._loader = lib.PairLoader(
                _resolve_sources(sources),
                resolution,
                batch_size,
                seed=seed,
                rank=rank,
                world_size=world_size,
                random_crop=random_crop,
                random_flip=random_flip,
                drop_ties=drop_ties,
                absolute_winners=absolute_winners,
                columns=dict(columns) if columns else None,
                num_threads=num_threads,
                prefetch=prefetch,
                strict=strict,
                drop_last=drop_last,
                empty_prompt_prob=empty_prompt_prob,
                row_group_cache_mb=row_group_cache_mb,
            )
        except (KeyError, ValueError) as err:  # a missing column, a bad argument: the message names it
            raise DataError(str(err).strip("'\"")) from err

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return len(self._loader)

    @property
    def num_pairs(self) -> int:
        """Pairs in the index over all ranks, after ties and filters."""
        return self._loader.num_pairs

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` (a no-op for the current one, so a resumed position survives)."""
        self._loader.set_epoch(epoch)

    def state(self) -> dict[str, int]:
        """{epoch, sample_in_epoch, seed, world_size, rank, batch_size}: where the next batch comes from."""
        return dict(self._loader.state())

    def resume(self, state: Mapping[str, int]) -> None:
        """Continue exactly at `state` (seed, world_size and batch_size must match)."""
        self._loader.resume({k: int(v) for k, v in state.items()})

    def stats(self) -> dict[str, Any]:
        """Index counts (rows, ties, pairs) and iteration counts (yielded, skipped with file and row)."""
        return dict(self._loader.stats())

    def __iter__(self) -> Iterator[PairBatch]:
        for d in self._loader:
            yield batch_from_dict(d)
