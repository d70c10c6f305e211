"""The one contract every loader backend keeps (Rust, torch, latent cache), and the one state schema.

The backends import this module; the factory that picks a backend (:func:`ncp.data.sources.build_source`)
imports the backends, so nothing here may import one.

A source yields the rest of the current epoch's batches when iterated and then
stands at the start of the next epoch: the source owns the epoch counter, the
trainer only iterates (:func:`endless`). ``state()`` is where the next batch
comes from; ``resume(state)`` continues exactly there, in any backend.

Order (docs/internals.md): a permutation per (seed, epoch); rank ``r`` of
``world_size`` takes the entries ``r, r + world_size, ...`` of it; with
drop_last every rank gets ``(num_pairs // world_size) // batch_size`` batches.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol, TypedDict, runtime_checkable

import numpy as np

from ncp.data.batch import Batch, DataError


class DataState(TypedDict):
    """Where the next batch comes from; saved in every checkpoint's state.json under "data"."""

    epoch: int
    sample_in_epoch: int  # pairs of this rank's epoch order already handed out (a multiple of batch_size)
    seed: int
    world_size: int
    rank: int
    batch_size: int


STATE_KEYS = tuple(DataState.__annotations__)
# Keys a resumed source must match: another value would give another order.
ORDER_KEYS = ("seed", "world_size", "batch_size")


@runtime_checkable
class PairSource(Protocol):
    """What the trainer needs of a loader backend. Pair data give pair batches
    (:class:`ncp.data.batch.PairBatch`), unpaired data (``format="unpaired"``) unpaired ones
    (:class:`ncp.data.batch.UnpairedBatch`); order, epochs, ranks, state and resume do not depend on which
    (an item is a pair or one image)."""

    def __iter__(self) -> Iterator[Batch]:
        """The rest of the current epoch; afterwards (from the last batch on) ``state()`` is the next epoch's start."""

    def __len__(self) -> int:
        """Batches per epoch on this rank (before skips)."""

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning (a no-op for the current epoch, so a resumed position survives)."""

    def state(self) -> DataState:
        """Where the next batch comes from."""

    def resume(self, state: Mapping[str, int]) -> None:
        """Continue exactly at ``state``; a state of another order (seed, world size, batch size) is refused."""

    def stats(self) -> dict[str, Any]:
        """Counts; every backend has ``skipped`` (pairs dropped as corrupt)."""


def check_resume(state: Mapping[str, int], current: Mapping[str, int]) -> tuple[int, int]:
    """(epoch, sample_in_epoch) of ``state`` once it is known to fit the source whose order keys are
    ``current``; a :class:`DataError` names what differs. Keys missing from an older checkpoint are not checked."""
    missing = [k for k in ("epoch", "sample_in_epoch") if k not in state]
    if missing:
        raise DataError(f"cannot resume: the data state lacks {missing} (it has {sorted(state)})")
    for key in ORDER_KEYS:
        if key in state and int(state[key]) != int(current[key]):
            raise DataError(f"cannot resume: the data state has {key}={state[key]} but the source has "
                            f"{key}={current[key]} (the order would differ)")
    sample = int(state["sample_in_epoch"])
    if sample < 0 or sample % int(current["batch_size"]):
        raise DataError(f"cannot resume: sample_in_epoch={sample} is not a multiple of "
                        f"batch_size={current['batch_size']}")
    return int(state["epoch"]), sample


class Position:
    """The epoch counter and the batch within it, for the Python backends (the Rust loader keeps its own,
    with the same rules): taking the last batch of an epoch moves to the next epoch's start."""

    def __init__(self) -> None:
        self.epoch, self.batch = 0, 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.batch = epoch, 0

    def start(self, num_batches: int) -> None:
        """Before a pass: a position at or past an epoch's end (a state saved by an older ncp) is the next
        epoch's start."""
        if self.batch >= num_batches:
            self.epoch, self.batch = self.epoch + 1, 0

    def took(self, num_batches: int) -> None:
        """One batch of an epoch of ``num_batches`` was handed out."""
        self.batch += 1
        if self.batch >= num_batches:
            self.epoch, self.batch = self.epoch + 1, 0

    def state(self, seed: int, world_size: int, rank: int, batch_size: int) -> DataState:
        return DataState(epoch=self.epoch, sample_in_epoch=self.batch * batch_size, seed=seed,
                         world_size=world_size, rank=rank, batch_size=batch_size)

    def resume(self, state: Mapping[str, int], current: Mapping[str, int]) -> None:
        epoch, sample = check_resume(state, current)
        self.epoch, self.batch = epoch, sample // int(current["batch_size"])


class PositionedSource:
    """``set_epoch``, ``state`` and ``resume`` of a Python backend from its ``position`` (a :class:`Position`) and
    its ``seed``, ``rank``, ``world_size`` and ``batch_size``."""

    position: Position
    seed: int
    rank: int
    world_size: int
    batch_size: int

    def _order_keys(self) -> dict[str, int]:
        return {"seed": self.seed, "world_size": self.world_size, "rank": self.rank, "batch_size": self.batch_size}

    def set_epoch(self, epoch: int) -> None:
        self.position.set_epoch(epoch)

    def state(self) -> DataState:
        return self.position.state(**self._order_keys())

    def resume(self, state: Mapping[str, int]) -> None:
        self.position.resume(state, self._order_keys())


def rank_share(order: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This rank's entries of an epoch permutation: ``rank, rank + world_size, ...`` (the Rust rule)."""
    return order[rank::world_size]


def num_batches(num_pairs: int, batch_size: int, rank: int, world_size: int, drop_last: bool) -> int:
    """Batches per epoch on a rank (the Rust loader's `num_batches`)."""
    if drop_last:
        return (num_pairs // world_size) // batch_size
    mine = (num_pairs + world_size - 1 - rank) // world_size
    return -(-mine // batch_size)


def endless(source: PairSource) -> Iterator[Batch]:
    """Batches epoch after epoch, continuing mid-epoch after a resume. The source moves itself to the next
    epoch when a pass ends; an epoch in which every pair was skipped as corrupt is an error, not a hang."""
    while True:
        started_at_zero = source.state()["sample_in_epoch"] == 0
        yielded = False
        for batch in source:
            yielded = True
            yield batch
        if not yielded and started_at_zero and len(source) == 0:
            opts = getattr(source, "options", None)
            size = f"data.batch_size={opts.batch_size}" if opts is not None else "one batch"
            raise DataError(f"an epoch holds no full batch: fewer items than {size} (the loader's counts: "
                            f"{source.stats()}; a partial last batch is dropped): give more data or a smaller "
                            f"data.batch_size")
        if not yielded and started_at_zero:
            raise DataError(f"a whole epoch of {len(source)} batches gave no pair: every image was skipped as "
                            f"corrupt ({source.stats().get('skipped', 0)} skipped); check data.sources")
